"""What a test needs from the machine, and what to do when it is missing.

`tools/test` installs everything (QEMU, binutils, lzop, the Debian kernel), so under CI
(`CI` set) a missing piece is a broken install step: the test fails. On a developer's
machine it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

__all__ = ["require_tool", "unavailable"]


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (under CI the test command must install it)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> None:
    if shutil.which(name) is None:
        unavailable(f"{name} not installed")

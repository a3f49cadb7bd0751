"""Real Debian kernel images for tests (cached under ~/.cache/kscan/kernel).

`real_image(which)` returns the parsed `KernelImage` of Debian's 6.1 cloud kernel (the
one the test guests boot) or its 6.12 backport (zstd payload, runtime constants, IBT).
When an image cannot be fetched the test is skipped, except under CI (CI=true), where it
fails: CI must exercise the real formats.
"""

from __future__ import annotations

import functools
import os

import pytest

from scanner.image.vmlinux import KernelImage, load_kernel_image
from tools.guests import KERNEL_PACKAGE, GuestError, ensure_kernel

PACKAGES = {
    "6.1": KERNEL_PACKAGE,
    "6.12": "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
}


@functools.cache
def _load(which: str) -> KernelImage:
    return load_kernel_image(ensure_kernel(PACKAGES[which]).vmlinuz)


def real_image(which: str) -> KernelImage:
    try:
        return _load(which)
    except (GuestError, OSError) as err:
        msg = f"Debian {which} kernel image not available: {err}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)

"""The README's main job, `tools/demo`, still runs end to end: two real guests, a
baseline, `kscan run --on-tamper pause`, an inline hook written into one guest's `.text`,
its detection and the paused VM (the bootstrap step of tools/demo is left out: the test
command has run it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.guest


def test_the_demo_detects_the_inline_hook_and_pauses_the_vm() -> None:
    out = subprocess.run([sys.executable, "-m", "tools.demo"], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in out.stdout.splitlines() + out.stderr.splitlines()
            if line.startswith("[demo]")]
    assert any(line.startswith("[demo] detected in ") and ".text page" in line
               for line in said), said
    assert any("run state is now 'paused'" in line for line in said), said
    assert any("demo0 stayed clean" in line for line in said), said

"""Helpers to drive the real `kscan` command line from tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from scanner.check.locate import LiveKernel, locate_kernel
from scanner.image.kernel_profile import KernelProfile
from scanner.vm import AttachedVm
from tools.kscan_run import Event, KscanRun, NoEvent
from tools.tamper import write_guest


def kscan(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scanner", *args], capture_output=True,
                          text=True, timeout=timeout)


class RunProc(KscanRun):
    """`tools.kscan_run.KscanRun`, failing the test (not raising) when an event is
    missing."""

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        super().__init__(args, stderr_path)

    def wait_for(self, pred: Callable[[Event], bool], timeout: float, after: int = 0) -> Event:
        try:
            return super().wait_for(pred, timeout, after)
        except NoEvent as err:
            pytest.fail(str(err))


async def live_kernel(sock: Path, profile: KernelProfile) -> tuple[AttachedVm, LiveKernel]:
    vm = await AttachedVm.attach(sock)
    return vm, locate_kernel(vm.mem, vm.walker(), vm.vcpus, [profile], vm=vm.name)


async def flip_bytes(sock: Path, profile: KernelProfile, region: str, offset: int,
                     n: int) -> bytes:
    """Invert n bytes of a region in the running guest (every byte changes); return the
    old bytes."""
    vm, lk = await live_kernel(sock, profile)
    try:
        va = lk.regions[region].va + offset
        t = vm.walker().translate_range(va, n)
        old = b"".join(bytes(vm.mem.view(g, k)) for g, k in t.gpa_runs())
        write_guest(vm, va, bytes(~b & 0xFF for b in old))
        return old
    finally:
        await vm.close()


async def write_bytes(sock: Path, profile: KernelProfile, region: str, offset: int,
                      data: bytes) -> None:
    vm, lk = await live_kernel(sock, profile)
    try:
        write_guest(vm, lk.regions[region].va + offset, data)
    finally:
        await vm.close()

"""Helpers to drive the real `kscan` command line from tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scanner.kernel import LiveKernel, locate_kernel
from scanner.profile import KernelProfile
from scanner.vm import AttachedVm
from tools.tamper import write_guest

Event = dict[str, Any]


def kscan(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scanner.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


class RunProc:
    """`kscan run` in a subprocess; its JSON-lines events collected as they come."""

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        self._err = open(stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "scanner.cli", "run", *args],
                                     stdout=subprocess.PIPE, stderr=self._err)
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self.bad_lines: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr_path = stderr_path

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                self.bad_lines.append(line)
                continue
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[Event], bool], timeout: float, after: int = 0) -> Event:
        """The first event (from index `after` on) satisfying `pred`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[after:]:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = Path(self.stderr_path).read_text(errors="replace")[-3000:]
                    pytest.fail(f"no matching event within {timeout}s; got "
                                f"{[e['event'] for e in self.events[after:]]}\nstderr:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def of(self, kind: str, vm: str | None = None) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e["event"] == kind and (vm is None or
                                                                      e["vm"] == vm)]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(5)
        self._err.close()
        return rc


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

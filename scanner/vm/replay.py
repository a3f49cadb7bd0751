"""Replayed VMs: a recorded guest (memory file + vCPU state + layout) without QEMU.

A replay directory holds `vm.json` and the memory file(s) it names:

    {"name": "r17", "run_state": "running",
     "layout": [{"gpa": 0, "size": 536870912, "file": "mem", "offset": 0}],
     "vcpus": [{"index": 0, "cr0": ..., "cr3": ..., ...}],
     "boot_profile": {"cpu_model": ..., "features": ..., "vcpus": 1, "smep": false,
                      "smap": false}}

`ReplayVm` offers the same members as `scanner.vm.live.AttachedVm` (the `VmHandle`
protocol), so the scanner reads a replayed VM through exactly the same code as a live
one. Used by the scale benchmark (hundreds of VMs cannot boot on one small host) and
by tests; `tools/record.py` makes replay directories from running guests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from scanner.errors import VmStateError
from scanner.qemu.qmp import RunState, RunStatus
from scanner.vm.bootprofile import BootProfile
from scanner.vm.progress import Sample
from translate import GuestMemory, PageWalker, RamRange, kernel_walker
from translate.vcpu import VcpuState

__all__ = ["ReplayVm", "write_replay"]


class ReplayVm:
    def __init__(self, directory: Path, name: str, mem: GuestMemory, vcpus: list[VcpuState],
                 boot: BootProfile, state: str) -> None:
        self.directory = directory
        self._doc = os.fspath(directory / "vm.json")  # stat'ed at every run-state look
        self.name = name
        self.mem = mem
        self.vcpus = vcpus
        self._boot = boot
        self._state = state
        self.uuid: str | None = None
        self._identity = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._doc)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    @classmethod
    async def open(cls, directory: str | os.PathLike[str]) -> ReplayVm:
        d = Path(directory)
        try:
            doc = orjson.loads((d / "vm.json").read_bytes())
            layout = [RamRange(r["gpa"], r["size"], str(d / r["file"]), r["offset"])
                      for r in doc["layout"]]
            vcpus = [VcpuState(**v) for v in doc["vcpus"]]
            bp = doc["boot_profile"]
            boot = BootProfile(bp["cpu_model"], bp["features"], int(bp["vcpus"]),
                               bool(bp["smep"]), bool(bp["smap"]))
            name = str(doc["name"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise VmStateError(f"not a replay directory: {err}", vm=str(d),
                               hint="make one with python -m tools.record") from err
        mem = GuestMemory(layout, name=name)
        return cls(d, name, mem, vcpus, boot, str(doc.get("run_state", "running")))

    def walker(self, vcpu: int = 0) -> PageWalker:
        return kernel_walker(self.mem, self.vcpus[vcpu])

    async def refresh_vcpus(self) -> list[VcpuState]:
        return self.vcpus

    async def run_state(self) -> RunState:
        """The recording's run state; shut down once its directory is gone or holds
        another recording (a replayed VM "powered off", or "rebooted" into a new one: it
        is attached afresh, and its old files are no longer mapped)."""
        if self._identity is None or self._stat() != self._identity:
            return RunState(RunStatus.SHUTDOWN, False)
        return RunState(RunStatus(self._state), self._state == "running")

    async def boot_profile(self) -> BootProfile:
        return self._boot

    def resets(self) -> int:
        return 0  # a recording does not reboot

    async def pause(self) -> None:
        self._state = "paused"

    async def progress(self) -> Sample | None:
        return None  # no vCPU threads: the host cannot tell

    async def close(self) -> None:
        self.mem.close()

    async def __aenter__(self) -> ReplayVm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def write_replay(directory: Path, name: str, layout: list[dict[str, Any]],
                 vcpus: list[VcpuState], boot: BootProfile) -> None:
    doc = {"name": name, "run_state": "running", "layout": layout,
           "vcpus": [v.__dict__ for v in vcpus],
           "boot_profile": {"cpu_model": boot.cpu_model, "features": boot.features,
                            "vcpus": boot.vcpus, "smep": boot.smep, "smap": boot.smap}}
    (directory / "vm.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))

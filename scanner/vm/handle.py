"""The VM handle: what the scanner uses of a VM, live or replayed.

The scanner reads a VM through these members only, so a recorded VM replayed from files
(`scanner.vm.replay`) stands in for a live one (`scanner.vm.live`).
"""

from __future__ import annotations

from typing import Protocol

from scanner.qemu.qmp import RunState
from scanner.vm.bootprofile import BootProfile
from scanner.vm.progress import Sample
from translate import GuestMemory, PageWalker
from translate.vcpu import VcpuState

__all__ = ["VmHandle"]


class VmHandle(Protocol):
    name: str
    mem: GuestMemory
    vcpus: list[VcpuState]
    uuid: str | None  # the VM's UUID when it has one (QEMU -uuid, libvirt)

    def walker(self, vcpu: int = 0) -> PageWalker: ...
    async def refresh_vcpus(self) -> list[VcpuState]: ...
    async def run_state(self) -> RunState: ...
    async def boot_profile(self) -> BootProfile: ...
    async def pause(self) -> None: ...
    async def progress(self) -> Sample | None:
        """How long each vCPU thread has run and whether it sleeps, from the host
        (None: the host cannot tell, e.g. a replayed VM)."""
        ...
    def resets(self) -> int:
        """How many times QEMU reset the VM since it was attached (0 if unknown)."""
        ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> VmHandle: ...
    async def __aexit__(self, *exc: object) -> None: ...

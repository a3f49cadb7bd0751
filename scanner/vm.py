"""Attach to a running VM: QMP session + read-only guest memory + page walker.

`AttachedVm.attach(socket)` asks QEMU (over QMP) where the guest's RAM lives and what
its vCPUs' control registers are, maps the memory-backend files read-only, and picks
the kernel's top-level page table. Everything later stages read about the guest comes
through here.

The scanner uses a VM through these members only (the `VmHandle` protocol), so a
recorded VM replayed from files (`scanner.replay`) can stand in for a live one: `name`,
`mem`, `vcpus`, `walker()`, `refresh_vcpus()`, `run_state()`, `boot_profile()`,
`pause()`, `close()`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Protocol

from scanner.bootprofile import BootProfile, read_boot_profile
from scanner.errors import VmStateError
from scanner.hmp import VcpuState
from scanner.qmp import QmpVm, RunState
from translate import (
    GuestMemory,
    PageWalker,
    PagingMode,
    RamRange,
    TranslationError,
    kernel_pgd_candidates,
    paging_mode,
)
from translate.paging import EFER_NXE

__all__ = ["AttachedVm", "VmHandle", "kernel_walker", "open_vm"]

#: The upper (kernel) half of a top-level table: entries 256..511.
_KERNEL_HALF = range(256, 512)


@dataclass(frozen=True)
class KernelSpace:
    """The kernel address space as seen from one vCPU."""

    pgd: int
    mode: PagingMode
    nxe: bool

    @property
    def top_shift(self) -> int:
        """Index shift of the top-level table (39 for 4-level, 48 for 5-level)."""
        return self.mode.levels[0].shift

    def walker(self, mem: GuestMemory) -> PageWalker:
        return PageWalker(mem, self.pgd, self.mode, nxe=self.nxe)


def _present_kernel_entries(mem: GuestMemory, pgd: int) -> int:
    try:
        table = mem.view(pgd, 4096).cast("Q")
    except TranslationError:
        return -1
    return sum(1 for i in _KERNEL_HALF if table[i] & 1)


def kernel_space(mem: GuestMemory, vcpu: VcpuState) -> KernelSpace:
    """Pick the kernel PGD for a vCPU: of the CR3 candidates (PTI user/kernel halves),
    the one whose kernel half maps the most (the PTI user PGD maps only the entry
    trampoline and the cpu_entry_area)."""
    mode = paging_mode(vcpu.cr0, vcpu.cr4, vcpu.efer)
    cands = kernel_pgd_candidates(vcpu.cr3)
    best = max(cands, key=lambda p: _present_kernel_entries(mem, p))
    if _present_kernel_entries(mem, best) <= 0:
        raise TranslationError(f"CR3 {vcpu.cr3:#x} of vCPU {vcpu.index} points at no page "
                               "table with kernel mappings")
    return KernelSpace(best, mode, bool(vcpu.efer & EFER_NXE))


def kernel_walker(mem: GuestMemory, vcpu: VcpuState) -> PageWalker:
    return kernel_space(mem, vcpu).walker(mem)


class VmHandle(Protocol):
    name: str
    mem: GuestMemory
    vcpus: list[VcpuState]

    def walker(self, vcpu: int = 0) -> PageWalker: ...
    async def refresh_vcpus(self) -> list[VcpuState]: ...
    async def run_state(self) -> RunState: ...
    async def boot_profile(self) -> BootProfile: ...
    async def pause(self) -> None: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> VmHandle: ...
    async def __aexit__(self, *exc: object) -> None: ...


async def open_vm(source: str | os.PathLike[str]) -> VmHandle:
    """A QMP socket path, or `replay:DIR` for a recorded VM (see scanner.replay)."""
    src = os.fspath(source)
    if src.startswith("replay:"):
        from scanner.replay import ReplayVm

        return await ReplayVm.open(src[len("replay:"):])
    return await AttachedVm.attach(src)


class AttachedVm:
    """A VM kscan is attached to: QMP session, mapped RAM, current vCPU state."""

    def __init__(self, qmp: QmpVm, name: str, layout: list[RamRange], mem: GuestMemory,
                 vcpus: list[VcpuState]) -> None:
        self.qmp = qmp
        self.name = name
        self.layout = layout
        self.mem = mem
        self.vcpus = vcpus

    @classmethod
    async def attach(cls, socket: str | os.PathLike[str]) -> AttachedVm:
        qmp = await QmpVm.connect(socket)
        try:
            name = await qmp.name()
            layout = await qmp.ram_layout(vm=name)
            mem = GuestMemory(layout, name=name)
            try:
                vcpus = await qmp.vcpus()
                if not vcpus:
                    raise VmStateError("QEMU reports no vCPUs", vm=name)
            except BaseException:
                mem.close()
                raise
        except BaseException:
            await qmp.close()
            raise
        return cls(qmp, name, layout, mem, vcpus)

    async def refresh_vcpus(self) -> list[VcpuState]:
        self.vcpus = await self.qmp.vcpus()
        if not self.vcpus:
            raise VmStateError("QEMU reports no vCPUs", vm=self.name)
        return self.vcpus

    async def run_state(self) -> RunState:
        return await self.qmp.run_state()

    def walker(self, vcpu: int = 0) -> PageWalker:
        return kernel_walker(self.mem, self.vcpus[vcpu])

    async def boot_profile(self) -> BootProfile:
        return await read_boot_profile(self.qmp, len(self.vcpus))

    async def pause(self) -> None:
        await self.qmp.stop()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mem.close()
        await self.qmp.close()

    async def __aenter__(self) -> AttachedVm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

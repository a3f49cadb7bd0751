"""The kernel's half of a guest address space: which top-level page table maps it.

A vCPU's CR3 may point at the user half of a PTI page-table pair, carry a PCID, or (in a
hostile guest) point anywhere. `kernel_space` picks, of the candidates CR3 allows, the
table whose upper (kernel) half maps the most, and returns it with the paging mode the
control registers select. Live and replayed VMs both go through here, so the choice is
made in one place. Pure: reads guest memory only, knows nothing of QEMU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from translate.errors import TranslationError
from translate.paging import PageWalker, PagingMode, kernel_pgd_candidates, paging_mode
from translate.physmem import GuestMemory
from translate.x86 import EFER_NXE, PAGE

__all__ = ["ControlRegisters", "KernelSpace", "kernel_space", "kernel_walker",
           "present_kernel_entries"]

#: The upper (kernel) half of a top-level table: entries 256..511.
_KERNEL_HALF = range(256, 512)


class ControlRegisters(Protocol):
    """What picking the kernel's page table needs of a vCPU's state."""

    @property
    def index(self) -> int: ...
    @property
    def cr0(self) -> int: ...
    @property
    def cr3(self) -> int: ...
    @property
    def cr4(self) -> int: ...
    @property
    def efer(self) -> int: ...


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


def present_kernel_entries(mem: GuestMemory, pgd: int) -> int:
    """How many kernel-half entries of the table at `pgd` are present (-1: unreadable)."""
    try:
        table = mem.view(pgd, PAGE).cast("Q")
    except TranslationError:
        return -1
    return sum(1 for i in _KERNEL_HALF if table[i] & 1)


def kernel_space(mem: GuestMemory, vcpu: ControlRegisters) -> KernelSpace:
    """Pick the kernel PGD for a vCPU: of the CR3 candidates (PTI user/kernel halves),
    the one whose kernel half maps the most (the PTI user PGD maps only the entry
    trampoline and the cpu_entry_area)."""
    mode = paging_mode(vcpu.cr0, vcpu.cr4, vcpu.efer)
    counts = {p: present_kernel_entries(mem, p) for p in kernel_pgd_candidates(vcpu.cr3)}
    best = max(counts, key=lambda p: counts[p])
    if counts[best] <= 0:
        raise TranslationError(f"CR3 {vcpu.cr3:#x} of vCPU {vcpu.index} points at no page "
                               "table with kernel mappings")
    return KernelSpace(best, mode, bool(vcpu.efer & EFER_NXE))


def kernel_walker(mem: GuestMemory, vcpu: ControlRegisters) -> PageWalker:
    return kernel_space(mem, vcpu).walker(mem)

"""translate: guest-virtual → guest-physical → host memory, read-only and zero-copy.

* `physmem.GuestMemory` maps QEMU memory-backend files read-only and hands out
  memoryviews by guest-physical address (the host-side "EPT step").
* `paging.PageWalker` walks x86-64 4- and 5-level page tables in that memory,
  reporting page sizes and effective permissions, bounded against hostile tables.
* `kernel_space.kernel_space` picks the vCPU's kernel page table (PTI, PCID).
* `vcpu.VcpuState` is one vCPU's control state, whatever hypervisor reported it.
* `x86` holds the architectural constants (PAGE, CR0/CR4/EFER bits), once.

This package does no I/O beyond mmap and knows nothing of QMP or the database; the
scanner feeds it the RAM layout and vCPU registers it reads from QEMU.
"""

from translate.errors import BackendError, PageFaultError, PhysicalAddressError, TranslationError
from translate.kernel_space import ControlRegisters, KernelSpace, kernel_space, kernel_walker
from translate.paging import (
    FIVE_LEVEL,
    FOUR_LEVEL,
    Mapping,
    PageWalker,
    PagingMode,
    Run,
    Translation,
    coalesce,
    kernel_pgd_candidates,
    paging_mode,
)
from translate.physmem import GuestMemory, RamRange
from translate.vcpu import VcpuState
from translate.x86 import PAGE

__all__ = [
    "FIVE_LEVEL",
    "FOUR_LEVEL",
    "PAGE",
    "BackendError",
    "ControlRegisters",
    "GuestMemory",
    "KernelSpace",
    "Mapping",
    "PageFaultError",
    "PageWalker",
    "PagingMode",
    "PhysicalAddressError",
    "RamRange",
    "Run",
    "Translation",
    "TranslationError",
    "VcpuState",
    "coalesce",
    "kernel_pgd_candidates",
    "kernel_space",
    "kernel_walker",
    "paging_mode",
]

"""Examine a VM: locate its kernel and read its protected regions, normalized.

`examine` refreshes the vCPUs and boot profile over the VM handle, picks the kernel page
table, identifies the kernel among the stored profiles, refuses a kernel that has not
finished booting, and reads the four regions with KASLR undone. `reexamine` reads again
only regions whose translations are proven unchanged. The QMP calls run on the caller's
loop; the CPU-bound part through `run_sync` (the engine passes its worker pool).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TypeVar

from scanner.check.baseline import require_booted
from scanner.check.locate import REGIONS, LiveKernel, locate_kernel
from scanner.check.measure import read_normalized
from scanner.image.kernel_profile import KernelProfile
from scanner.vm import BootProfile, VmHandle, pti_active
from translate import KernelSpace, kernel_space
from translate.vcpu import VcpuState

__all__ = ["Examined", "RunSync", "Snapshot", "examine", "inline", "reexamine", "snapshot"]

T = TypeVar("T")


@dataclass(frozen=True)
class Examined:
    """A VM's kernel located and its regions read, ready to baseline or verify."""

    vm: str
    lk: LiveKernel
    boot: BootProfile
    vcpus: tuple[VcpuState, ...]
    space: KernelSpace  # the kernel page table the regions were translated through
    normalized: dict[str, bytearray]
    raw_digests: dict[str, bytes]  # of the raw bytes `normalized` was made from

    def without_copies(self) -> Examined:
        """What a later partial re-check needs: not the region copies (~19 MB) and not
        the decoded IDT gates."""
        return dataclasses.replace(self, lk=dataclasses.replace(self.lk, gates=()),
                                   normalized={}, raw_digests={})


#: Runs a CPU-bound function somewhere (the engine passes its worker pool).
RunSync = Callable[[Callable[[], T]], Awaitable[T]]


async def inline(fn: Callable[[], T]) -> T:
    """`RunSync` for one-shot commands: run right here."""
    return fn()


def _read(vm: VmHandle, lk: LiveKernel, names: Collection[str],
          idtr_limit: int) -> tuple[dict[str, bytearray], dict[str, bytes]]:
    read = {n: read_normalized(vm.mem, lk, n, idtr_limit) for n in REGIONS if n in names}
    return {n: r[0] for n, r in read.items()}, {n: r[1] for n, r in read.items()}


@dataclass(frozen=True)
class Snapshot:
    """What examining a VM asks QEMU for: its vCPUs' registers and its boot profile.
    Taken before a slow-path slot is held, so a slow QMP peer holds none."""

    vcpus: tuple[VcpuState, ...]
    boot: BootProfile


async def snapshot(vm: VmHandle) -> Snapshot:
    return Snapshot(tuple(await vm.refresh_vcpus()), await vm.boot_profile())


async def examine(vm: VmHandle, profiles: list[KernelProfile],
                  run_sync: RunSync[Examined] = inline,
                  snap: Snapshot | None = None) -> Examined:
    """Locate the VM's kernel, refuse it if not booted, read its regions normalized.
    `snap`: the VM's registers and boot profile, if already asked for."""
    if snap is None:
        snap = await snapshot(vm)
    vcpus, boot = snap.vcpus, snap.boot

    def compute() -> Examined:
        ks = kernel_space(vm.mem, vcpus[0])
        lk = locate_kernel(vm.mem, ks.walker(vm.mem), vcpus, profiles, vm=vm.name)
        require_booted(lk, vm.name)
        booted = dataclasses.replace(boot, pti=pti_active(vm.mem, ks.pgd, ks.top_shift))
        normalized, digests = _read(vm, lk, REGIONS, vcpus[0].idtr_limit)
        return Examined(vm.name, lk, booted, vcpus, ks, normalized, digests)

    return await run_sync(compute)


async def reexamine(vm: VmHandle, prev: Examined, names: Collection[str],
                    run_sync: RunSync[Examined] = inline,
                    vcpus: tuple[VcpuState, ...] | None = None) -> Examined:
    """Read again only the regions `names`, through the previous check's translations.
    Only valid when those translations are proven unchanged (the fast path's page-table
    fingerprint and every vCPU's kernel mapping); the kernel is not located again.
    `vcpus`: the registers the proof used (asked for again if not given)."""
    if vcpus is None:
        vcpus = tuple(await vm.refresh_vcpus())

    def compute() -> Examined:
        normalized, digests = _read(vm, prev.lk, names, vcpus[0].idtr_limit)
        return Examined(vm.name, prev.lk, prev.boot, vcpus, prev.space, normalized, digests)

    return await run_sync(compute)

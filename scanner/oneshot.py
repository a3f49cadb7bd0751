"""One-shot operations on one VM: `kscan baseline`, `kscan check`, `kscan accept`.

Each attaches to the VM, identifies its kernel from the stored profiles, refuses a VM
that has not finished booting, and reads the four protected regions normalized for
KASLR. The watch loop (`scanner.engine`) reuses `examine` and `check_examined`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

import xxhash
import zstandard

from scanner.baseline import GoldenBuild, build_golden, capture, require_booted
from scanner.bootprofile import BootProfile, pti_active
from scanner.errors import BaselineMissing, ProfileError, VmStateError
from scanner.hmp import VcpuState
from scanner.kernel import REGIONS, LiveKernel, locate_kernel
from scanner.measure import PAGE, read_normalized
from scanner.profile import KernelProfile
from scanner.verify import CheckReport, verify
from scanner.vm import KernelSpace, VmHandle, kernel_space, open_vm
from store import GoldenRegion, Store

T = TypeVar("T")

__all__ = ["Examined", "accept_vm", "baseline_vms", "check_examined", "check_vm", "examine",
           "load_profiles"]


async def load_profiles(st: Store) -> list[KernelProfile]:
    out = []
    for info in await st.list_profiles():
        row = await st.get_profile(info.build_id)
        if row is not None:
            out.append(KernelProfile.from_bytes(row.data))
    if not out:
        raise ProfileError("the database has no kernel profiles", vm="-",
                           hint="add the guests' kernel first: kscan profile add "
                                "/path/to/vmlinuz-RELEASE")
    return out


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


#: Runs a CPU-bound function somewhere (the engine passes its worker pool).
RunSync = Callable[[Callable[[], T]], Awaitable[T]]


async def _inline(fn: Callable[[], T]) -> T:
    return fn()


async def examine(vm: VmHandle, profiles: list[KernelProfile],
                  run_sync: RunSync[Examined] = _inline) -> Examined:
    """Locate the VM's kernel, refuse it if not booted, read its regions normalized.
    The QMP calls run here; the CPU-bound part through `run_sync`."""
    vcpus = tuple(await vm.refresh_vcpus())
    boot = await vm.boot_profile()

    def compute() -> Examined:
        ks = kernel_space(vm.mem, vcpus[0])
        lk = locate_kernel(vm.mem, ks.walker(vm.mem), vcpus, profiles, vm=vm.name)
        require_booted(lk, vm.name)
        booted = dataclasses.replace(boot, pti=pti_active(vm.mem, ks.pgd, ks.top_shift))
        limit = vcpus[0].idtr_limit
        read = {n: read_normalized(vm.mem, lk, n, limit) for n in REGIONS}
        return Examined(vm.name, lk, booted, vcpus, ks, {n: r[0] for n, r in read.items()},
                        {n: r[1] for n, r in read.items()})

    return await run_sync(compute)


async def reexamine(vm: VmHandle, prev: Examined, names: Collection[str],
                    run_sync: RunSync[Examined] = _inline) -> Examined:
    """Read again only the regions `names`, through the previous check's translations.
    Only valid when those translations are proven unchanged (the fast path's page-table
    fingerprint and every vCPU's kernel mapping); the kernel is not located again."""
    vcpus = tuple(await vm.refresh_vcpus())

    def compute() -> Examined:
        limit = vcpus[0].idtr_limit
        read = {n: read_normalized(vm.mem, prev.lk, n, limit) for n in REGIONS if n in names}
        return Examined(vm.name, prev.lk, prev.boot, vcpus, prev.space,
                        {n: r[0] for n, r in read.items()}, {n: r[1] for n, r in read.items()})

    return await run_sync(compute)


async def baseline_vms(sockets: list[str], db: str | None) -> list[tuple[str, GoldenBuild,
                                                                            str]]:
    """Build (or extend) golden baselines from verified VMs, one after the other."""
    out = []
    async with Store.open(db) as st:
        profiles = await load_profiles(st)
        for sock in sockets:
            async with await open_vm(sock) as vm:
                ex = await examine(vm, profiles)
                cap = capture(ex.normalized)
                key = ex.boot.key
                previous = await st.get_golden(ex.lk.profile.build_id, key)
                gb = build_golden(ex.lk, cap, ex.boot, vm.name, previous)
                await st.put_golden(ex.lk.profile.build_id, key, gb.regions, vm.name,
                                    contents=gb.contents)
                await st.append_event({
                    "ts": time.time(), "event": "baseline", "vm": vm.name,
                    "build_id": ex.lk.profile.build_id, "boot_profile": key,
                    "boots": gb.boots, "slide": ex.lk.slide,
                    "per_boot_pages": {n: r.per_boot_pages() for n, r in gb.regions.items()
                                       if r.per_boot_pages()},
                })
                out.append((vm.name, gb, key))
    return out


async def golden_for(st: Store, ex: Examined) -> tuple[dict[str, GoldenRegion],
                                                     dict[str, bytes | None]]:
    """The golden baseline for an examined VM and its (compressed) region bytes."""
    build_id = ex.lk.profile.build_id
    golden = await st.get_golden(build_id, ex.boot.key)
    if golden is None:
        raise BaselineMissing(
            f"no golden baseline for kernel {ex.lk.profile.release} ({build_id[:12]}) with "
            f"boot profile {ex.boot.key}", vm=ex.vm,
            hint="baseline a verified VM of that kernel and CPU first: kscan baseline "
                 "--qmp SOCKET_OF_VERIFIED_VM")
    missing = [n for n in REGIONS if n not in golden]
    if missing:
        raise VmStateError(f"golden baseline lacks regions {missing}", vm=ex.vm)
    contents = {n: await st.get_golden_content(build_id, ex.boot.key, n) for n in REGIONS}
    return golden, contents


async def check_examined(
    st: Store, ex: Examined, vm_id: str,
    golden: tuple[dict[str, GoldenRegion], dict[str, bytes | None]] | None = None,
    run_sync: RunSync[tuple[CheckReport, dict[str, Any]]] = _inline,
) -> CheckReport:
    """Verify an examined VM against the stored baselines (fetched unless given);
    records its per-VM state."""
    golden_regions, contents = golden if golden is not None else await golden_for(st, ex)
    state = await st.get_vm_state(vm_id)
    report, new_state = await run_sync(lambda: verify(
        ex.vm, ex.lk, ex.vcpus, ex.boot, ex.normalized, golden_regions, contents.get, state))
    if report.per_vm_baseline_taken:
        await st.put_vm_state(vm_id, new_state)
    return report


async def check_vm(socket: str | os.PathLike[str], db: str | None) -> CheckReport:
    async with Store.open(db) as st:
        profiles = await load_profiles(st)
        async with await open_vm(socket) as vm:
            ex = await examine(vm, profiles)
            report = await check_examined(st, ex, vm.name)
            await st.append_event({"ts": report.ts, "event": "check", "vm": vm.name,
                                   **report.to_json()})
            return report


async def accept_vm(socket: str | os.PathLike[str], db: str | None,
                    note: str = "") -> tuple[CheckReport, int]:
    """Approve a VM's current protected bytes after an operator-approved change: pages
    that differ from their basis are recorded as accepted for this VM and this boot.
    Control findings (W^X, CR0.WP, SMEP/SMAP, IDT gates) cannot be accepted."""
    cctx = zstandard.ZstdCompressor(level=3)
    async with Store.open(db) as st:
        profiles = await load_profiles(st)
        async with await open_vm(socket) as vm:
            ex = await examine(vm, profiles)
            golden, contents = await golden_for(st, ex)
            report, state = verify(ex.vm, ex.lk, ex.vcpus, ex.boot, ex.normalized, golden,
                                   contents.get, await st.get_vm_state(vm.name))
            if report.findings:
                f = report.findings[0]
                raise VmStateError(f"cannot accept: {f.message}", vm=vm.name,
                                   hint="control-state findings are never accepted; "
                                        "investigate the VM")
            accepted = state.setdefault("accepted", {})
            pages = []
            for m in report.mismatches:
                buf = ex.normalized[m.region]
                page = bytes(buf[m.page * PAGE:(m.page + 1) * PAGE])
                accepted.setdefault(m.region, {})[str(m.page)] = {
                    "hash": xxhash.xxh3_64_intdigest(page), "data": cctx.compress(page)}
                pages.append({"region": m.region, "page": m.page, "va": m.va})
            await st.put_vm_state(vm.name, state)
            await st.append_event({"ts": time.time(), "event": "accepted", "vm": vm.name,
                                   "pages": pages, "note": note,
                                   "boot_profile": ex.boot.key,
                                   "build_id": ex.lk.profile.build_id})
            return report, len(pages)

"""One-shot operations on one VM: `kscan baseline`, `kscan check`, `kscan accept`.

Each attaches to the VM, examines it (`scanner.examine`: identify the kernel, refuse a
kernel that has not finished booting, read the four regions normalized for KASLR), then
builds a baseline, verifies, or approves the current bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import zstandard

from kscan.addresses import hex_addr
from scanner.check.baseline import GoldenBuild, build_golden, capture
from scanner.check.patch_state import HALF_STATE_MAX, HALF_STATE_MOST
from scanner.check.state import PageRecord
from scanner.check.verify import CheckReport
from scanner.errors import VmStateError
from scanner.examine import check_examined, examine, golden_for, load_profiles, verify_examined
from scanner.examine.keying import keyed_store
from scanner.hashing import page_hash
from scanner.vm import VmSource, open_vm, state_key
from scanner.vm.progress import wait_for_progress
from translate import PAGE

__all__ = ["AcceptResult", "BaselineResult", "accept_vm", "baseline_vms", "check_vm"]

Source = VmSource | str | os.PathLike[str]


@dataclass(frozen=True)
class BaselineResult:
    """One verified VM merged into the golden baseline of its kernel and boot profile."""

    vm: str
    build: GoldenBuild
    boot_profile: str


@dataclass(frozen=True)
class AcceptResult:
    report: CheckReport  # the check the accepted pages came from
    accepted_pages: int


async def baseline_vms(sources: Sequence[Source], db: str | None) -> list[BaselineResult]:
    """Build (or extend) golden baselines from verified VMs, one after the other."""
    out = []
    async with keyed_store(db, announce=True) as st:
        profiles = await load_profiles(st)
        for src in sources:
            async with await open_vm(src) as vm:
                ex = await examine(vm, profiles)
                key = ex.boot.key
                previous = await st.get_golden(ex.lk.profile.build_id, key)
                gb = build_golden(ex.lk, capture(ex.normalized), ex.boot, vm.name, previous)
                await st.put_golden(ex.lk.profile.build_id, key, gb.regions, vm.name,
                                    contents=gb.contents)
                await st.append_event({
                    "ts": time.time(), "event": "baseline", "vm": vm.name,
                    "build_id": ex.lk.profile.build_id, "boot_profile": key,
                    "boots": gb.boots, "slide": hex_addr(ex.lk.slide),
                    "per_boot_pages": {n: r.per_boot_pages() for n, r in gb.regions.items()
                                       if r.per_boot_pages()},
                })
                out.append(BaselineResult(vm.name, gb, key))
    return out


async def check_vm(source: Source, db: str | None, *, strict: bool = False,
                   trusted_modules: frozenset[str] = frozenset()) -> CheckReport:
    async with keyed_store(db) as st:
        profiles = await load_profiles(st)
        async with await open_vm(source) as vm:
            ex = await examine(vm, profiles)
            key = state_key(source, vm.uuid)
            report = await check_examined(st, ex, key, mem=vm.mem, strict=strict,
                                          trusted_modules=trusted_modules)
            if report.patches is not None and any(v.in_progress
                                                  for v in report.patches.verified):
                # text_poke_bp() seen half-way: the kernel finishes in microseconds. Look
                # again a second later, once the guest has run (the VM's state remembers
                # what was seen when): the same half-state still there is tampering.
                await wait_for_progress(vm.progress, HALF_STATE_MAX, HALF_STATE_MOST)
                ex = await examine(vm, profiles)
                report = await check_examined(st, ex, key, mem=vm.mem, strict=strict,
                                              trusted_modules=trusted_modules)
            await st.append_event({"ts": report.ts, "event": "check", "vm": vm.name,
                                   **report.to_json()})
            return report


async def accept_vm(source: Source, db: str | None, note: str = "") -> AcceptResult:
    """Approve a VM's current protected bytes after an operator-approved change: pages
    that differ from their basis are recorded as accepted for this VM and this boot.
    Control findings (W^X, CR0.WP, SMEP/SMAP, IDT gates) cannot be accepted."""
    cctx = zstandard.ZstdCompressor(level=3)
    async with keyed_store(db) as st:
        profiles = await load_profiles(st)
        async with await open_vm(source) as vm:
            ex = await examine(vm, profiles)
            key = state_key(source, vm.uuid)
            v = await verify_examined(st, ex, key, await golden_for(st, ex), mem=vm.mem)
            report, state = v.report, v.state
            if report.findings:
                f = report.findings[0]
                raise VmStateError(f"cannot accept: {f.message}", vm=vm.name,
                                   hint="control-state findings are never accepted; "
                                        "investigate the VM")
            pages = []
            for m in report.mismatches:
                buf = ex.normalized[m.region]
                page = bytes(buf[m.page * PAGE:(m.page + 1) * PAGE])
                state.accepted.setdefault(m.region, {})[m.page] = PageRecord(
                    page_hash(page), cctx.compress(page))
                pages.append({"region": m.region, "page": m.page, "va": hex_addr(m.va)})
            await st.put_vm_state(key, state.to_plain())
            await st.append_event({"ts": time.time(), "event": "accepted", "vm": vm.name,
                                   "pages": pages, "note": note,
                                   "boot_profile": ex.boot.key,
                                   "build_id": ex.lk.profile.build_id})
            return AcceptResult(report, len(pages))

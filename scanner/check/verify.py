"""Verification: compare a VM's protected regions with its golden and per-VM baselines.

Per region, every 4 KiB page is checked against one basis:

* golden — the shared baseline of its (kernel build, boot profile);
* per-boot — pages that legitimately differ per boot (`scanner.check.baseline` says how that
  set is derived, never from the VM being checked) are checked against the VM's own
  per-VM baseline, taken at the first check after that boot;
* accepted — pages an operator approved with `kscan accept` for this VM and boot.

Besides hashes, the control state is checked: W^X of the region mappings, CR0.WP and,
when the virtual CPU offers them, CR4.SMEP/SMAP on every vCPU, every vCPU's IDTR equal
to the one whose IDT is hashed, and every IDT gate pointing into kernel text.

A mismatch is localized to page, guest-virtual and guest-physical address, and byte
ranges with what kind of site changed (`scanner.check.classify`).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from kscan.addresses import hex_addr
from scanner.check.attribution import Attribution, attribute, attribution_off
from scanner.check.classify import ByteRange, diff_ranges
from scanner.check.direct_calls import direct_lookup
from scanner.check.execmem import ExecScan, address_owners
from scanner.check.golden_bytes import GOLDEN_BYTES
from scanner.check.locate import REGIONS, LiveKernel, Region
from scanner.check.owners import OwnerKind, OwnerLookup, Trust, judge
from scanner.check.patch_report import BOOT_TIME, PatchReport, split_by_page
from scanner.check.patch_state import PatchMemory, VmFacts
from scanner.check.patching import ReadVA, verify_text_changes
from scanner.check.pointers import PointerChange, idt_changes, rodata_changes
from scanner.check.reached import ReachedRange
from scanner.check.state import BootIdentity, PageRecord, VmState
from scanner.hashing import page_hashes
from scanner.vm.bootprofile import BootProfile
from store import GoldenRegion
from translate.vcpu import VcpuState
from translate.x86 import CR0_WP, CR4_LA57, CR4_SMAP, CR4_SMEP, PAGE

__all__ = ["Basis", "CheckReport", "Finding", "PageMismatch", "RegionVerdict",
           "Verification", "boot_identity", "verify"]

_ZSTD_MAX = 64 << 20


class Basis(enum.StrEnum):
    """What a page is checked against."""

    GOLDEN = "golden"
    PER_BOOT = "per-boot"
    ACCEPTED = "accepted"


@dataclass(frozen=True)
class PageMismatch:
    region: str
    page: int
    va: int
    gpa: int
    basis: Basis
    ranges: tuple[ByteRange, ...]
    symbol: str | None
    #: The keyed hash of the page's bytes now (not shown: hashes stay on the host). Tells
    #: a second change apart from one already reported even where the ranges show only
    #: their first bytes.
    content: int = 0
    #: `.rodata` words and IDT gates that changed, named (`scanner.check.pointers`).
    pointers: tuple[PointerChange, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"region": self.region, "page": self.page, "va": hex_addr(self.va),
                "gpa": hex_addr(self.gpa) if self.gpa >= 0 else None,  # -1: not translated
                "basis": self.basis, "symbol": self.symbol,
                "ranges": [r.to_json() for r in self.ranges],
                **({"pointers": [p.to_json() for p in self.pointers]}
                   if self.pointers else {})}


@dataclass(frozen=True)
class RegionVerdict:
    name: str
    size: int
    pages: int
    per_boot_pages: tuple[int, ...]
    accepted_pages: tuple[int, ...]
    mismatches: tuple[PageMismatch, ...]

    @property
    def golden_pages(self) -> int:
        return self.pages - len(self.per_boot_pages) - len(self.accepted_pages)

    def to_json(self) -> dict[str, Any]:
        return {"region": self.name, "size": self.size, "pages": self.pages,
                "golden_checked": self.golden_pages,
                "per_boot_checked": list(self.per_boot_pages),
                "accepted": list(self.accepted_pages),
                "mismatches": [m.to_json() for m in self.mismatches]}


@dataclass(frozen=True)
class Finding:
    """A problem that is not a page mismatch: W^X, control registers, IDT gates."""

    kind: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, **self.detail}


@dataclass(frozen=True)
class CheckReport:
    vm: str
    build_id: str
    release: str
    boot_profile: str
    slide: int
    regions: tuple[RegionVerdict, ...]
    findings: tuple[Finding, ...]
    per_vm_baseline_taken: bool
    #: The kernel's own verified patching of `.text` (None: none found).
    patches: PatchReport | None = None
    #: `--strict`: verified run-time patching is tampering too.
    strict: bool = False
    ts: float = field(default_factory=time.time)
    #: Executable kernel memory accounted for (`scanner.check.execmem.ExecScan`; None:
    #: not scanned — no guest memory reader, or a partial re-check).
    execmem: ExecScan | None = None

    @property
    def tampered(self) -> bool:
        return (bool(self.findings) or any(r.mismatches for r in self.regions)
                or (self.strict and self.patched))

    @property
    def patched(self) -> bool:
        """The kernel patched its own `.text` at run time (verified)."""
        return self.patches is not None and bool(self.patches.runtime)

    @property
    def mismatches(self) -> list[PageMismatch]:
        return [m for r in self.regions for m in r.mismatches]

    @property
    def hint(self) -> str | None:
        """When most of `.text` differs, the likeliest cause is a boot profile the key
        does not capture (kernel command line) — said, never assumed."""
        text = next((r for r in self.regions if r.name == ".text"), None)
        if text is not None and text.pages and len(text.mismatches) > text.pages // 4:
            return (f"{len(text.mismatches)} of {text.pages} .text pages differ: if this VM "
                    "booted with other kernel command-line options (mitigations=, ...) "
                    "than the verified one, baseline a verified VM booted like it")
        return None

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "result": "tampered" if self.tampered else "clean",
                "hint": self.hint,
                "build_id": self.build_id, "release": self.release,
                "boot_profile": self.boot_profile, "slide": hex_addr(self.slide),
                "per_vm_baseline_taken": self.per_vm_baseline_taken,
                "strict": self.strict,
                "patched": self.patches.to_json() if self.patches else None,
                "regions": [r.to_json() for r in self.regions],
                "findings": [f.to_json() for f in self.findings],
                **({"execmem": self.execmem.to_json()} if self.execmem else {})}


def boot_identity(lk: LiveKernel) -> BootIdentity:
    """What identifies one boot of a VM (see `BootIdentity`)."""
    return BootIdentity(lk.profile.build_id, lk.slide)


@dataclass(frozen=True)
class Verification:
    """A check's report and the VM's per-VM state after it (new when `fresh`)."""

    report: CheckReport
    state: VmState
    #: The state differs from the one given (fresh, or the patch verifiers' memory
    #: moved): store it.
    changed: bool = False
    #: Code outside `.text` the patch verifiers read (set by `scanner.examine`).
    reached: tuple[ReachedRange, ...] = ()


def control_findings(lk: LiveKernel, vcpus: Sequence[VcpuState],
                     boot: BootProfile | None) -> list[Finding]:
    out = []
    for r in lk.regions.values():
        for problem in r.wx_violations():
            out.append(Finding("wx_violation", problem, {"region": r.name}))
    idt = lk.regions["idt"]
    for v in vcpus:
        if not v.cr0 & CR0_WP:
            out.append(Finding("cr0_wp_clear", f"vCPU {v.index}: CR0.WP is clear: the kernel "
                               "can write read-only pages",
                               {"vcpu": v.index, "cr0": hex_addr(v.cr0)}))
        if boot is not None and boot.smep and not v.cr4 & CR4_SMEP:
            out.append(Finding("smep_disabled", f"vCPU {v.index}: CR4.SMEP is clear though "
                               "the CPU offers SMEP",
                               {"vcpu": v.index, "cr4": hex_addr(v.cr4)}))
        if boot is not None and boot.smap and not v.cr4 & CR4_SMAP:
            out.append(Finding("smap_disabled", f"vCPU {v.index}: CR4.SMAP is clear though "
                               "the CPU offers SMAP",
                               {"vcpu": v.index, "cr4": hex_addr(v.cr4)}))
        if v.idtr_base != idt.va or v.idtr_limit + 1 < idt.size:
            out.append(Finding("idtr_changed", f"vCPU {v.index}: IDTR {v.idtr_base:#x}/"
                               f"{v.idtr_limit:#x} is not the IDT kscan verifies "
                               f"({idt.va:#x})", {"vcpu": v.index,
                                                  "idtr_base": hex_addr(v.idtr_base),
                                                  "idtr_limit": v.idtr_limit}))
    for g in lk.idt_check.outside_text:
        out.append(Finding("idt_handler_outside_text", f"IDT gate {g.vector} handler "
                           f"{g.handler:#x} is outside kernel text",
                           {"vector": g.vector, "handler": hex_addr(g.handler)}))
    for g in lk.idt_check.bad_type:
        out.append(Finding("idt_gate_type", f"IDT gate {g.vector} has type {g.type:#x}",
                           {"vector": g.vector, "type": g.type}))
    return out


def _page_bytes(buf: bytes | bytearray, page: int) -> bytes:
    return bytes(buf[page * PAGE:(page + 1) * PAGE])


def _gpa_of(region: Region, offset: int) -> int:
    for r in region.translation.runs:
        if r.va <= region.va + offset < r.va + r.size:
            return r.gpa + (region.va + offset - r.va)
    return -1


def verify(
    vm: str,
    lk: LiveKernel,
    vcpus: Sequence[VcpuState],
    boot: BootProfile,
    normalized: Mapping[str, bytearray],
    golden: Mapping[str, GoldenRegion],
    golden_content: Callable[[str], bytes | None],
    vm_state: VmState | None,
    *,
    read_va: ReadVA | None = None,
    strict: bool = False,
    plain_va: ReadVA | None = None,
    read_data: ReadVA | None = None,
    trusted_modules: frozenset[str] = frozenset(),
) -> Verification:
    """Check one VM. Returns the report and the VM's (possibly new) per-VM state.

    `normalized` holds the regions' bytes with KASLR undone — all four, or (to re-check
    only regions known to have changed, within one boot) a subset: the report then has
    verdicts for those regions only. `golden_content(region)` returns the golden
    region's compressed bytes (only called on a mismatch; decompressed through
    `scanner.check.golden_bytes`, which keeps them for the checks that follow).

    `.text` pages that differ from the golden baseline are checked site by site against
    the kernel's own patching (`scanner.check.patching`; `read_va` reads guest memory
    for trampolines outside `.text`): a page whose every change verifies is patched,
    not tampered, unless `strict`. Each verified run-time patch is then attributed to
    its owner (`scanner.check.attribution`, reading the kernel's lists through
    `read_data`, default `read_va`): a patch owned by an unsigned module not in
    `trusted_modules`, or by nobody, is a `patch_owner` finding.
    """
    identity = boot_identity(lk)
    fresh = vm_state is None or vm_state.boot != identity
    if vm_state is None or fresh:
        vm_state = VmState(identity, boot.key)
    memory = PatchMemory.from_plain(vm_state.patching)
    facts = VmFacts(cpus=len(vcpus) or None,
                    la57=bool(vcpus[0].cr4 & CR4_LA57) if vcpus else None, now=time.time())
    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()
    golden_cache: dict[str, bytes] = {}

    def golden_bytes(name: str) -> bytes | None:
        if name not in golden_cache:
            blob = golden_content(name)
            golden_cache[name] = GOLDEN_BYTES.get(blob, _ZSTD_MAX) if blob else b""
        return golden_cache[name] or None

    patches: PatchReport | None = None
    owners: OwnerLookup | None = None  # built on the first changed pointer table
    names = [n for n in REGIONS if n in normalized]
    if fresh and len(names) != len(REGIONS):
        raise ValueError("the first check of a boot needs all four regions")
    verdicts = []
    for name in names:
        g = golden[name]
        buf = normalized[name]
        hashes = page_hashes(buf)
        region = lk.regions[name]
        per_boot = set(g.per_boot_pages())
        vm_per_boot = vm_state.per_boot.setdefault(name, {})
        accepted = vm_state.accepted.get(name, {})
        if fresh:
            for p in sorted(per_boot):
                if p < len(hashes):
                    vm_per_boot[p] = PageRecord(hashes[p], cctx.compress(_page_bytes(buf, p)))
        # Expected hash per page: golden, overridden by per-boot and accepted bases;
        # compared vectorised, so only mismatching pages cost Python time.
        got = np.array(hashes, dtype=np.uint64)
        want = np.zeros(len(hashes), dtype=np.uint64)
        n = min(g.pages, len(hashes))
        want[:n] = np.frombuffer(g.page_hashes, dtype="<u8", count=n)
        known = np.zeros(len(hashes), dtype=bool)
        known[:n] = True
        basis_of: dict[int, tuple[Basis, PageRecord | None]] = {}
        for p in per_boot:
            rec = vm_per_boot.get(p)
            # A page marked per-boot after this VM's per-VM baseline was taken has no
            # reading of its own: it stays on the golden basis.
            if p < len(hashes) and rec is not None:
                want[p] = rec.hash
                known[p] = True
                basis_of[p] = (Basis.PER_BOOT, rec)
        for p, rec in accepted.items():
            if 0 <= p < len(hashes):
                known[p] = True
                want[p] = rec.hash
                basis_of[p] = (Basis.ACCEPTED, rec)
        differ = np.flatnonzero((got != want) | ~known).tolist()
        unverified: dict[int, list[ByteRange]] | None = None
        if name == ".text" and (any(p not in basis_of for p in differ)
                                or memory.fixed_sites):
            # (Also with nothing changed when a pinned state may have been undone.)
            patches, unverified, memory = _verify_patching(
                lk, buf, golden_bytes(name), read_va, facts, memory,
                read_data or read_va, trusted_modules)
            # A pinned state undone leaves bytes equal to the golden baseline.
            differ = sorted(set(differ) | {p for p in unverified or () if p not in basis_of})
        elif name == ".text":
            # `.text` is the golden baseline's: what the first check of a boot pins is
            # the golden bytes (the pinned memory holds no values), and no half-state.
            memory = dataclasses.replace(memory, pinned=True, half={})
        mismatches = []
        for p in differ:
            basis, old = basis_of.get(p, (Basis.GOLDEN, None))
            if unverified is not None and basis is Basis.GOLDEN:
                if p not in unverified:
                    continue  # every change in the page is the kernel's own patching
                mismatches.append(_mismatch(lk, region, p, basis, tuple(unverified[p]),
                                            hashes[p]))
                continue
            if old is not None:
                before = dctx.decompress(old.data, max_output_size=PAGE)
            else:
                gb = golden_bytes(name)
                before = _page_bytes(gb, p) if gb else b""
            after = _page_bytes(buf, p)
            ranges = tuple(diff_ranges(before, after, name)) if before else ()
            pointers: tuple[PointerChange, ...] = ()
            owner_va = plain_va or read_va
            if name in (".rodata", "idt") and owner_va is not None and ranges:
                if owners is None:
                    owners = address_owners(owner_va, lk)
                pointers = (rodata_changes(owners, region.va + p * PAGE,
                                           lk.link_va(name, p * PAGE), before, ranges,
                                           owner_va) if name == ".rodata" else
                            idt_changes(owners, region.va, p, before, ranges, owner_va,
                                        lk.slide))
            mismatches.append(_mismatch(lk, region, p, basis, ranges, hashes[p], pointers))
        verdicts.append(RegionVerdict(
            name, len(buf), len(hashes),
            tuple(sorted(per_boot - set(accepted))),
            tuple(sorted(accepted)), tuple(mismatches)))
    report = CheckReport(vm, lk.profile.build_id, lk.profile.release, boot.key, lk.slide,
                         tuple(verdicts),
                         tuple(control_findings(lk, vcpus, boot) + owner_findings(patches)),
                         fresh,
                         patches=patches, strict=strict)
    plain = memory.to_plain()
    moved = plain != vm_state.patching
    vm_state.patching = plain
    return Verification(report, vm_state, fresh or moved)


def _mismatch(lk: LiveKernel, region: Region, p: int, basis: Basis,
              ranges: tuple[ByteRange, ...], content: int,
              pointers: tuple[PointerChange, ...] = ()) -> PageMismatch:
    first = ranges[0].start if ranges else 0
    symbol = None
    if region.name != "idt":
        symbol = lk.profile.symbolize(lk.link_va(region.name, p * PAGE + first))
    return PageMismatch(region.name, p, region.va + p * PAGE, _gpa_of(region, p * PAGE),
                        basis, ranges, symbol, content, pointers)


def owner_findings(patches: PatchReport | None, limit: int = 64) -> list[Finding]:
    """A `patch_owner` finding per (patched function, owner) the policy calls tampering:
    an unsigned module the operator does not trust, or code nobody owns. `symbol` is the
    function; the message names the first site `symbol+0xoff`."""
    attr = patches.attribution if patches is not None else None
    if attr is None:
        return []
    groups: dict[tuple[str, object], tuple[int, Any, Any]] = {}
    for s in attr.tampering():
        for o in s.owners:
            if judge(o) is not Trust.TAMPER:
                continue
            key = (s.function.split("+", 1)[0], o.key)
            n, first, _ = groups.get(key, (0, s, o))
            groups[key] = (n + 1, first, o)
    out = []
    for n, s, o in list(groups.values())[:limit]:
        if o.kind is OwnerKind.UNOWNED:
            why = "code no kernel text, listed module or BPF program holds" + (
                f" ({s.problem})" if s.problem else "")
        else:
            why = (f"module {o.name} is not signed (the kernel did not accept a signature) "
                   "and not trusted (--trust-module)")
        redirect = " (IPMODIFY: execution redirected)" if s.ipmodify else ""
        out.append(Finding(
            "patch_owner", f"{s.mechanism} hook on {s.function}{redirect} -> "
                           f"{o.describe()}: {why}",
            {"mechanism": s.mechanism, "symbol": s.function.split("+", 1)[0],
             "site": hex_addr(s.runtime),
             "handler": hex_addr(o.address), "owner": o.to_json(), "sites": n}))
    return out


def _verify_patching(lk: LiveKernel, text: bytearray, golden: bytes | None,
                     read_va: ReadVA | None, facts: VmFacts, memory: PatchMemory,
                     read_data: ReadVA | None = None, trusted: frozenset[str] = frozenset()
                     ) -> tuple[PatchReport | None, dict[int, list[ByteRange]] | None,
                                PatchMemory]:
    """Verify `.text`'s changes against the golden bytes as the kernel's own patching:
    the verified patches, the unverified ranges by page (None, None: the profile
    has no patch sites, so every change stays a plain mismatch), and the verifiers'
    memory for the next check of this boot."""
    prof = lk.profile
    if prof.patch_sites is None or golden is None or len(golden) != len(text):
        return None, None, memory
    base = prof.text.addr
    # ftrace direct calls are verifiable only where they can be attributed too.
    attributable = read_data is not None and attribution_off(prof) is None
    direct = (direct_lookup(prof, lk.slide, read_data)
              if attributable and read_data is not None else None)
    verdict = verify_text_changes(golden, text, base, lk.slide, prof.patch_sites, read_va,
                                  relocs=prof.relocs.get(".text"),
                                  optprobe_template=prof.optprobe_code or None,
                                  facts=facts, memory=memory, direct=direct)
    unverified = split_by_page(verdict, base)
    pages = sorted({(v.start - base) // PAGE for v in verdict.verified} - set(unverified))
    attribution: Attribution | None = None
    runtime = [v for v in verdict.verified if v.mechanism not in BOOT_TIME]
    if runtime and attributable and read_data is not None:
        attribution = attribute(prof, lk.slide, read_data, runtime, trusted)
    report = PatchReport(tuple(verdict.verified), tuple(pages), prof.symbolize, attribution)
    return (report if verdict.verified else None), unverified, verdict.memory

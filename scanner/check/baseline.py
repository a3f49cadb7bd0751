"""Golden baselines: hash a verified VM's protected regions, normalized for KASLR.

A golden baseline belongs to (kernel build id, boot profile) and is shared by every VM
of that kernel and boot profile. Per region it stores the keyed hash of the normalized
region, one keyed 64-bit hash per 4 KiB page (`scanner.hashing`), the set of per-boot
pages, and (compressed, in a separate table read only on mismatch) the normalized bytes,
to show what changed — and what the hashes are made again from when the key changes.

Per-boot pages — bytes the kernel writes once per boot, like `__ro_after_init` data at
the end of `.rodata` — are never learned from the VM being checked (an attacker would
hide there). They come from:

* symbols, when the profile has them: the `__start_ro_after_init` range;
* the kernel image and the verified VM: `.rodata` pages whose normalized bytes in the
  verified VM differ from the image file's (written at boot; measured: 47 pages, all in
  the last 7% of `.rodata`, on Debian 6.1);
* further verified boots: `kscan baseline` on a second verified VM of the same key
  merges into the baseline; `.rodata` pages that differ between verified boots become
  per-boot. Any other difference between two verified boots (`.text`, `__ex_table`,
  IDT) is refused: those VMs do not share a boot profile, or one of them is not clean.

Each VM's per-boot pages are checked against that VM's own first post-boot reading
(its per-VM baseline; see `scanner.check.verify`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zstandard

from scanner.check.locate import REGIONS, LiveKernel
from scanner.errors import VmStateError
from scanner.hashing import file_page_fingerprints, page_hashes, region_hash
from scanner.vm.bootprofile import BootProfile
from store import GoldenRegion
from translate import PAGE

__all__ = ["Capture", "GoldenBuild", "build_golden", "capture", "require_booted"]

#: At most this fraction of `.rodata` pages may be merged in as per-boot from a second
#: verified boot; more means the boots are not alike and the merge is refused.
MAX_RODATA_PER_BOOT = 0.10


@dataclass(frozen=True)
class Capture:
    """One verified VM's regions, normalized, with their page hashes."""

    data: dict[str, bytearray]
    pages: dict[str, list[int]]


def require_booted(lk: LiveKernel, vm: str) -> None:
    """A kernel has finished booting once mark_rodata_ro() made text and rodata
    read-only (it runs right before the first userspace process)."""
    problems = [v for r in lk.regions.values() for v in r.wx_violations()]
    if problems:
        raise VmStateError(f"kernel has not finished booting (or W^X is broken): "
                           f"{problems[0]}", vm=vm,
                           hint="wait until the guest runs userspace, then try again")


def capture(normalized: dict[str, bytearray]) -> Capture:
    """Page hashes of a verified VM's normalized regions."""
    return Capture(normalized, {name: page_hashes(normalized[name]) for name in REGIONS})


def per_boot_from_image(lk: LiveKernel, cap: Capture) -> set[int]:
    """`.rodata` pages this verified boot wrote (differ from the image), plus the
    `__ro_after_init` pages when symbols name them."""
    out: set[int] = set()
    file_pages = lk.profile.rodata_file_pages
    # Unkeyed on both sides: the image file and a verified VM (see scanner.hashing).
    for i, h in enumerate(file_page_fingerprints(cap.data[".rodata"])):
        if i < len(file_pages) and file_pages[i] != h:
            out.add(i)
    if lk.profile.ro_after_init:
        a, b = lk.profile.ro_after_init
        out.update(range(a // PAGE, (b + PAGE - 1) // PAGE))
    return out


@dataclass(frozen=True)
class GoldenBuild:
    regions: dict[str, GoldenRegion]
    contents: dict[str, bytes]
    merged_per_boot: dict[str, list[int]]  # pages newly marked per-boot by this merge
    boots: int


def build_golden(lk: LiveKernel, cap: Capture, boot: BootProfile, source_vm: str,
                 previous: dict[str, GoldenRegion] | None) -> GoldenBuild:
    """The golden baseline from one verified capture, merged into `previous` if any."""
    per_boot: dict[str, set[int]] = {name: set() for name in REGIONS}
    per_boot[".rodata"] = per_boot_from_image(lk, cap)
    merged: dict[str, list[int]] = {name: [] for name in REGIONS}
    boots = 1
    if previous is not None:
        for name in REGIONS:
            old = previous.get(name)
            if old is None or old.pages != len(cap.pages[name]):
                raise VmStateError(f"region {name} has a different size than the stored "
                                   "baseline's", vm=source_vm)
            known = set(old.per_boot_pages())
            # What changed between the verified boots, beyond the pages already known
            # to be per-boot. Not excused by this capture's own image-derived set: the
            # cap below must see every such page.
            differ = [i for i, h in enumerate(cap.pages[name])
                      if h != old.page_hash(i) and i not in known]
            if differ and name != ".rodata":
                raise VmStateError(
                    f"{name} differs from the stored verified baseline in {len(differ)} "
                    f"pages (first: page {differ[0]})", vm=source_vm,
                    hint="the two VMs differ in boot profile (CPU, vCPUs, kernel command "
                         "line) or one is not clean; baseline only known-good VMs")
            if len(differ) > MAX_RODATA_PER_BOOT * old.pages:
                raise VmStateError(f".rodata differs from the stored baseline in "
                                   f"{len(differ)} pages: too many to be per-boot data",
                                   vm=source_vm)
            per_boot[name] |= known | set(differ)
            merged[name] = differ
        boots = max(r.boots for r in previous.values()) + 1
    regions = {}
    contents = {}
    cctx = zstandard.ZstdCompressor(level=3)
    for name in REGIONS:
        meta: dict[str, Any] = {"slide": lk.slide, "source_vm": source_vm,
                                "boot_profile": boot.to_json()}
        regions[name] = GoldenRegion.build(
            size=len(cap.data[name]), region_hash=region_hash(cap.data[name]),
            page_hashes=cap.pages[name], per_boot_pages=sorted(per_boot[name]),
            boots=boots, meta=meta)
        contents[name] = cctx.compress(bytes(cap.data[name]))
    return GoldenBuild(regions, contents, merged, boots)

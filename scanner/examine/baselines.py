"""What a check compares against, from the database: kernel profiles and golden baselines.

The one place that loads profiles (`load_profiles`) and fetches the golden baseline of an
examined VM's (kernel build, boot profile) (`golden_for`), for one-shot commands and
`kscan run` alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from scanner.check.locate import REGIONS
from scanner.check.resume import digest
from scanner.errors import BaselineMissing, ProfileError, VmStateError
from scanner.examine.reading import Examined
from scanner.image.kernel_profile import KernelProfile
from scanner.vm import BootProfile
from store import GoldenRegion, Store

__all__ = ["GoldenSet", "golden_digest", "golden_for", "golden_regions", "load_profiles"]


@dataclass(frozen=True)
class GoldenSet:
    """The golden baseline of one (kernel build, boot profile): per-region hashes, and
    the normalized region bytes (zstd) read only to show what changed."""

    regions: dict[str, GoldenRegion]
    contents: dict[str, bytes | None]


async def load_profiles(st: Store, *, required: bool = True) -> list[KernelProfile]:
    """Every stored kernel profile; with `required`, ProfileError if there is none."""
    out = []
    for info in await st.list_profiles():
        row = await st.get_profile(info.build_id)
        if row is not None:
            out.append(KernelProfile.from_bytes(row.data))
    if not out and required:
        raise ProfileError("the database has no kernel profiles", vm=None,
                           hint="add the guests' kernel first: kscan profile add "
                                "/path/to/vmlinuz-RELEASE")
    return out


def golden_digest(regions: Mapping[str, GoldenRegion]) -> bytes:
    """sha256 of what a golden baseline compares: each region's size, region hash, page
    hashes and per-boot pages (another baseline, or one merged since, differs)."""
    parts: list[bytes] = []
    for name in sorted(regions):
        r = regions[name]
        parts += [name.encode(), r.size.to_bytes(8, "little"), r.region_hash,
                  r.page_hashes, r.per_boot]
    return digest(*parts)


async def golden_regions(st: Store, build_id: str,
                         boot: BootProfile) -> dict[str, GoldenRegion] | None:
    """The golden regions a check of this (build, boot profile) uses, as `golden_for`
    picks them (the boot profile's key, else kscan 0.1's); None if there are none."""
    golden = await st.get_golden(build_id, boot.key)
    if golden is None:
        golden = await st.get_golden(build_id, boot.legacy_key)
    return golden


async def golden_for(st: Store, ex: Examined) -> GoldenSet:
    """The golden baseline for an examined VM and its (compressed) region bytes."""
    build_id = ex.lk.profile.build_id
    key = ex.boot.key
    golden = await st.get_golden(build_id, key)
    if golden is None:  # stored by kscan 0.1, keyed on the exact vCPU count
        key = ex.boot.legacy_key
        golden = await st.get_golden(build_id, key)
    if golden is None:
        raise BaselineMissing(
            f"no golden baseline for kernel {ex.lk.profile.release} ({build_id[:12]}) with "
            f"boot profile {ex.boot.key}", vm=ex.vm,
            hint="baseline a verified VM of that kernel and CPU first: kscan baseline "
                 "--qmp SOCKET_OF_VERIFIED_VM")
    missing = [n for n in REGIONS if n not in golden]
    if missing:
        raise VmStateError(f"golden baseline lacks regions {missing}", vm=ex.vm)
    contents = {n: await st.get_golden_content(build_id, key, n) for n in REGIONS}
    return GoldenSet(golden, contents)

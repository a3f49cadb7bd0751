"""Verdict logic without VMs: `verify` on golden, per-boot and accepted pages, a partial
re-check, the typed per-VM state, and one page hash shared by profile and run time.

The kernel is a small synthetic LiveKernel (real Region/Translation/Run dataclasses,
a real KernelProfile); golden baselines are built with `build_golden`, as
`kscan baseline` does.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import xxhash
import zstandard

from scanner.check.baseline import build_golden, capture
from scanner.check.idt import IdtCheck
from scanner.check.kaslr import SlideMatch
from scanner.check.locate import REGIONS, LiveKernel, Region
from scanner.check.state import BootIdentity, PageRecord, VmState
from scanner.check.verify import Basis, Verification, verify
from scanner.hashing import file_page_fingerprints, page_hash, page_hashes
from scanner.image.kernel_profile import KernelProfile, SectionInfo
from scanner.image.relocs import RegionRelocs
from scanner.vm.bootprofile import BootProfile
from store import GoldenRegion
from translate import PAGE, Run, Translation
from translate.vcpu import VcpuState
from translate.x86 import CR0_WP

SLIDE = 0x2E00_0000
LINK = {".text": 0xFFFF_FFFF_8100_0000, ".rodata": 0xFFFF_FFFF_8200_0000,
        "__ex_table": 0xFFFF_FFFF_8230_0010}
SIZES = {".text": 16 * PAGE, ".rodata": 12 * PAGE, "__ex_table": PAGE + 100, "idt": PAGE}
IDT_VA = 0xFFFF_FE00_0000_0000
GPA = {".text": 0x100_0000, ".rodata": 0x200_0000, "__ex_table": 0x230_0010,
       "idt": 0x7000}
BOOT = BootProfile("qemu64-x86_64-cpu", "ab12", 2, smep=False, smap=False)
PER_BOOT = [9, 10]  # .rodata pages the verified boot wrote (differ from the image)


def make_profile(rodata_file: bytes) -> KernelProfile:
    sections = {n: SectionInfo(n, LINK[n], SIZES[n]) for n in LINK}
    return KernelProfile(
        build_id="b1d", release="6.1.0-test", version="Linux version 6.1.0-test",
        sections=sections, relocs={n: RegionRelocs.empty() for n in LINK},
        text_head=b"\0" * PAGE, ex_table=b"", symbols=((LINK[".text"], "_stext"),
                                                          (LINK[".text"] + 5 * PAGE, "vfs_read")),
        rodata_file_pages=tuple(file_page_fingerprints(rodata_file)))


def region(name: str, *, writable: bool = False, gpa_shift: int = 0) -> Region:
    va = IDT_VA if name == "idt" else LINK[name] + SLIDE
    run = Run(va, GPA[name] + gpa_shift, SIZES[name], PAGE, writable, False,
              nx=name != ".text")
    return Region(name, va, SIZES[name], Translation(va, SIZES[name], (run,), ()))


def kernel(profile: KernelProfile, *, slide: int = SLIDE, idt_gpa_shift: int = 0,
           writable_text: bool = False) -> LiveKernel:
    regions = {n: region(n) for n in REGIONS}
    regions["idt"] = region("idt", gpa_shift=idt_gpa_shift)
    regions[".text"] = region(".text", writable=writable_text)
    return LiveKernel(profile, SlideMatch(slide, GPA[".text"], 4096, 1.0, "b1d"), regions,
                      (), IdtCheck(256, 256, (), ()), True)


def vcpus(cr0: int = CR0_WP | 0x8000_0001) -> tuple[VcpuState, ...]:
    return tuple(VcpuState(i, cr0, 0x1000, 0x6E0, 0xD01, IDT_VA, 0xFFF, 0, 0x7F, 0, 0, False)
                 for i in range(2))


class World:
    """A verified boot (the golden baseline) and a VM of the same kernel to check."""

    def __init__(self) -> None:
        rnd = random.Random(7)
        self.data = {n: bytearray(rnd.randbytes(SIZES[n])) for n in REGIONS}
        rodata_file = bytes(self.data[".rodata"])
        for p in PER_BOOT:  # the verified boot wrote its __ro_after_init pages
            self.data[".rodata"][p * PAGE + 8] ^= 0xFF
        self.profile = make_profile(rodata_file)
        self.lk = kernel(self.profile)
        gb = build_golden(self.lk, capture(self.data), BOOT, "golden-vm", None)
        self.golden: dict[str, GoldenRegion] = gb.regions
        self.contents = gb.contents

    def vm_bytes(self) -> dict[str, bytearray]:
        """The VM being checked: same kernel; its own per-boot bytes."""
        out = {n: bytearray(b) for n, b in self.data.items()}
        for p in PER_BOOT:
            out[".rodata"][p * PAGE + 9] ^= 0x55
        return out

    def check(self, data: dict[str, bytearray], state: VmState | None,
              lk: LiveKernel | None = None, cpus: tuple[VcpuState, ...] | None = None
              ) -> Verification:
        return verify("vm7", lk or self.lk, cpus or vcpus(), BOOT, data, self.golden,
                      self.contents.get, state)


@pytest.fixture
def world() -> World:
    return World()


def test_a_clean_vm_takes_its_per_vm_baseline_on_the_first_check(world: World) -> None:
    v = world.check(world.vm_bytes(), None)
    assert not v.report.tampered
    assert v.report.per_vm_baseline_taken
    rod = next(r for r in v.report.regions if r.name == ".rodata")
    assert rod.per_boot_pages == tuple(PER_BOOT)
    assert rod.golden_pages == SIZES[".rodata"] // PAGE - len(PER_BOOT)
    # The VM's own per-boot bytes were recorded, by page number.
    assert sorted(v.state.per_boot[".rodata"]) == PER_BOOT
    assert v.state.per_boot[".rodata"][9].hash == page_hash(
        world.vm_bytes()[".rodata"][9 * PAGE:10 * PAGE])
    # Checked again with that state: clean, nothing new taken.
    again = world.check(world.vm_bytes(), v.state)
    assert not again.report.tampered and not again.report.per_vm_baseline_taken


def test_golden_page_changed_is_localized(world: World) -> None:
    data = world.vm_bytes()
    data[".text"][5 * PAGE + 0x10:5 * PAGE + 0x15] = b"\xe9\x11\x22\x33\x44"
    v = world.check(data, None)
    assert v.report.tampered
    (m,) = v.report.mismatches
    assert (m.region, m.page, m.basis) == (".text", 5, Basis.GOLDEN)
    assert m.va == LINK[".text"] + SLIDE + 5 * PAGE
    assert m.gpa == GPA[".text"] + 5 * PAGE
    assert m.symbol == "vfs_read+0x10"
    (r,) = m.ranges
    assert (r.start, r.end, r.after) == (0x10, 0x15, "e911223344")


def test_per_boot_page_changed_after_the_first_check(world: World) -> None:
    first = world.check(world.vm_bytes(), None).state
    data = world.vm_bytes()
    data[".rodata"][10 * PAGE + 100] ^= 1
    v = world.check(data, first)
    (m,) = v.report.mismatches
    assert (m.region, m.page, m.basis) == (".rodata", 10, Basis.PER_BOOT)
    assert m.ranges[0].start == 100
    # Per-boot pages are never learned from the VM being checked: one that changes
    # a golden .rodata page is tampered even on its first check.
    data = world.vm_bytes()
    data[".rodata"][3 * PAGE] ^= 1
    (m,) = world.check(data, None).report.mismatches
    assert (m.page, m.basis) == (3, Basis.GOLDEN)


def test_accepted_page_is_checked_against_what_was_accepted(world: World) -> None:
    state = world.check(world.vm_bytes(), None).state
    data = world.vm_bytes()
    data[".text"][2 * PAGE + 7] ^= 0xFF
    page = bytes(data[".text"][2 * PAGE:3 * PAGE])
    state.accepted[".text"] = {2: PageRecord(page_hash(page),
                                             zstandard.ZstdCompressor().compress(page))}
    v = world.check(data, state)
    assert not v.report.tampered
    text = next(r for r in v.report.regions if r.name == ".text")
    assert text.accepted_pages == (2,)
    # A further change to the accepted page is reported against the accepted bytes.
    data[".text"][2 * PAGE + 8] ^= 0xFF
    (m,) = world.check(data, state).report.mismatches
    assert (m.page, m.basis) == (2, Basis.ACCEPTED)
    assert [(r.start, r.end) for r in m.ranges] == [(8, 9)]


def test_partial_recheck_reports_only_the_regions_given(world: World) -> None:
    state = world.check(world.vm_bytes(), None).state
    data = world.vm_bytes()
    data[".text"][0] ^= 1
    partial = {".text": data[".text"]}
    v = world.check(partial, state)
    assert [r.name for r in v.report.regions] == [".text"]
    assert [m.page for m in v.report.mismatches] == [0]
    assert not v.report.per_vm_baseline_taken
    # The first check of a boot needs every region: nothing to compare per-boot with.
    with pytest.raises(ValueError, match="all four regions"):
        world.check(partial, None)


def test_a_new_boot_takes_a_new_per_vm_baseline(world: World) -> None:
    state = world.check(world.vm_bytes(), None).state
    rebooted = kernel(world.profile, slide=SLIDE + 0x20_0000)
    v = world.check(world.vm_bytes(), state, lk=rebooted)
    assert v.report.per_vm_baseline_taken
    assert v.state.boot.slide == SLIDE + 0x20_0000


def test_control_findings_without_page_changes(world: World) -> None:
    lk = kernel(world.profile, writable_text=True)
    v = world.check(world.vm_bytes(), None, lk=lk, cpus=vcpus(cr0=0x8000_0001))
    kinds = sorted(f.kind for f in v.report.findings)
    assert kinds == ["cr0_wp_clear", "cr0_wp_clear", "wx_violation"]
    assert v.report.tampered and not v.report.mismatches


def test_hint_when_most_of_text_differs(world: World) -> None:
    data = world.vm_bytes()
    for p in range(0, 16, 2):
        data[".text"][p * PAGE] ^= 1
    v = world.check(data, None)
    assert v.report.hint is not None and "8 of 16 .text pages" in v.report.hint
    assert world.check(world.vm_bytes(), None).report.hint is None


# -- typed per-VM state -------------------------------------------------------------------

def test_vm_state_round_trips_through_plain_data(world: World) -> None:
    state = world.check(world.vm_bytes(), None).state
    state.accepted[".text"] = {3: PageRecord(42, b"zz")}
    plain = state.to_plain()
    assert set(plain["per_boot"][".rodata"]) == {"9", "10"}  # JSON-able keys
    back = VmState.from_plain(plain)
    assert back == state
    assert back is not None and back.boot == BootIdentity("b1d", SLIDE)


@pytest.mark.parametrize("bad", [
    None, {}, {"boot": None}, [], "x",
    {"boot": {"build_id": "b", "slide": "zz"},
     "boot_profile": "k", "taken_at": 1.0},
    {"boot": {"build_id": "b", "slide": 1},
     "boot_profile": "k", "taken_at": 1.0, "per_boot": {".rodata": {"x": {}}}},
    {"boot": {"build_id": "b", "slide": 1},
     "boot_profile": "k", "taken_at": 1.0,
     "per_boot": {".rodata": {"1": {"hash": 1, "data": "not bytes"}}}},
])
def test_unreadable_stored_state_is_no_state(bad: object) -> None:
    assert VmState.from_plain(bad) is None


# -- one page hash ----------------------------------------------------------------------

def test_page_hash_at_profile_time_equals_page_hash_at_run_time() -> None:
    """The profile hashes the image file's .rodata; a check hashes guest memory read
    through memoryviews. The same bytes must give the same hashes both ways."""
    rnd = random.Random(3)
    rodata = rnd.randbytes(5 * PAGE + 123)
    prof = make_profile(rodata)
    # Run time: the bytes come out of guest memory as a view of a larger buffer.
    guest = memoryview(bytearray(b"\xcc" * 77 + rodata + b"\xcc" * 99))[77:77 + len(rodata)]
    assert list(prof.rodata_file_pages) == file_page_fingerprints(guest)
    assert list(prof.rodata_file_pages) == [
        xxhash.xxh3_64_intdigest(rodata[i:i + PAGE]) for i in range(0, len(rodata), PAGE)]
    # The keyed page hashes agree between views and copies too.
    assert page_hashes(guest) == page_hashes(rodata)
    # And a stored profile keeps them.
    assert KernelProfile.from_bytes(prof.to_bytes()).rodata_file_pages == prof.rodata_file_pages
    # Per-page and whole-buffer forms agree, numpy arrays included.
    arr = np.frombuffer(rodata, dtype=np.uint8)
    assert page_hashes(arr.data) == page_hashes(rodata)
    assert page_hash(rodata[:PAGE]) == page_hashes(rodata)[0]


def test_remapping_a_page_does_not_reset_the_per_boot_baseline(world: World) -> None:
    """Pointing the IDT (or any region) at an identical copy elsewhere must not make a
    check take a fresh per-VM baseline: that would launder a per-boot change."""
    state = world.check(world.vm_bytes(), None).state
    data = world.vm_bytes()
    data[".rodata"][PER_BOOT[0] * PAGE + 40] ^= 0x10
    (m,) = world.check(data, state).report.mismatches
    assert m.basis is Basis.PER_BOOT
    remapped = kernel(world.profile, idt_gpa_shift=0x10_0000)
    v = world.check(data, state, lk=remapped)
    assert not v.report.per_vm_baseline_taken
    assert [(m.page, m.basis) for m in v.report.mismatches] == [(PER_BOOT[0], Basis.PER_BOOT)]


# -- the kernel's own patching in a check ---------------------------------------------------

NOP5 = b"\x0f\x1f\x44\x00\x00"


def patched_world(world: World) -> tuple[World, int, int]:
    """The world's kernel with one jump-label site (a NOP5 at .text+0x3010 whose entry
    jumps to .text+0x3080) and the sites in its profile; returns the site offsets."""
    from scanner.image.patchsites import PatchSites

    site, target = 0x3010, 0x3080
    world.data[".text"][site:site + 5] = NOP5
    text = LINK[".text"]
    sites = PatchSites(
        jump_code=np.array([text + site], dtype=np.uint64),
        jump_target=np.array([text + target], dtype=np.uint64),
        jump_key=np.array([LINK[".rodata"] + 8], dtype=np.uint64),
        function_starts=np.array([text, text + 5 * PAGE], dtype=np.uint64))
    import dataclasses
    world.profile = dataclasses.replace(world.profile, patch_sites=sites)
    world.lk = kernel(world.profile)
    gb = build_golden(world.lk, capture(world.data), BOOT, "golden-vm", None)
    world.golden, world.contents = gb.regions, gb.contents
    return world, site, target


def _jmp(site: int, target: int) -> bytes:
    return b"\xe9" + (target - (site + 5)).to_bytes(4, "little", signed=True)


def test_a_verified_jump_label_flip_is_patching_not_tampering(world: World) -> None:
    w, site, target = patched_world(world)
    data = w.vm_bytes()
    data[".text"][site:site + 5] = _jmp(site, target)
    v = w.check(data, None)
    assert not v.report.tampered and v.report.mismatches == []
    assert v.report.patched and v.report.patches is not None
    assert v.report.patches.counts() == {"jump_label": 1}
    assert v.report.patches.pages == (site // PAGE,)
    doc = v.report.to_json()["patched"]
    assert doc["mechanisms"] == {"jump_label": 1}
    assert doc["sites"] == [{"mechanism": "jump_label", "symbol": "_stext", "count": 1}]
    # --strict: any run-time patching is tampering.
    strict = verify("vm7", w.lk, vcpus(), BOOT, data, w.golden, w.contents.get, None,
                    strict=True)
    assert strict.report.tampered and strict.report.to_json()["strict"]


def test_a_look_alike_and_a_byte_beside_a_verified_site_are_tampering(world: World) -> None:
    w, site, target = patched_world(world)
    data = w.vm_bytes()
    data[".text"][site:site + 5] = _jmp(site, target + 0x10)  # not the entry's target
    (m,) = w.check(data, None).report.mismatches
    assert (m.region, m.page) == (".text", site // PAGE)
    assert m.ranges[0].start == site % PAGE and m.ranges[0].kind  # the verifier's reason
    assert m.symbol == f"_stext+{site:#x}"
    # The right flip, plus one more byte changed in the same page: only that byte.
    data = w.vm_bytes()
    data[".text"][site:site + 5] = _jmp(site, target)
    data[".text"][site + 0x100] ^= 0xFF
    v = w.check(data, None)
    (m,) = v.report.mismatches
    assert [(r.start, r.end) for r in m.ranges] == [(site % PAGE + 0x100, site % PAGE + 0x101)]
    assert v.report.patches is not None and v.report.patches.counts() == {"jump_label": 1}


def test_without_patch_sites_every_text_change_is_a_mismatch(world: World) -> None:
    data = world.vm_bytes()
    data[".text"][0x3010:0x3015] = NOP5
    (m,) = world.check(data, None).report.mismatches
    assert m.page == 3 and world.check(data, None).report.patches is None


def test_patch_report_entries_and_pages_split() -> None:
    from scanner.check.patch_report import PatchReport, split_by_page
    from scanner.check.patching import PatchVerdict, UnverifiedRange, VerifiedPatch

    base = 0x1000_0000
    verified = tuple(VerifiedPatch("ftrace", base + i * 64, base + i * 64, base + i * 64 + 5,
                                   NOP5, b"\xe8" + bytes(4), "call ftrace_caller")
                     for i in range(300))
    verified += (VerifiedPatch("jump_label", base + 7, base + 7, base + 9, b"\x66\x90",
                               b"\xeb\x10", "jmp"),)
    names = {base + i * 64: f"f{i}" for i in range(300)}
    rep = PatchReport(verified, (0,), lambda a: names.get(a, f"f0+{a - base:#x}"))
    rows, more = rep.entries(limit=10)
    # Each mechanism gets its share: the one jump label is not crowded out.
    assert [r["mechanism"] for r in rows].count("jump_label") == 1
    assert len(rows) == 6 and more == 295
    assert rep.counts() == {"ftrace": 300, "jump_label": 1}
    # Fingerprints tell sets apart by their bytes.
    flipped = VerifiedPatch("jump_label", base + 7, base + 7, base + 9, b"\x66\x90",
                            b"\xeb\x20", "jmp")
    other = PatchReport((*verified[:-1], flipped), (0,), rep.symbolize)
    assert other.fingerprint() != rep.fingerprint()
    # An unverified range across a page boundary is reported in both pages.
    pv = PatchVerdict(unverified=[UnverifiedRange(base + PAGE - 2, base + PAGE + 3,
                                                  b"\x00" * 5, b"\xff" * 5, "not a site")])
    pages = split_by_page(pv, base)
    assert {p: [(r.start, r.end) for r in rs] for p, rs in pages.items()} == {
        0: [(PAGE - 2, PAGE)], 1: [(0, 3)]}
    assert pages[1][0].after == "ffffff" and pages[0][0].kind == "not a site"


def test_golden_text_is_decompressed_once_for_the_looks_that_follow_and_never_stale(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed `.text` is verified against the golden `.text` whole: the second look
    at the same change reuses the bytes the first decompressed, and a new golden baseline
    of the same kernel build is compared with its own bytes, never the kept ones."""
    import scanner.check.verify as verify_mod
    from scanner.check.golden_bytes import GoldenBytes

    kept = GoldenBytes()
    monkeypatch.setattr(verify_mod, "GOLDEN_BYTES", kept)
    w, site, target = patched_world(world)
    data = w.vm_bytes()
    data[".text"][site:site + 5] = _jmp(site, target)
    data[".text"][site + 0x200] ^= 0xFF
    first = w.check(data, None)
    second = w.check(data, first.state)
    assert (kept.misses, kept.hits) == (1, 1)
    for v in (first, second):
        (m,) = v.report.mismatches
        assert [(r.start, r.end) for r in m.ranges] == [(site % PAGE + 0x200,
                                                          site % PAGE + 0x201)]
    # Re-baselined: the same build's golden now holds the changed byte (as if a verified
    # VM had it). Compared with the kept bytes, the byte would still be a mismatch.
    rebased = {n: bytearray(b) for n, b in w.data.items()}
    rebased[".text"][site + 0x200] ^= 0xFF
    gb = build_golden(w.lk, capture(rebased), BOOT, "golden-vm-2", None)
    v = verify("vm7", w.lk, vcpus(), BOOT, data, gb.regions, gb.contents.get, None)
    assert kept.misses == 2
    assert not v.report.tampered and v.report.patches is not None
    assert v.report.patches.counts() == {"jump_label": 1}

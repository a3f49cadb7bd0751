"""scanner.check.baseline: per-boot pages from the kernel image, and the merge rules of
build_golden for a second verified boot. The LiveKernel is a light fake (slide and a
profile with rodata_file_pages / ro_after_init); page hashes are computed here from
their definitions (xxhash; AES-GMAC then AES) as the oracle."""

from __future__ import annotations

import hashlib
import hmac
import random
from types import SimpleNamespace
from typing import Any

import pytest
import xxhash
import zstandard
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from scanner import hashing
from scanner.check.baseline import (
    MAX_RODATA_PER_BOOT,
    Capture,
    GoldenBuild,
    build_golden,
    capture,
    per_boot_from_image,
)
from scanner.check.locate import REGIONS
from scanner.errors import VmStateError
from scanner.vm.bootprofile import BootProfile
from store import GoldenRegion

PAGE = 4096
SIZES = {".text": 8 * PAGE, ".rodata": 40 * PAGE, "__ex_table": PAGE + 1234, "idt": PAGE}
BOOT = BootProfile("qemu64-x86_64-cpu", "ab12", 2, smep=False, smap=False)
SLIDE = 0x1E00_0000


def file_hashes(buf: bytes | bytearray) -> list[int]:
    """The image file's unkeyed page fingerprints."""
    return [xxhash.xxh3_64_intdigest(bytes(buf[i:i + PAGE])) for i in range(0, len(buf), PAGE)]


def _oracle_keys() -> tuple[bytes, bytes]:
    master = hashing.current().master
    return tuple(hmac.new(master, b"kscan/" + label, hashlib.sha256).digest()  # type: ignore[return-value]
                 for label in (b"gmac", b"prp"))


def _outer(tag: bytes) -> bytes:
    enc = Cipher(algorithms.AES(_oracle_keys()[1]), modes.ECB()).encryptor()
    return enc.update(tag) + enc.finalize()


def hashes(buf: bytes | bytearray) -> list[int]:
    """Keyed page hashes, made here from the construction's definition: the AES-GMAC tag
    (fixed nonce) of the page, encrypted with the second AES key, its first 8 bytes."""
    gmac = AESGCM(_oracle_keys()[0])
    return [int.from_bytes(_outer(gmac.encrypt(b"kscan-page\0\0", b"", bytes(buf[i:i + PAGE])))[:8],
                           "little") for i in range(0, len(buf), PAGE)]


def region_oracle(buf: bytes | bytearray) -> bytes:
    return _outer(AESGCM(_oracle_keys()[0]).encrypt(b"kscan-region", b"", bytes(buf)))


def file_rodata() -> bytearray:
    rnd = random.Random(1)
    return bytearray(rnd.randbytes(SIZES[".rodata"]))


def image_regions() -> dict[str, bytearray]:
    rnd = random.Random(2)
    out = {name: bytearray(rnd.randbytes(n)) for name, n in SIZES.items()}
    out[".rodata"] = file_rodata()
    return out


def written(data: dict[str, bytearray], region: str, pages: list[int], tag: int
            ) -> dict[str, bytearray]:
    """A copy of `data` with a few bytes of each of `pages` of `region` changed."""
    out = {k: bytearray(v) for k, v in data.items()}
    for p in pages:
        out[region][p * PAGE + 17] ^= 0x80 | tag
        out[region][p * PAGE + 18] = tag
    return out


def cap(data: dict[str, bytearray]) -> Capture:
    return Capture(data, {name: hashes(data[name]) for name in REGIONS})


def live(file_pages: list[int] | tuple[int, ...] = (), ro_after_init: tuple[int, int] | None
         = None) -> Any:
    return SimpleNamespace(slide=SLIDE, profile=SimpleNamespace(
        rodata_file_pages=tuple(file_pages), ro_after_init=ro_after_init))


FILE_PAGES = file_hashes(file_rodata())
BOOT_WRITTEN = [36, 37, 39]  # pages this verified boot wrote (differ from the image)


def first_boot() -> dict[str, bytearray]:
    return written(image_regions(), ".rodata", BOOT_WRITTEN, 1)


# -- per_boot_from_image -----------------------------------------------------------------

def test_per_boot_from_image_exactly_the_pages_that_differ_from_the_file() -> None:
    c = cap(first_boot())
    assert per_boot_from_image(live(FILE_PAGES), c) == set(BOOT_WRITTEN)
    # An unchanged VM: nothing per-boot.
    assert per_boot_from_image(live(FILE_PAGES), cap(image_regions())) == set()


def test_per_boot_from_image_adds_ro_after_init_pages() -> None:
    c = cap(first_boot())
    # [5*PAGE+100, 7*PAGE+1) covers pages 5, 6, 7
    got = per_boot_from_image(live(FILE_PAGES, (5 * PAGE + 100, 7 * PAGE + 1)), c)
    assert got == {5, 6, 7, *BOOT_WRITTEN}
    # A page-aligned end does not spill into the next page.
    assert per_boot_from_image(live(FILE_PAGES, (10 * PAGE, 12 * PAGE)), c) == \
        {10, 11, *BOOT_WRITTEN}
    # Symbols only, no image hashes.
    assert per_boot_from_image(live((), (0, 1)), c) == {0}


def test_per_boot_from_image_short_file_hash_list() -> None:
    c = cap(first_boot())
    # Hashes only for the first 37 pages: page 36 compared, 37 and 39 not.
    assert per_boot_from_image(live(FILE_PAGES[:37]), c) == {36}
    assert per_boot_from_image(live(()), c) == set()


def test_capture_page_hashes_match_oracle() -> None:
    data = first_boot()
    c = capture(data)
    assert c.data is data
    for name in REGIONS:
        assert c.pages[name] == hashes(data[name])
    assert len(c.pages["__ex_table"]) == 2  # the short last page counts


# -- build_golden: first verified boot ----------------------------------------------------

def test_first_build() -> None:
    data = first_boot()
    g = build_golden(live(FILE_PAGES, (2 * PAGE, 3 * PAGE)), cap(data), BOOT, "vm-a", None)
    assert isinstance(g, GoldenBuild)
    assert g.boots == 1
    assert set(g.regions) == set(REGIONS) == set(g.contents)
    assert g.merged_per_boot == {name: [] for name in REGIONS}
    assert g.regions[".rodata"].per_boot_pages() == [2, *BOOT_WRITTEN]
    for name in (".text", "__ex_table", "idt"):
        assert g.regions[name].per_boot_pages() == []
    dctx = zstandard.ZstdDecompressor()
    for name in REGIONS:
        r = g.regions[name]
        assert r.size == SIZES[name]
        assert r.region_hash == region_oracle(data[name])
        assert r.page_hash_list() == hashes(data[name])
        assert r.boots == 1
        assert r.meta == {"slide": SLIDE, "source_vm": "vm-a", "boot_profile": BOOT.to_json()}
        assert dctx.decompress(g.contents[name]) == bytes(data[name])


def test_per_boot_bitmap_round_trip_through_golden_region() -> None:
    g = build_golden(live(FILE_PAGES, (5 * PAGE, 7 * PAGE)), cap(first_boot()), BOOT, "vm-a",
                     None)
    r = g.regions[".rodata"]
    want = {5, 6, *BOOT_WRITTEN}
    # 40 pages → 5 bytes; hand-packed: page p is bit p % 8 of byte p // 8
    bitmap = bytearray(5)
    for p in want:
        bitmap[p // 8] |= 1 << (p % 8)
    assert r.per_boot == bytes(bitmap) == bytes([0x60, 0, 0, 0, 0xB0])
    assert [p for p in range(r.pages) if r.is_per_boot(p)] == sorted(want)
    # Stored and read back as plain fields: the same region.
    again = GoldenRegion(size=r.size, region_hash=r.region_hash, page_hashes=r.page_hashes,
                         per_boot=r.per_boot, boots=r.boots, meta=r.meta)
    assert again == r and again.per_boot_pages() == sorted(want)


# -- build_golden: merging a second verified boot ------------------------------------------

def test_second_boot_without_file_hashes_merges_rodata_differences() -> None:
    lk = live(())  # no image hashes: differences between boots are what is learned
    g1 = build_golden(lk, cap(first_boot()), BOOT, "vm-a", None)
    assert g1.regions[".rodata"].per_boot_pages() == []
    second = written(first_boot(), ".rodata", [3, 36], 2)
    g2 = build_golden(lk, cap(second), BOOT, "vm-b", g1.regions)
    assert g2.boots == 2
    assert g2.merged_per_boot[".rodata"] == [3, 36]
    assert g2.merged_per_boot[".text"] == []
    assert g2.regions[".rodata"].per_boot_pages() == [3, 36]
    assert all(r.boots == 2 for r in g2.regions.values())
    assert g2.regions[".rodata"].meta["source_vm"] == "vm-b"
    # A third boot differing in a known per-boot page and a new one: only the new merges.
    third = written(second, ".rodata", [3, 20], 3)
    g3 = build_golden(lk, cap(third), BOOT, "vm-c", g2.regions)
    assert g3.boots == 3
    assert g3.merged_per_boot[".rodata"] == [20]
    assert g3.regions[".rodata"].per_boot_pages() == [3, 20, 36]


def test_second_identical_boot_merges_nothing() -> None:
    lk = live(FILE_PAGES)
    g1 = build_golden(lk, cap(first_boot()), BOOT, "vm-a", None)
    g2 = build_golden(lk, cap(first_boot()), BOOT, "vm-b", g1.regions)
    assert g2.boots == 2
    assert g2.merged_per_boot == {name: [] for name in REGIONS}
    assert g2.regions[".rodata"].per_boot_pages() == BOOT_WRITTEN
    # Boot-written pages differing between boots are already known: still fine.
    g3 = build_golden(lk, cap(written(first_boot(), ".rodata", BOOT_WRITTEN, 7)), BOOT,
                      "vm-c", g2.regions)
    assert g3.boots == 3 and g3.regions[".rodata"].per_boot_pages() == BOOT_WRITTEN


@pytest.mark.parametrize("region", [".text", "__ex_table", "idt"])
def test_second_boot_differing_outside_rodata_is_refused(region: str) -> None:
    lk = live(FILE_PAGES)
    g1 = build_golden(lk, cap(first_boot()), BOOT, "vm-a", None)
    bad = written(first_boot(), region, [0], 2)
    with pytest.raises(VmStateError) as ei:
        build_golden(lk, cap(bad), BOOT, "vm-evil", g1.regions)
    assert ei.value.vm == "vm-evil"
    assert region in str(ei.value) and "page 0" in str(ei.value)


def test_second_boot_with_too_many_rodata_differences_is_refused_without_file_hashes() -> None:
    lk = live(())
    g1 = build_golden(lk, cap(first_boot()), BOOT, "vm-a", None)
    limit = int(MAX_RODATA_PER_BOOT * SIZES[".rodata"] // PAGE)  # 4 of 40 pages
    ok = written(first_boot(), ".rodata", list(range(limit)), 2)
    assert build_golden(lk, cap(ok), BOOT, "vm-b", g1.regions).merged_per_boot[".rodata"] \
        == list(range(limit))
    bad = written(first_boot(), ".rodata", list(range(limit + 1)), 2)
    with pytest.raises(VmStateError, match=r"\.rodata differs .* 5 pages: too many"):
        build_golden(lk, cap(bad), BOOT, "vm-b", g1.regions)


def test_second_boot_with_different_region_size_is_refused() -> None:
    lk = live(FILE_PAGES)
    g1 = build_golden(lk, cap(first_boot()), BOOT, "vm-a", None)
    data = first_boot()
    data[".text"] += bytearray(PAGE)
    with pytest.raises(VmStateError, match=r"region \.text has a different size"):
        build_golden(lk, cap(data), BOOT, "vm-b", g1.regions)
    missing = {k: v for k, v in g1.regions.items() if k != "idt"}
    with pytest.raises(VmStateError, match="region idt"):
        build_golden(lk, cap(first_boot()), BOOT, "vm-b", missing)


def test_second_boot_with_file_hashes_reports_merged_pages() -> None:
    lk = live(FILE_PAGES)
    g1 = build_golden(lk, cap(first_boot()), BOOT, "vm-a", None)
    second = written(first_boot(), ".rodata", [3, 4], 2)
    g2 = build_golden(lk, cap(second), BOOT, "vm-b", g1.regions)
    assert g2.regions[".rodata"].per_boot_pages() == [3, 4, *BOOT_WRITTEN]  # true today
    assert g2.merged_per_boot[".rodata"] == [3, 4]


def test_second_boot_with_file_hashes_and_many_rodata_changes_is_refused() -> None:
    lk = live(FILE_PAGES)
    g1 = build_golden(lk, cap(first_boot()), BOOT, "vm-a", None)
    bad = written(first_boot(), ".rodata", list(range(20)), 2)
    with pytest.raises(VmStateError, match="too many"):
        build_golden(lk, cap(bad), BOOT, "vm-b", g1.regions)

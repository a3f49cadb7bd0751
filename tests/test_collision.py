"""The crafted XXH3 collision (issue 15 §1): an edit of `.text` that keeps the page's
xxh3_64 and the region's xxh3_128 under the public default secret — reported clean
forever by an unkeyed kscan — is `tamper` under keyed comparison, for `check` and `run`.
The forging is in `tests/xxh3_collision.py`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import xxhash

from scanner import hashing
from scanner.check.measure import read_normalized
from scanner.image.kernel_profile import KernelProfile
from tests.conftest import GuestPool, run
from tests.kscan_proc import RunProc, kscan, live_kernel, write_bytes
from tests.xxh3_collision import BLOCK, forge, lane, padding_words
from tools.guests import Guest, GuestSpec, ensure_kernel
from tools.tamper import write_guest

PAGE = 4096
RET1 = bytes.fromhex("b801000000c3")  # mov eax, 1; ret — capable() returning true


def synthetic_page() -> tuple[bytes, list[int], int]:
    rnd = random.Random(15)
    page = bytearray(rnd.randbytes(PAGE))
    free = [64 * 3 + 16, 64 * 9 + 16, 64 * 5 + 24, 64 * 14 + 24]
    for f in free:
        page[f:f + 8] = b"\xcc" * 8
    return bytes(page), free, 64 * 7 + 16


def test_the_forged_page_keeps_every_unkeyed_hash_but_no_keyed_one() -> None:
    page, free, target = synthetic_page()
    new = forge(page, target, RET1, free)
    assert new[target:target + 6] == RET1
    assert sum(a != b for a, b in zip(page, new, strict=True)) > 6
    # Today's scheme: page xxh3_64, region xxh3_128 (block-aligned in a larger region).
    assert xxhash.xxh3_64_intdigest(new) == xxhash.xxh3_64_intdigest(page)
    around = random.Random(2).randbytes(100 * BLOCK)
    assert (xxhash.xxh3_128_digest(around + new + around)
            == xxhash.xxh3_128_digest(around + page + around))
    # Keyed: every hash kscan compares now differs.
    assert hashing.page_hashes(new) != hashing.page_hashes(page)
    assert hashing.region_hash(around + new) != hashing.region_hash(around + page)
    assert hashing.fast_digest([around, new]) != hashing.fast_digest([around, page])
    assert hashing.keyed_digest([around, new]) != hashing.keyed_digest([around, page])


# -- on a real guest ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def guest(guests: GuestPool) -> Guest:
    (g,) = guests.boot(GuestSpec("xc", smp=1))
    return g


@pytest.fixture(scope="module")
def profile() -> KernelProfile:
    from scanner.image.kernel_profile import profile_from_path
    return profile_from_path(ensure_kernel().vmlinuz)


@pytest.fixture(scope="module")
def db(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("collision") / "kscan.db")
    r = kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", path)
    assert r.returncode == 0, r.stderr
    r = kscan("baseline", "--qmp", str(guest.qmp_aux), "--db", path)
    assert r.returncode == 0, r.stderr
    return path


def _forge_live(g: Guest, profile: KernelProfile) -> tuple[int, bytes, bytes]:
    """Find a block of the live `.text` with an editable code word and four int3 padding
    words in its lane pair (none a relocation or alternatives site: raw bytes equal
    normalized ones), forge, write it; return (page offset, old page, new page)."""
    async def go() -> tuple[int, bytes, bytes]:
        vm, lk = await live_kernel(g.qmp_aux, profile)
        try:
            raw = b"".join(bytes(vm.mem.view(a, n)) for a, n in lk.regions[".text"].runs)
            norm, _ = read_normalized(vm.mem, lk, ".text")
            plain = [o for o in range(0, len(raw) - 8, 8) if raw[o:o + 8] == norm[o:o + 8]]
            ok = set(plain)
            for block in range(4 * 64, (len(raw) - 2 * BLOCK) // BLOCK):
                pads = [o for o in padding_words(raw, block) if o in ok]
                for a in range(0, 8, 2):
                    la = [o for o in pads if lane(o) == a][:2]
                    lb = [o for o in pads if lane(o) == a + 1][:2]
                    if len(la) < 2 or len(lb) < 2:
                        continue
                    code = [o for o in range(block * BLOCK, (block + 1) * BLOCK, 8)
                            if lane(o) == a and o in ok and 0xCC not in raw[o:o + 8]
                            and raw[o:o + 8] != b"\0" * 8]
                    if not code:
                        continue
                    page = block * BLOCK // PAGE * PAGE
                    old = raw[page:page + PAGE]
                    new = forge(old, code[0] - page, RET1, [o - page for o in la + lb])
                    assert xxhash.xxh3_64_intdigest(new) == xxhash.xxh3_64_intdigest(old)
                    forged = raw[:page] + new + raw[page + PAGE:]
                    assert xxhash.xxh3_128_digest(forged) == xxhash.xxh3_128_digest(raw)
                    write_guest(vm, lk.regions[".text"].va + page, new)
                    after, _ = read_normalized(vm.mem, lk, ".text")
                    # Normalized (what the page hashes are of): the collision holds too.
                    assert after[page:page + PAGE] != norm[page:page + PAGE]
                    assert (xxhash.xxh3_64_intdigest(after[page:page + PAGE])
                            == xxhash.xxh3_64_intdigest(norm[page:page + PAGE]))
                    assert xxhash.xxh3_128_digest(after) == xxhash.xxh3_128_digest(norm)
                    return page, old, new
            raise AssertionError("no block with four padding words in one lane pair")
        finally:
            await vm.close()
    return run(go())


@pytest.mark.guest
def test_a_forged_xxh3_collision_in_live_text_is_tamper(guest: Guest, db: str,
                                                        profile: KernelProfile,
                                                        tmp_path: Path) -> None:
    proc = RunProc(["--qmp", str(guest.qmp), "--db", db, "--interval", "1",
                    "--forensics-dir", str(tmp_path / "f")], tmp_path / "run.err")
    written: tuple[int, bytes, bytes] | None = None
    try:
        proc.wait_for(lambda e: e["vm"] == "xc" and e["event"] == "vm_clean", 120)
        written = _forge_live(guest, profile)
        page = written[0]
        ev = proc.wait_for(lambda e: e["event"] == "tamper", 60)
        assert (".text", page // PAGE) in {(m["region"], m["page"]) for m in ev["mismatches"]}
        out = kscan("check", "--qmp", str(guest.qmp_aux), "--db", db, "--json")
        assert out.returncode == 1, out.stderr
        doc = json.loads(out.stdout)
        assert any(m["region"] == ".text" and m["page"] == page // PAGE
                   for r in doc["regions"] for m in r["mismatches"])
    finally:
        proc.stop()
        if written is not None:
            run(write_bytes(guest.qmp_aux, profile, ".text", written[0], written[1]))

"""Keyed comparison (issue 15 §1): the host key file, re-hashing when the key changes or
a database predates it, bundles without hashes, and the keyed fast pass's schedule."""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import stat
import struct
from pathlib import Path

import pytest
import xxhash
import zstandard

import store.schema
from scanner import hashing
from scanner.check.fastpath import KEYED_EVERY_S, FastOutcome, check_memory, keyed_due
from scanner.check.resume import FORMAT
from scanner.check.state import BootIdentity, PageRecord, VmState
from scanner.commands.cli import main
from scanner.examine.keying import keyed_store
from store import GoldenRecord, Store
from store.keyfile import KEY_SIZE, key_path, load_or_create
from store.schema import MIGRATIONS, SCHEMA_VERSION
from tests.test_bundle import exported, golden, keys, make_profile, read_all  # noqa: F401
from tests.test_unit_fastpath import World, world  # noqa: F401

BOOT = ("b1d", "qemu64-x86_64-cpu/ab12/pti0")


def _fill_old(db: Path, g: GoldenRecord) -> None:
    """A v3 database as an unkeyed kscan left it: xxh3 hashes, a VM state, a resume record."""
    async def go() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1d", "r", "v", make_profile().to_bytes())
            old = {n: type(r).build(size=r.size, region_hash=xxhash.xxh3_128_digest(b"x"),
                                    page_hashes=[1] * r.pages, boots=r.boots, meta=r.meta,
                                    per_boot_pages=r.per_boot_pages())
                   for n, r in g.regions.items()}
            await st.put_golden(g.build_id, g.boot_profile, old, "vm", contents=g.contents)
            await st.put_vm_state("vm-a", {"x": 1})
            await st.put_resume("vm-a", b'{"format": 1}')
    asyncio.run(go())


def test_the_key_file_is_made_once_private_and_reused(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "kscan.db"
    db.touch()
    key, created = load_or_create(db)
    assert created and len(key) == KEY_SIZE
    st = os.stat(key_path(db))
    assert stat.S_IMODE(st.st_mode) == 0o600 and key_path(db).name == "kscan.db.key"
    assert load_or_create(db) == (key, False)
    # Readable by others: refused (it may be known), never used.
    os.chmod(key_path(db), 0o640)
    with pytest.raises(Exception, match="readable by others"):
        load_or_create(db)
    os.chmod(key_path(db), 0o600)
    # A symlink in its place is not followed.
    other = tmp_path / "other.db"
    os.symlink(tmp_path / "elsewhere", key_path(other))
    with pytest.raises(Exception, match="hash key"):
        load_or_create(other)
    assert not (tmp_path / "elsewhere").exists()
    # `kscan key show` says where, never what.
    assert main(["key", "show", "--db", str(db)]) == 0
    out = capsys.readouterr()
    assert str(key_path(db)) in out.out and key.hex() not in out.out + out.err


def test_an_old_database_is_rehashed_from_content_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "kscan.db"
    g = golden()
    # Made by a v3 kscan: the later migrations run, then the re-hash.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store.schema, "MIGRATIONS", MIGRATIONS[:3])
        _fill_old(db, g)
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone() == (3,)
    capsys.readouterr()

    async def open_twice() -> tuple[GoldenRecord | None, object, bytes | None]:
        async with keyed_store(db) as st:
            assert st.schema_version == SCHEMA_VERSION
        async with keyed_store(db) as st:
            return (await st.get_golden_record(*BOOT), await st.get_vm_state("vm-a"),
                    await st.get_resume("vm-a"))
    rec, state, resume = asyncio.run(open_twice())
    err = capsys.readouterr().err
    assert err.count("re-hashed 1 golden baselines") == 1, err   # said once
    assert state is None and resume is None
    assert rec is not None
    want = golden()   # under the key now installed: this database's
    for name, r in rec.regions.items():
        assert r.page_hashes == want.regions[name].page_hashes
        assert r.region_hash == want.regions[name].region_hash
        assert r.per_boot == g.regions[name].per_boot


def test_rotate_rehashes_baselines_and_per_vm_states(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "kscan.db"
    g = golden()
    _fill_old(db, g)
    asyncio.run(read_all(db))
    assert main(["key", "show", "--db", str(db)]) == 0
    before = asyncio.run(read_all(db))[1][BOOT]
    old_key = key_path(db).read_bytes()

    page = bytes(range(256)) * 16
    cctx = zstandard.ZstdCompressor()

    async def put_states() -> None:
        async with keyed_store(db) as st:
            vs = VmState(BootIdentity("b1d", 0x1000000), BOOT[1])
            vs.per_boot[".rodata"] = {9: PageRecord(hashing.page_hash(page), cctx.compress(page))}
            vs.accepted[".text"] = {2: PageRecord(hashing.page_hash(page[::-1]),
                                                  cctx.compress(page[::-1]))}
            await st.put_vm_state("vm-a", vs.to_plain())
            await st.put_resume("vm-a", b"record")
            await st.put_vm_state("vm-b", {"x": 2})   # not a state: dropped
    asyncio.run(put_states())
    assert main(["key", "rotate", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "re-hashed 1 golden baselines" in out and "1 per-VM states" in out, out
    assert "dropped 1 unreadable" in out, out
    assert key_path(db).read_bytes() != old_key
    assert stat.S_IMODE(os.stat(key_path(db)).st_mode) == 0o600
    after = asyncio.run(read_all(db))[1][BOOT]
    assert after.contents == before.contents
    assert all(after.regions[n].page_hashes != r.page_hashes for n, r in before.regions.items())
    assert after.regions[".text"].page_hash_list() == hashing.page_hashes(
        zstandard.ZstdDecompressor().decompress(after.contents[".text"]))

    async def states() -> tuple[object, ...]:
        async with keyed_store(db) as st:
            return (await st.get_vm_state("vm-a"), await st.get_vm_state("vm-b"),
                    await st.get_resume("vm-a"))
    a, b, resume = asyncio.run(states())
    assert b is None and resume is None
    # The per-VM state kept its readings, hashed again under the new key from their bytes.
    vs = VmState.from_plain(a)
    assert vs is not None
    assert vs.per_boot[".rodata"][9].hash == hashing.page_hash(page)
    assert vs.accepted[".text"][2].hash == hashing.page_hash(page[::-1])


def test_a_bundle_carries_content_and_no_hash_nor_key(tmp_path: Path,
                                                      exported: Path) -> None:  # noqa: F811
    blob = exported.read_bytes()
    db_a = tmp_path / "a.db"
    key = key_path(db_a).read_bytes()
    rec = asyncio.run(read_all(db_a))[1][BOOT]
    raw = zstandard.ZstdDecompressor().decompress(
        blob[24 + struct.unpack_from("<I", blob, 12)[0]:-64])
    assert key not in raw and key not in blob
    for r in rec.regions.values():
        assert r.region_hash not in raw and r.page_hashes[:8] not in raw
    for content in rec.contents.values():
        assert content in raw


def test_a_fast_collision_is_caught_by_the_keyed_pass(world: World) -> None:  # noqa: F811
    ref, mem = world.ref, world.mem
    clean = check_memory(ref, mem, keyed=True)
    assert clean.ok and clean.keyed and not check_memory(ref, mem, keyed=False).keyed
    # As if the bytes had changed in a way the seeded xxh3 missed: the keyed half differs.
    ref.set_digests({".text": ref.digests[".text"][:16] + bytes(16)})
    # A pass is keyed once `every` seconds have gone by since the last keyed one: at a
    # 10 s period and every=60, passes 6 and 12 (the first from a phase set at t=0).
    ref.keyed_due = 60.0
    outcomes = [check_memory(ref, mem, every=60, now=10.0 * k).outcome for k in range(1, 13)]
    assert outcomes == ([FastOutcome.UNCHANGED] * 5 + [FastOutcome.BYTES_CHANGED]) * 2
    # A keyed pass that found the change does not postpone the next one: the slow path
    # makes a new reference; were it not made, the schedule would still hold.
    assert ref.keyed_due == 120.0 + 60
    # The default bound holds at any period: at 1 s, one keyed pass per KEYED_EVERY_S.
    ref.keyed_due = None
    outcomes = [check_memory(ref, mem, now=float(t)).outcome
                for t in range(1, int(2 * KEYED_EVERY_S) + 2)]
    assert outcomes.count(FastOutcome.BYTES_CHANGED) in (2, 3)
    assert FastOutcome.BYTES_CHANGED in outcomes[:int(KEYED_EVERY_S) + 1]
    keyed = check_memory(ref, mem, keyed=True)
    assert keyed.changed == (".text",) and keyed.keyed   # (the scheduler is told)
    assert not check_memory(ref, mem, keyed=False).keyed
    assert FORMAT >= 2   # resume records of the unkeyed format (1) are not used


def test_a_second_change_past_the_shown_bytes_is_a_new_tampering() -> None:
    from types import SimpleNamespace

    from scanner.check.classify import MAX_SHOWN, ByteRange
    from scanner.check.verify import Basis, PageMismatch
    from scanner.run.watcher import _change_set

    page = bytearray(range(256)) * 16
    shown = bytes(page[:MAX_SHOWN]).hex()

    def report(content: bytes) -> SimpleNamespace:
        m = PageMismatch(".text", 3, 0xFFFF_FFFF_8100_3000, 0x3000, Basis.GOLDEN,
                         (ByteRange(0, 64, "00" * MAX_SHOWN, shown, "overwritten code"),),
                         None, hashing.page_hash(content))
        return SimpleNamespace(mismatches=[m], findings=[], strict=False, patches=None)

    again = bytearray(page)
    again[40] ^= 0xFF   # past the shown bytes, inside the same range
    assert _change_set(report(bytes(page))) == _change_set(report(bytes(page)))
    assert _change_set(report(bytes(page))) != _change_set(report(bytes(again)))
    assert "content" not in report(bytes(page)).mismatches[0].to_json()


def test_a_fleets_keyed_passes_are_spread_over_the_sweeps(world: World) -> None:  # noqa: F811
    """References start at a random phase of the keyed schedule, so VMs checked at the
    same time do not all take their (4-6x as costly) keyed pass in the same sweep; each
    still gets one within `every` seconds (plus one period)."""
    from scanner.check.fastpath import Reference

    def fresh() -> Reference:
        return Reference(views={}, digests={}, fingerprint=world.ref.fingerprint,
                         top_index=(), top_values=(), control=())

    every, period, n = 64.0, 4.0, 400
    fleet = [fresh() for _ in range(n)]
    # Sweeps of the fleet at a 4 s period from t=0 (all checked then): 16 sweeps span
    # `every`; each VM's keyed passes fall in distinct sweeps, spread.
    keyed_at: list[list[int]] = [[] for _ in range(n)]
    per_sweep = []
    for k in range(1, 49):
        now = k * period
        hits = 0
        for i, r in enumerate(fleet):
            if keyed_due(r, every, now):
                r.keyed_due = now + every   # as check_memory does after comparing keyed
                keyed_at[i].append(k)
                hits += 1
        per_sweep.append(hits)
    assert max(per_sweep) < n / (every / period) * 2.5     # no sweep ~all keyed
    for ks in keyed_at:   # each VM keyed within every + one period, then every `every`
        assert ks and ks[0] * period <= every + period
        assert all(b - a == every / period for a, b in itertools.pairwise(ks))
    # A reload that shortens `every` takes effect at once (not after the old due time).
    r = fresh()
    assert not keyed_due(r, 3600.0, now=0.0)
    r.keyed_due = 3000.0
    keyed_due(r, 10.0, now=0.0)
    assert r.keyed_due <= 10.0

"""Tests of `store`: real SQLite files in tmp_path, checked with the plain sqlite3 module.

pytest-asyncio is not used: each test runs its coroutine with `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import store.codec
import store.schema
from kscan.errors import KscanError
from store import (
    SCHEMA_VERSION,
    EventRow,
    GoldenRegion,
    ProfileInfo,
    SchemaError,
    Store,
    StoreError,
    default_db_path,
)
from store.schema import APPLICATION_ID, MIGRATIONS, Migration

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
U64_MAX = 2**64 - 1

# A worker thread reporting to a closed loop, or a connection never closed, fails the test.
pytestmark = [
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("error::ResourceWarning"),
]


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await fn()
    return asyncio.run(main())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kscan.db"


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test must leave no aiosqlite worker thread behind."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            break
        time.sleep(0.01)
    assert not extra, f"threads left running: {extra}"


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def region(seed: int, pages: int = 5, per_boot: tuple[int, ...] = (),
           boots: int = 1) -> GoldenRegion:
    hashes = [(seed * 0x9E3779B97F4A7C15 + i) % 2**64 for i in range(pages)]
    if pages:
        hashes[-1] = U64_MAX
    return GoldenRegion.build(size=pages * 4096 - 100, region_hash=bytes([seed]) * 16,
                              page_hashes=hashes, per_boot_pages=per_boot, boots=boots,
                              meta={"slide": 0x28E00000, "first": b"\x90\x90"})


# --------------------------------------------------------------------- profiles

def test_profiles_round_trip_and_duplicate_is_a_no_op(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            assert await st.add_profile("aa11", "6.1.0-56-cloud-amd64", "#1 SMP", b"\x00P1")
            assert not await st.add_profile("aa11", "other", "other", b"replaced?")
            assert await st.add_profile("bb22", "6.1.0-56-cloud-amd64", "#2 SMP", b"P2" * 500)
            assert await st.add_profile("cc33", "6.12.1", "#1", b"")

            p = await st.get_profile("aa11")
            assert p is not None
            assert (p.build_id, p.release, p.version, p.data) == (
                "aa11", "6.1.0-56-cloud-amd64", "#1 SMP", b"\x00P1")
            assert abs(p.added_at - time.time()) < 60
            assert await st.get_profile("nope") is None

            listed = await st.list_profiles()
            assert [type(i) for i in listed] == [ProfileInfo] * 3
            assert {i.build_id: i.size for i in listed} == {"aa11": 3, "bb22": 1000, "cc33": 0}

            found = await st.find_profiles_by_release("6.1.0-56-cloud-amd64")
            assert sorted(r.build_id for r in found) == ["aa11", "bb22"]
            assert {r.build_id: r.data for r in found}["bb22"] == b"P2" * 500
            assert await st.find_profiles_by_release("5.10") == []
    run(body)
    assert raw(db).execute("SELECT count(*) FROM profile").fetchone() == (3,)


# ---------------------------------------------------------------- golden baselines

def test_golden_round_trip_and_replacement(db: Path) -> None:
    regions = {".text": region(1, pages=3586, per_boot=()),
               ".rodata": region(2, pages=993, per_boot=tuple(range(980, 993)), boots=3),
               "__ex_table": region(3, pages=2),
               "idt": region(4, pages=1)}

    async def body() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1", "6.1", "#1", b"p")
            assert await st.get_golden("b1", "4cpu") is None
            await st.put_golden("b1", "4cpu", regions, source_vm="vm-verified")
            got = await st.get_golden("b1", "4cpu")
            assert got == regions
            assert got is not None
            ro = got[".rodata"]
            assert ro.pages == 993 and ro.boots == 3
            assert ro.per_boot_pages() == list(range(980, 993))
            assert ro.is_per_boot(992) and not ro.is_per_boot(979)
            assert ro.page_hash(992) == U64_MAX
            assert ro.page_hash_list() == regions[".rodata"].page_hash_list()
            assert got["idt"].meta == {"slide": 0x28E00000, "first": b"\x90\x90"}

            (info,) = await st.list_golden()
            assert (info.build_id, info.boot_profile, info.source_vm) == ("b1", "4cpu",
                                                                          "vm-verified")
            assert info.regions == (".rodata", ".text", "__ex_table", "idt")

            # Replacing drops regions the new baseline lacks.
            await st.put_golden("b1", "4cpu", {".text": region(9)}, source_vm="vm-b")
            assert await st.get_golden("b1", "4cpu") == {".text": region(9)}
            await st.put_golden("b1", "1cpu", {"idt": region(5)}, source_vm="vm-c")
            listed = {(i.boot_profile, i.source_vm, i.regions) for i in await st.list_golden()}
            assert listed == {("4cpu", "vm-b", (".text",)), ("1cpu", "vm-c", ("idt",))}
    run(body)
    assert raw(db).execute("SELECT count(*) FROM golden_region").fetchone() == (2,)


def test_golden_needs_its_profile(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            with pytest.raises(StoreError) as ei:
                await st.put_golden("unknown", "p", {".text": region(1)}, source_vm="vm")
            assert ei.value.operation == "put_golden"
            assert ei.value.sqlite_error == "SQLITE_CONSTRAINT_FOREIGNKEY"
            assert "profile" in ei.value.hint
            assert await st.list_golden() == []
    run(body)


def test_failed_put_golden_keeps_the_old_baseline(db: Path) -> None:
    old = {".text": region(1), ".rodata": region(2)}
    bad = region(3)
    object.__setattr__(bad, "boots", 0)    # slip past validation: the CHECK must refuse it

    async def body() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1", "r", "v", b"")
            await st.put_golden("b1", "p", old, source_vm="vm-a")
            with pytest.raises(StoreError) as ei:
                # ".text" is written before ".xbad" fails: the whole put must roll back.
                await st.put_golden("b1", "p", {".text": region(7), ".xbad": bad},
                                    source_vm="vm-b")
            assert ei.value.sqlite_error == "SQLITE_CONSTRAINT_CHECK"
            assert await st.get_golden("b1", "p") == old
            assert [i.source_vm for i in await st.list_golden()] == ["vm-a"]
            # The connection is not left inside a transaction.
            await st.put_golden("b1", "p", {".text": region(8)}, source_vm="vm-c")
            assert await st.get_golden("b1", "p") == {".text": region(8)}
    run(body)


def test_golden_region_validation() -> None:
    good = region(1, pages=9, per_boot=(8,))
    assert good.per_boot == b"\x00\x01"
    with pytest.raises(ValueError, match="region_hash"):
        GoldenRegion(size=1, region_hash=b"x" * 15, page_hashes=b"", per_boot=b"", boots=1)
    with pytest.raises(ValueError, match="multiple of 8"):
        GoldenRegion(size=1, region_hash=bytes(16), page_hashes=b"1234567", per_boot=b"",
                     boots=1)
    with pytest.raises(ValueError, match="per_boot must be 2 bytes"):
        GoldenRegion(size=1, region_hash=bytes(16), page_hashes=bytes(8 * 9),
                     per_boot=b"\x00", boots=1)
    with pytest.raises(ValueError, match="past page 8"):
        GoldenRegion(size=1, region_hash=bytes(16), page_hashes=bytes(8 * 9),
                     per_boot=b"\x00\x02", boots=1)
    with pytest.raises(ValueError, match="boots"):
        GoldenRegion(size=1, region_hash=bytes(16), page_hashes=b"", per_boot=b"", boots=0)
    with pytest.raises(ValueError, match="per-boot page 9"):
        GoldenRegion.build(size=1, region_hash=bytes(16), page_hashes=[0] * 9,
                           per_boot_pages=[9])


def test_put_golden_refuses_bad_arguments_without_writing(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1", "r", "v", b"")
            with pytest.raises(ValueError, match="at least one region"):
                await st.put_golden("b1", "p", {}, source_vm="vm")
            with pytest.raises(TypeError, match="GoldenRegion"):
                await st.put_golden("b1", "p", {".text": {"size": 1}},  # type: ignore[dict-item]
                                    source_vm="vm")
            assert await st.list_golden() == []
    run(body)


def test_golden_content_round_trip_and_not_read_by_get_golden(db: Path) -> None:
    regions = {".text": region(1, pages=800), ".rodata": region(2), "idt": region(3, pages=1)}
    text = os.urandom(3 * 1024 * 1024)          # several MB, incompressible
    contents = {".text": text, "idt": b""}      # ".rodata" has none; empty bytes are kept

    async def body() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1", "6.1", "#1", b"p")
            assert await st.get_golden_content("b1", "4cpu", ".text") is None
            await st.put_golden("b1", "4cpu", regions, source_vm="vm-a", contents=contents)
            got = await st.get_golden_content("b1", "4cpu", ".text")
            assert type(got) is bytes and got == text
            assert await st.get_golden_content("b1", "4cpu", "idt") == b""
            assert await st.get_golden_content("b1", "4cpu", ".rodata") is None
            assert await st.get_golden_content("b1", "4cpu", "nope") is None
            assert await st.get_golden_content("b1", "1cpu", ".text") is None
            assert await st.get_golden_content("b2", "4cpu", ".text") is None

            # get_golden (and list_golden) must not touch golden_content at all: with
            # reads of that table denied by an authorizer, they still work.
            def deny_content(action: int, arg1: str | None, *_: object) -> int:
                if action == sqlite3.SQLITE_READ and arg1 == "golden_content":
                    return sqlite3.SQLITE_DENY
                return sqlite3.SQLITE_OK
            await st._conn.set_authorizer(deny_content)
            try:
                assert await st.get_golden("b1", "4cpu") == regions
                assert [i.regions for i in await st.list_golden()] == [
                    (".rodata", ".text", "idt")]
                with pytest.raises(StoreError):     # the authorizer does bite
                    await st.get_golden_content("b1", "4cpu", ".text")
            finally:
                await st._conn.set_authorizer(None)
            assert await st.get_golden_content("b1", "4cpu", ".text") == text
    run(body)
    con = raw(db)
    assert con.execute("SELECT name, typeof(data), length(data) FROM golden_content"
                       " ORDER BY name").fetchall() == [(".text", "blob", len(text)),
                                                        ("idt", "blob", 0)]


def test_golden_content_is_replaced_with_its_baseline(db: Path) -> None:
    regions = {".text": region(1), ".rodata": region(2)}

    async def body() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1", "r", "v", b"")
            await st.put_golden("b1", "p", regions, source_vm="vm-a",
                                contents={".text": b"old text", ".rodata": b"old ro"})
            await st.put_golden("b1", "q", regions, source_vm="vm-a",
                                contents={".text": b"other profile"})
            # A new baseline replaces the contents: changed, dropped, added.
            await st.put_golden("b1", "p", {".text": region(5), "idt": region(6)},
                                source_vm="vm-b", contents={"idt": b"new idt"})
            assert await st.get_golden_content("b1", "p", ".text") is None
            assert await st.get_golden_content("b1", "p", ".rodata") is None
            assert await st.get_golden_content("b1", "p", "idt") == b"new idt"
            await st.put_golden("b1", "p", {"idt": region(6)}, source_vm="vm-c",
                                contents={"idt": b"newer idt"})
            assert await st.get_golden_content("b1", "p", "idt") == b"newer idt"
            # Without contents, the old ones go too: never paired with another's bytes.
            await st.put_golden("b1", "p", {"idt": region(6)}, source_vm="vm-d")
            assert await st.get_golden_content("b1", "p", "idt") is None
            await st.put_golden("b1", "p", {"idt": region(6)}, source_vm="vm-e", contents={})
            assert await st.get_golden_content("b1", "p", "idt") is None
            # Other baselines are left alone.
            assert await st.get_golden_content("b1", "q", ".text") == b"other profile"
    run(body)
    con = raw(db)
    assert con.execute("SELECT build_id, boot_profile, name FROM golden_content").fetchall() \
        == [("b1", "q", ".text")]
    # Deleting a baseline by hand cascades to its contents.
    con.execute("PRAGMA foreign_keys = ON")
    con.execute("DELETE FROM golden_region WHERE boot_profile = 'q'")
    con.execute("DELETE FROM golden WHERE boot_profile = 'q'")
    assert con.execute("SELECT count(*) FROM golden_content").fetchone() == (0,)


def test_failed_put_golden_keeps_the_old_contents(db: Path) -> None:
    bad = region(3)
    object.__setattr__(bad, "boots", 0)    # slip past validation: the CHECK must refuse it

    async def body() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1", "r", "v", b"")
            await st.put_golden("b1", "p", {".text": region(1)}, source_vm="vm-a",
                                contents={".text": b"old"})
            with pytest.raises(StoreError):
                await st.put_golden("b1", "p", {".text": region(7), ".xbad": bad},
                                    source_vm="vm-b", contents={".text": b"new"})
            assert await st.get_golden_content("b1", "p", ".text") == b"old"
    run(body)


def test_put_golden_refuses_bad_contents_without_writing(db: Path) -> None:
    regions = {".text": region(1), "idt": region(2)}

    async def body() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1", "r", "v", b"")
            await st.put_golden("b1", "p", regions, source_vm="vm-a",
                                contents={".text": b"old"})
            with pytest.raises(ValueError, match=r"'\.rodata'"):
                await st.put_golden("b1", "p", {".text": region(5)}, source_vm="vm-b",
                                    contents={".text": b"new", ".rodata": b"x"})
            with pytest.raises(ValueError, match="'idt'"):   # in the old baseline only
                await st.put_golden("b1", "p", {".text": region(5)}, source_vm="vm-b",
                                    contents={"idt": b"x"})
            with pytest.raises(TypeError, match="bytes"):
                await st.put_golden("b1", "p", regions, source_vm="vm-b",
                                    contents={".text": "not bytes"})  # type: ignore[dict-item]
            with pytest.raises(TypeError, match="mapping"):
                await st.put_golden("b1", "p", regions, source_vm="vm-b",
                                    contents=[(".text", b"x")])  # type: ignore[arg-type]
            # Nothing was written: the old baseline and its contents are intact.
            assert await st.get_golden("b1", "p") == regions
            assert [i.source_vm for i in await st.list_golden()] == ["vm-a"]
            assert await st.get_golden_content("b1", "p", ".text") == b"old"
            assert await st.get_golden_content("b1", "p", ".rodata") is None
    run(body)


# ------------------------------------------------------------------- VM state

STATE: dict[str, Any] = {
    "boot_id": "9f1c-boot",
    "slide": 0x19000000,
    "cr3": U64_MAX,
    "delta": -5,
    "ratio": 0.25,
    "booted": True,
    "gone": None,
    "raw": b"\x00\xff" * 64,
    "empty": b"",
    "per_boot_pages": {".rodata": {"pages": [980, 981], "hashes": b"\x01" * 16}},
    "list": [1, "two", b"three", [b"", {"x": b"y"}]],
    "$b": "a user key that looks like the bytes tag",
    "lookalike": {"$b": "not base64!"},
    "$$twice": {"$": 1},
}


def test_vm_state_round_trip_with_bytes(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            assert await st.get_vm_state("vm-a") is None
            await st.put_vm_state("vm-a", STATE)
            assert await st.get_vm_state("vm-a") == STATE
            await st.put_vm_state("vm-a", {"only": b"new"})
            assert await st.get_vm_state("vm-a") == {"only": b"new"}
            await st.put_vm_state("vm-b", {})
            assert await st.get_vm_state("vm-b") == {}
            assert await st.delete_vm_state("vm-a") is True
            assert await st.delete_vm_state("vm-a") is False
            assert await st.get_vm_state("vm-a") is None
            assert await st.get_vm_state("vm-b") == {}
    run(body)
    # Bytes are stored encoded, not as Python reprs.
    text = raw(db).execute("SELECT state FROM vm_state WHERE vm_id='vm-b'").fetchone()
    assert text == ("{}",)


def test_resume_state_needs_the_vm_state_and_goes_with_it(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            assert await st.get_resume("vm-a") is None
            with pytest.raises(StoreError):  # no per-VM state to resume from
                await st.put_resume("vm-a", b"record")
            await st.put_vm_state("vm-a", {"boot": 1})
            await st.put_resume("vm-a", b"record")
            await st.put_resume("vm-a", b"newer")
            assert await st.get_resume("vm-a") == b"newer"
            await st.put_vm_state("vm-a", {"boot": 2})  # replaced: the record stays
            assert await st.get_resume("vm-a") == b"newer"
            assert await st.delete_vm_state("vm-a")  # a reset: the record goes with it
            assert await st.get_resume("vm-a") is None
            await st.put_vm_state("vm-b", {})
            await st.put_resume("vm-b", b"x")
            assert await st.delete_resume("vm-b") and not await st.delete_resume("vm-b")
            with pytest.raises(TypeError):
                await st.put_resume("vm-b", "not bytes")  # type: ignore[arg-type]
    run(body)
    con = raw(db)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        con.execute("INSERT INTO vm_resume VALUES ('vm-b', 'text, not blob', 1.0)")


def test_v2_database_migrates_to_v3_keeping_vm_state(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store.schema, "MIGRATIONS", MIGRATIONS[:2])

    async def v2() -> None:
        async with Store.open(db) as st:
            assert st.schema_version == 2
            await st.put_vm_state("vm-a", {"kept": True})
    run(v2)
    monkeypatch.setattr(store.schema, "MIGRATIONS", MIGRATIONS[:3])

    async def v3() -> None:
        async with Store.open(db) as st:
            assert st.schema_version == 3
            assert await st.get_vm_state("vm-a") == {"kept": True}
            assert await st.get_resume("vm-a") is None
            await st.put_resume("vm-a", b"record")
            assert await st.get_resume("vm-a") == b"record"
    run(v3)


def test_v3_database_drops_name_keyed_vm_state_saying_so_once(
        db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Rows keyed by the name a QEMU reports cannot be told apart from an impostor's:
    v5 drops them (re-taken at each VM's next check), with one warning."""
    monkeypatch.setattr(store.schema, "MIGRATIONS", MIGRATIONS[:3])

    async def v3() -> None:
        async with Store.open(db) as st:
            await st.put_vm_state("victim", {"boot": 1})
            await st.put_resume("victim", b"record")
    run(v3)
    monkeypatch.undo()

    async def newest() -> None:
        async with Store.open(db) as st:
            assert st.schema_version == SCHEMA_VERSION
            assert await st.get_vm_state("victim") is None
            assert await st.get_resume("victim") is None
    with caplog.at_level("WARNING", logger="kscan.store"):
        run(newest)
        run(newest)  # migrated once: said once
    said = [r for r in caplog.records if "keyed by VM name" in r.getMessage()]
    assert len(said) == 1


def test_a_new_database_migrates_to_the_newest_silently(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def fresh() -> None:
        async with Store.open(tmp_path / "new.db") as st:
            assert st.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    with caplog.at_level("WARNING", logger="kscan.store"):
        run(fresh)
    assert not [r for r in caplog.records if "keyed by VM name" in r.getMessage()]


@pytest.mark.parametrize(("bad", "exc"), [
    ({"x": {1, 2}}, TypeError),
    ({"x": {1: "int key"}}, TypeError),
    ({"x": float("nan")}, ValueError),
    ({"x": 2**64}, TypeError),
    ({"x": object()}, TypeError),
])
def test_vm_state_refuses_unstorable_values(db: Path, bad: dict[str, Any],
                                            exc: type[Exception]) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            await st.put_vm_state("vm", {"keep": 1})
            with pytest.raises(exc):
                await st.put_vm_state("vm", bad)
            assert await st.get_vm_state("vm") == {"keep": 1}
    run(body)


# ------------------------------------------------------------------- event log

def test_events_append_and_query(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            ids = []
            for i in range(10):
                ids.append(await st.append_event({
                    "ts": 1000.0 + i, "event": "scan" if i % 3 else "mismatch",
                    "vm": "vm-a" if i % 2 else "vm-b", "i": i, "page": b"\xcc" * i}))
            assert ids == sorted(ids) and len(set(ids)) == 10

            rows = await st.events()
            assert [r.id for r in rows] == ids
            assert all(isinstance(r, EventRow) for r in rows)
            assert rows[4].as_dict() == {"ts": 1004.0, "event": "scan", "vm": "vm-b",
                                         "i": 4, "page": b"\xcc" * 4}
            assert [r.detail["i"] for r in await st.events(vm="vm-a")] == [1, 3, 5, 7, 9]
            assert [r.detail["i"] for r in await st.events(since_id=ids[6])] == [7, 8, 9]
            assert [r.detail["i"] for r in await st.events(limit=2)] == [0, 1]
            page = await st.events(vm="vm-b", since_id=ids[2], limit=2)
            assert [r.detail["i"] for r in page] == [4, 6]
            assert await st.events(vm="nobody") == []
            with pytest.raises(ValueError):
                await st.events(limit=0)
            with pytest.raises(TypeError, match="vm"):
                await st.append_event({"ts": 1.0, "event": "x"})
            with pytest.raises(TypeError, match="ts"):
                await st.append_event({"ts": "now", "event": "x", "vm": "v"})
            with pytest.raises(ValueError):
                await st.append_event({"ts": float("inf"), "event": "x", "vm": "v"})
            assert len(await st.events()) == 10
    run(body)


def test_event_log_is_append_only(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            await st.append_event({"ts": 1.0, "event": "mismatch", "vm": "vm-a"})
            await st.append_event({"ts": 2.0, "event": "paused", "vm": "vm-a"})
    run(body)
    con = raw(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("UPDATE event SET event = 'ok' WHERE id = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("DELETE FROM event WHERE id = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("DELETE FROM event")
    assert con.execute("SELECT id, event FROM event ORDER BY id").fetchall() == [
        (1, "mismatch"), (2, "paused")]
    assert not hasattr(Store, "delete_event") and not hasattr(Store, "update_event")


# ---------------------------------------------------- file, schema and migrations

def test_file_modes_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "kscan.db"
    old_umask = os.umask(0)      # the modes must not depend on a friendly umask
    try:
        async def body() -> None:
            async with Store.open(path) as st:
                await st.append_event({"ts": 1.0, "event": "x", "vm": "v"})
                for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                    assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
                conn = st._conn
                assert list(await conn.execute_fetchall("PRAGMA foreign_keys")) == [(1,)]
                assert list(await conn.execute_fetchall("PRAGMA busy_timeout")) == [(10000,)]
                assert st.schema_version == SCHEMA_VERSION
        run(body)
    finally:
        os.umask(old_umask)
    for d in (tmp_path / "new", tmp_path / "new" / "deeper"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    con = raw(path)
    assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert con.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_existing_directory_mode_is_left_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    run(lambda: _open_and_close(tmp_path / "kscan.db"))
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "kscan.db").stat().st_mode) == 0o600


async def _open_and_close(path: Path | None) -> int:
    async with Store.open(path) as st:
        return st.schema_version


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1].version == SCHEMA_VERSION


def test_open_v0_database_made_by_hand(db: Path) -> None:
    con = raw(db)
    con.execute("VACUUM")      # a valid, empty SQLite file: user_version 0, no tables
    con.close()
    assert db.stat().st_size > 0
    assert run(lambda: _open_and_close(db)) == SCHEMA_VERSION
    con = raw(db)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"profile", "golden", "golden_region", "golden_content", "vm_state",
            "event"} <= tables
    assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def _make_v1_by_hand(path: Path) -> None:
    con = raw(path)
    con.execute("BEGIN")
    for statement in MIGRATIONS[0].statements:
        con.execute(statement)
    con.execute("INSERT INTO profile VALUES ('b1', '6.1', '#1', x'0102', 5.0)")
    con.execute("INSERT INTO event (ts, event, vm, detail) VALUES (1.0, 'old', 'vm', '{}')")
    con.execute("PRAGMA user_version = 1")
    con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    con.execute("COMMIT")
    con.close()


def test_migration_from_v1_applies_newer_steps(db: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _make_v1_by_hand(db)
    v2 = Migration(2, "test: profile notes", (
        "ALTER TABLE profile ADD COLUMN note TEXT NOT NULL DEFAULT 'none'",
        "CREATE TABLE v2_marker (x INTEGER)"))
    v3 = Migration(3, "test: another step", ("INSERT INTO v2_marker VALUES (3)",))
    monkeypatch.setattr(store.schema, "MIGRATIONS", (*MIGRATIONS[:1], v2, v3))

    async def body() -> None:
        async with Store.open(db) as st:
            assert st.schema_version == 3
            p = await st.get_profile("b1")
            assert p is not None and p.data == b"\x01\x02" and p.added_at == 5.0
            assert [e.event for e in await st.events()] == ["old"]
    run(body)
    con = raw(db)
    assert con.execute("PRAGMA user_version").fetchone() == (3,)
    assert con.execute("SELECT note FROM profile").fetchall() == [("none",)]
    assert con.execute("SELECT x FROM v2_marker").fetchall() == [(3,)]


def test_v1_database_migrates_to_v2_keeping_its_data(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store.schema, "MIGRATIONS", MIGRATIONS[:2])
    _make_v1_by_hand(db)
    con = raw(db)
    con.execute("INSERT INTO golden VALUES ('b1', 'p', 'vm-old', 7.0)")
    r = region(4)
    con.execute("INSERT INTO golden_region VALUES ('b1', 'p', '.text', ?, ?, ?, ?, ?, ?)",
                (r.size, r.region_hash, r.page_hashes, r.per_boot, r.boots,
                 store.codec.encode(r.meta, "meta")))
    con.close()

    async def body() -> None:
        async with Store.open(db) as st:
            assert st.schema_version == 2
            p = await st.get_profile("b1")
            assert p is not None and p.data == b"\x01\x02" and p.added_at == 5.0
            assert [e.event for e in await st.events()] == ["old"]
            assert await st.get_golden("b1", "p") == {".text": r}
            (info,) = await st.list_golden()
            assert (info.source_vm, info.created_at) == ("vm-old", 7.0)
            assert await st.get_golden_content("b1", "p", ".text") is None   # none in v1
            await st.put_golden("b1", "p", {".text": r}, source_vm="vm-new",
                                contents={".text": b"bytes"})
            assert await st.get_golden_content("b1", "p", ".text") == b"bytes"
    run(body)
    con = raw(db)
    assert con.execute("PRAGMA user_version").fetchone() == (2,)
    assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    fks = con.execute("PRAGMA foreign_key_list(golden_content)").fetchall()
    assert {(f[2], f[3], f[4], f[6]) for f in fks} == {
        ("golden", "build_id", "build_id", "CASCADE"),
        ("golden", "boot_profile", "boot_profile", "CASCADE")}
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        con.execute("INSERT INTO golden_content VALUES ('b1', 'p', 'idt', 'text, not blob')")
    # Opening again (already at v2) changes nothing.
    assert run(lambda: _open_and_close(db)) == 2


def test_failed_migration_rolls_back_completely(db: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _make_v1_by_hand(db)
    v2 = Migration(2, "ok", ("CREATE TABLE v2_marker (x INTEGER)",))
    v3 = Migration(3, "broken", ("ALTER TABLE no_such_table ADD COLUMN y INTEGER",))
    monkeypatch.setattr(store.schema, "MIGRATIONS", (*MIGRATIONS[:1], v2, v3))
    with pytest.raises(StoreError) as ei:
        run(lambda: _open_and_close(db))
    assert ei.value.operation == "migrate"
    assert "no_such_table" in str(ei.value)
    con = raw(db)
    assert con.execute("PRAGMA user_version").fetchone() == (1,)
    assert con.execute("SELECT name FROM sqlite_master WHERE name='v2_marker'").fetchall() == []


def test_newer_schema_is_refused(db: Path) -> None:
    run(lambda: _open_and_close(db))
    con = raw(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    con.close()
    with pytest.raises(StoreError) as ei:
        run(lambda: _open_and_close(db))
    err = ei.value
    assert isinstance(err, SchemaError) and isinstance(err, KscanError)
    assert (err.found, err.supported) == (SCHEMA_VERSION + 7, SCHEMA_VERSION)
    assert "upgrade kscan" in str(err) and str(db) in str(err)
    assert raw(db).execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 7,)


def test_not_sqlite_file_is_refused_and_left_untouched(db: Path) -> None:
    junk = b"this is a kernel profile, not a database\n" * 200
    db.write_bytes(junk)
    with pytest.raises(StoreError) as ei:
        run(lambda: _open_and_close(db))
    err = ei.value
    assert err.path == str(db) and str(db) in str(err)
    assert err.sqlite_error == "SQLITE_NOTADB"
    assert "not an SQLite database" in err.hint
    assert isinstance(err.__cause__, sqlite3.DatabaseError)
    assert db.read_bytes() == junk


def test_foreign_sqlite_databases_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    con = raw(other)
    con.execute("CREATE TABLE users (name TEXT)")
    con.close()
    with pytest.raises(SchemaError, match=r"not a kscan database.*users"):
        run(lambda: _open_and_close(other))
    assert raw(other).execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]

    tagged = tmp_path / "tagged.db"
    con = raw(tagged)
    con.execute("PRAGMA application_id = 1234")
    con.close()
    with pytest.raises(SchemaError, match="application_id 0x4d2"):
        run(lambda: _open_and_close(tagged))


def test_directory_as_path_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as ei:
        run(lambda: _open_and_close(tmp_path))
    assert ei.value.path == str(tmp_path) and ei.value.operation == "open"


def test_closed_store_refuses_calls(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            pass
        assert st.closed
        with pytest.raises(StoreError, match="closed"):
            await st.get_profile("x")
        await st.close()    # idempotent
    run(body)


# ------------------------------------------------------------------ concurrency

def test_busy_database_times_out_with_store_error(db: Path) -> None:
    run(lambda: _open_and_close(db))
    holder = raw(db)
    holder.execute("BEGIN IMMEDIATE")     # another process holding the write lock

    async def body() -> None:
        async with Store.open(db, busy_timeout=0.2) as st:   # opening needs no write lock
            t0 = time.monotonic()
            with pytest.raises(StoreError) as ei:
                await st.append_event({"ts": 1.0, "event": "x", "vm": "v"})
            assert time.monotonic() - t0 >= 0.15
            assert ei.value.sqlite_error is not None
            assert ei.value.sqlite_error.startswith("SQLITE_BUSY")
            assert "busy_timeout" in ei.value.hint
            holder.execute("ROLLBACK")
            assert await st.append_event({"ts": 2.0, "event": "x", "vm": "v"}) == 1
    run(body)


def test_many_tasks_share_one_store(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1", "r", "v", b"")

            async def worker(n: int) -> None:
                for i in range(10):
                    await st.append_event({"ts": float(i), "event": "e", "vm": f"vm{n}"})
                    await st.put_golden("b1", f"p{n % 3}", {".text": region(n), "idt":
                                                            region(i)}, source_vm=f"vm{n}")
                    await st.put_vm_state(f"vm{n}", {"i": i})

            await asyncio.gather(*(worker(n) for n in range(20)))
            assert len(await st.events(limit=10_000)) == 200
            assert len(await st.list_golden()) == 3
            assert await st.get_vm_state("vm7") == {"i": 9}
    run(body)


def test_cancelled_write_leaves_no_half_transaction(db: Path) -> None:
    async def body() -> None:
        async with Store.open(db) as st:
            await st.add_profile("b1", "r", "v", b"")
            old = {".text": region(1)}
            new = {f"r{i}": region(i, pages=50) for i in range(40)}
            await st.put_golden("b1", "p", old, source_vm="old")
            outcomes = set()
            for spins in range(0, 60, 3):
                task = asyncio.create_task(st.put_golden("b1", "p", new, source_vm="new"))
                for _ in range(spins):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    await task
                    outcomes.add("done")
                except asyncio.CancelledError:
                    outcomes.add("cancelled")
                got = await st.get_golden("b1", "p")
                assert got in (old, new)      # never a mix
                await st.put_golden("b1", "p", old, source_vm="old")   # still usable
            assert "cancelled" in outcomes
    run(body)


_WRITER = """
import asyncio, os, sys, time
from store import Store

async def main(path: str, vm: str, n: int, go: str) -> None:
    while not os.path.exists(go):
        time.sleep(0.001)
    async with Store.open(path) as st:
        for i in range(n):
            await st.append_event({"ts": time.time(), "event": "tick", "vm": vm, "i": i})

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""


def test_processes_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "kscan.db"   # not created yet: the writers race to create it
    go = tmp_path / "go"
    n, writers = 150, 3
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"vm{w}", str(n),
                               str(go)], cwd=REPO, env=env, stderr=subprocess.PIPE)
             for w in range(writers)]
    time.sleep(0.3)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()

    async def body() -> None:
        async with Store.open(path) as st:
            rows = await st.events(limit=10_000)
            assert len(rows) == n * writers
            assert len({r.id for r in rows}) == n * writers
            for w in range(writers):
                mine = [r.detail["i"] for r in rows if r.vm == f"vm{w}"]
                assert mine == list(range(n))
    run(body)


# --------------------------------------------------------------- default path

def test_default_path_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == state / "kscan" / "kscan.db"
    assert run(lambda: _open_and_close(None)) == SCHEMA_VERSION
    assert (state / "kscan" / "kscan.db").is_file()
    assert stat.S_IMODE((state / "kscan").stat().st_mode) == 0o700

    home_default = tmp_path / "home" / ".local" / "state" / "kscan" / "kscan.db"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/is/ignored")
    assert default_db_path() == home_default
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_db_path() == home_default
    assert default_db_path({"XDG_STATE_HOME": "/x"}) == Path("/x/kscan/kscan.db")

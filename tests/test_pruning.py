"""Pruning: the event log by age and the forensics dir by size — never the last tamper
of a VM, never the newest forensic copy of a VM; the log stays append-only otherwise."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from scanner.run.actions import prune_forensics
from store import Store


def test_prune_events_keeps_the_last_tamper_of_each_vm(tmp_path: Path) -> None:
    db = tmp_path / "k.db"

    async def go() -> int:
        async with Store.open(db) as st:
            for i, (ev, vm) in enumerate([("tamper", "a"), ("tamper", "a"), ("vm_found", "a"),
                                          ("tamper", "b"), ("stats", ""), ("vm_lost", "b")]):
                await st.append_event({"ts": 100.0 + i, "event": ev, "vm": vm})
            await st.append_event({"ts": 10_000.0, "event": "vm_found", "vm": "c"})
            return await st.prune_events(1_000.0)

    assert asyncio.run(go()) == 4
    con = sqlite3.connect(db)
    left = con.execute("SELECT ts, event, vm FROM event ORDER BY id").fetchall()
    assert left == [(101.0, "tamper", "a"), (103.0, "tamper", "b"), (10_000.0, "vm_found", "c")]
    # Still append-only for everyone else: the trigger is back.
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("DELETE FROM event")


def test_prune_forensics_oldest_first_never_the_newest_of_a_vm(tmp_path: Path) -> None:
    root = tmp_path / "forensics"
    for vm, stamps in (("a", ["20240101T000000Z-000", "20240102T000000Z-000",
                              "20240103T000000Z-000"]), ("b", ["20230101T000000Z-000"])):
        for s in stamps:
            d = root / vm / s / "pages"
            d.mkdir(parents=True)
            (d / "x.bin").write_bytes(bytes(1000))
    removed = prune_forensics(root, 1500)
    assert removed == 2
    assert sorted(str(p.relative_to(root)) for p in root.glob("*/*")) == [
        "a/20240103T000000Z-000", "b/20230101T000000Z-000"]
    assert prune_forensics(tmp_path / "missing", 0) == 0

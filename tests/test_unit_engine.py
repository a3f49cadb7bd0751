"""The engine keeps going when one VM's watcher fails, and stops cleanly on request."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

import scanner.run.engine as engine_mod
from scanner.run.engine import Engine, RunConfig
from scanner.run.events import EventSink
from scanner.run.scheduler import Policy
from scanner.run.watcher import VmWatcher
from scanner.vm import VmSource
from store import Store


class FakeVm:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self.uuid = None

    async def close(self) -> None:
        self.closed = True

    def resets(self) -> int:
        return 0


def test_a_failing_watcher_does_not_stop_the_others(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    socks = [tmp_path / f"vm{i}.sock" for i in range(2)]
    for s in socks:
        s.touch()
    vms: dict[str, FakeVm] = {}
    runs: list[str] = []

    async def fake_open(self: Engine, src: VmSource) -> Any:
        vm = vms.setdefault(src.path, FakeVm(Path(src.path).stem))
        return vm

    async def fake_run(self: VmWatcher) -> None:
        runs.append(self.name)
        if self.name == "vm0":
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    monkeypatch.setattr(Engine, "_open", fake_open)
    monkeypatch.setattr(VmWatcher, "_run", fake_run)
    out = io.BytesIO()

    async def go() -> None:
        async with Store.open(tmp_path / "k.db") as st:
            sink = EventSink(out)
            sink.start()
            cfg = RunConfig(qmp=tuple(str(s) for s in socks), policy=Policy(),
                            forensics_dir=tmp_path, discover_every=0.05, stats_every=3600)
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(1.0, stop.set)
            await Engine(cfg, st, sink).run(stop)
            await sink.close()

    monkeypatch.setattr(engine_mod, "RELOST_BACKOFF", 0.2)
    asyncio.run(asyncio.wait_for(go(), 20))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    kinds = [(e["event"], e["vm"]) for e in events]
    assert ("error", "vm0") in kinds
    err = next(e for e in events if e["event"] == "error")
    assert "RuntimeError: boom" in err["message"]
    assert runs.count("vm0") >= 2  # retried after the back-off
    assert runs.count("vm1") == 1  # the other VM was never disturbed
    assert kinds[-1] == ("kscan_stopped", None)
    assert all(v.closed for v in vms.values())


def test_a_second_vm_claiming_a_watched_name_is_not_watched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two QEMUs reporting the same name (`-name victim`): the second gets an `error`
    (once, not one per retry), is closed and not watched; the first keeps its watcher,
    and state keys differ (the socket, not the name)."""
    socks = [tmp_path / f"vm{i}.sock" for i in range(2)]
    for s in socks:
        s.touch()
    vms: dict[str, FakeVm] = {}
    opened: list[str] = []
    watched: dict[str, str] = {}

    async def fake_open(self: Engine, src: VmSource) -> Any:
        opened.append(src.path)
        vm = FakeVm("victim")
        vms[src.path] = vm
        return vm

    async def fake_run(self: VmWatcher) -> None:
        watched[self.source] = self.key
        await asyncio.sleep(3600)

    monkeypatch.setattr(Engine, "_open", fake_open)
    monkeypatch.setattr(VmWatcher, "_run", fake_run)
    monkeypatch.setattr(engine_mod, "UNREACHABLE_BACKOFF", 0.1)
    out = io.BytesIO()

    async def go() -> None:
        async with Store.open(tmp_path / "k.db") as st:
            sink = EventSink(out)
            sink.start()
            cfg = RunConfig(qmp=tuple(str(s) for s in socks), policy=Policy(),
                            forensics_dir=tmp_path, discover_every=0.05, stats_every=3600)
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(1.5, stop.set)
            await Engine(cfg, st, sink).run(stop)
            await sink.close()

    asyncio.run(asyncio.wait_for(go(), 20))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    first, second = str(socks[0]), str(socks[1])
    assert list(watched) == [first]  # the one attached first
    assert watched[first].startswith("qmp:") and watched[first].endswith(
        f"@uid={os.getuid()}") and first in watched[first]
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["source"] == second
    assert errors[0]["name"] == "victim" and first in errors[0]["message"]
    assert opened.count(second) >= 2  # retried (and refused again, silently)
    assert [e["source"] for e in events if e["event"] == "vm_found"] == [first]
    assert vms[second].closed


def test_profiles_are_decoded_once_while_their_row_is_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each watcher's located kernel holds the profile object it was found with: a cache
    refresh must hand out the same object, not a fresh ~4 MB decoding per refresh (the
    fleet's memory grew with its age). A replaced profile is decoded anew."""
    from tests.test_unit_watcher import make_profile

    prof = make_profile()
    monkeypatch.setattr(engine_mod, "CACHE_SECONDS", -1.0)  # every call refreshes

    async def go() -> None:
        async with Store.open(tmp_path / "k.db") as st:
            assert await st.add_profile(prof.build_id, prof.release, prof.version,
                                        prof.to_bytes())
            cfg = RunConfig(policy=Policy(), forensics_dir=tmp_path, stats_every=3600)
            engine = Engine(cfg, st, EventSink(io.BytesIO()))
            (first,) = await engine.profiles()
            (again,) = await engine.profiles()
            assert again is first
            assert await st.add_profile(prof.build_id, prof.release, prof.version,
                                        prof.to_bytes() + b"\0", replace=True)
            (replaced,) = await engine.profiles()
            assert replaced is not first and replaced.build_id == prof.build_id

    asyncio.run(asyncio.wait_for(go(), 20))


def test_what_is_kept_of_gone_vms_is_forgotten_after_a_while(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that churns through VMs for months: the totals, event counts and labels of
    a VM gone for FORGET_AFTER, and its source's retry/error state, are dropped — but not
    those of a VM that came back, nor of a source discovery still sees."""
    from types import SimpleNamespace

    async def go() -> None:
        async with Store.open(tmp_path / "k.db") as st:
            sink = EventSink(io.BytesIO())
            eng = Engine(RunConfig(qmp=(), policy=Policy(), forensics_dir=tmp_path), st, sink)
            for name in ("gone", "back"):
                eng.vm_events[name] = {"tamper": 1}
                sink.labels[name] = {"uuid": name}
                eng._retire(SimpleNamespace(name=name, scans=7, verified_at=1.0))  # type: ignore[arg-type]
                eng._retry_at[f"/run/{name}.sock"] = 0.0
                eng._said[f"/run/{name}.sock"] = "lost"
            eng._said["pid:4242"] = "skipped"
            eng._present = {"/run/back.sock"}   # still discovered (failing, say)
            eng.watchers["/run/again.sock"] = SimpleNamespace(name="back")  # type: ignore[assignment]
            now = engine_mod.time.monotonic()
            eng._forget_gone(now + 10)  # not yet
            assert set(eng.vm_totals) == {"gone", "back"} and "gone" in sink.labels
            assert "/run/gone.sock" in eng._retry_at and "pid:4242" in eng._said
            eng._forget_gone(now + engine_mod.FORGET_AFTER + 20)
            assert set(eng.vm_totals) == set(eng.vm_events) == {"back"}  # watched again
            assert set(sink.labels) == {"back"}
            assert set(eng._retry_at) == {"/run/back.sock"}   # discovery still sees it
            assert set(eng._said) == {"/run/back.sock"}
            assert not eng._absent_since and not eng._gone_since

    asyncio.run(asyncio.wait_for(go(), 20))


def test_golden_bytes_kept_for_checks_are_let_go_while_the_engine_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The golden `.text` a check decompressed (14.7 MB on Debian 6.1) is kept only while
    checks use it: the engine's once-a-second round drops it once idle, without waiting
    for another check to ask."""
    import zstandard

    from scanner.check.golden_bytes import GoldenBytes

    kept = GoldenBytes(keep_s=0.2)
    monkeypatch.setattr(engine_mod, "GOLDEN_BYTES", kept)
    kept.get(zstandard.ZstdCompressor().compress(b"\x90" * 100_000), 1 << 20)

    async def go() -> None:
        async with Store.open(tmp_path / "k.db") as st:
            eng = Engine(RunConfig(qmp=(), policy=Policy(), forensics_dir=tmp_path), st,
                         EventSink(io.BytesIO()))
            task = asyncio.create_task(eng._reconcile())
            try:
                assert kept.kept_bytes() == 100_000
                await asyncio.sleep(1.5)
                assert kept.kept_bytes() == 0
            finally:
                task.cancel()

    asyncio.run(asyncio.wait_for(go(), 20))

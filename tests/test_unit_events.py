"""scanner.run.events.EventSink: JSON lines with ts/event/vm, the drop policy for `stats`
under a slow reader (never for other events), persistence of non-stats events only,
a closed stdout, and the one-line human summaries."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from typing import Any

import orjson
import pytest

from scanner.run.events import DROPPABLE, EventSink, human


def lines(buf: bytes) -> list[dict[str, Any]]:
    assert buf.endswith(b"\n")
    return [orjson.loads(x) for x in buf.split(b"\n")[:-1]]


class FlushCounter(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_json_lines_with_ts_event_vm_and_fields() -> None:
    out = FlushCounter()
    before = time.time()

    async def go() -> list[dict[str, Any]]:
        sink = EventSink(out)
        sink.start()
        r1 = await sink.emit("kscan_started", None, version="0.1", policy="auto")
        r2 = await sink.emit("tamper", "vm-1", page=3, raw=b"\x01\xab", tags={"x"},
                             pair=(1, 2), nested={"k": [1, 2]})
        await sink.close()
        assert sink.written == 2 and sink.dropped == 0
        return [r1, r2]

    returned = asyncio.run(go())
    after = time.time()
    got = lines(out.getvalue())
    assert [e["event"] for e in got] == ["kscan_started", "tamper"]
    assert [e["vm"] for e in got] == [None, "vm-1"]
    for e in got:
        assert isinstance(e["ts"], float) and before <= e["ts"] <= after
    assert got[0]["version"] == "0.1" and got[0]["policy"] == "auto"
    assert got[1]["raw"] == "01ab"          # bytes as hex
    assert got[1]["tags"] == ["x"]          # sets as lists
    assert got[1]["pair"] == [1, 2]
    assert got[1]["nested"] == {"k": [1, 2]}
    # emit returns the event as written (same ts)
    assert returned[0]["ts"] == got[0]["ts"] and returned[1]["page"] == 3
    assert out.flushes >= 1


def test_writes_to_a_real_pipe() -> None:
    r, w = os.pipe()
    try:
        with os.fdopen(w, "wb") as fw:
            async def go() -> None:
                sink = EventSink(fw)
                sink.start()
                for i in range(50):
                    await sink.emit("vm_found", f"vm{i}", source="/s")
                await sink.close()

            asyncio.run(go())
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
    got = lines(data)
    assert [e["vm"] for e in got] == [f"vm{i}" for i in range(50)]
    assert all(e["event"] == "vm_found" and e["source"] == "/s" for e in got)


class StalledOut:
    """A stdout whose reader has stopped: write blocks until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.data = b""

    def write(self, b: bytes) -> int:
        self.entered.set()
        self.release.wait(30)
        self.data += b
        return len(b)

    def flush(self) -> None:
        pass


def test_stalled_stdout_never_blocks_emit_and_keeps_tamper() -> None:
    """The writer thread is stuck in write(); the 2-line queue fills. emit never waits;
    stats go first, then routine events (they are in the database), never tamper."""
    out = StalledOut()
    persisted: list[str] = []

    async def go() -> EventSink:
        async def persist(ev: dict[str, Any]) -> None:
            persisted.append(f"{ev['event']}:{ev.get('n')}")

        sink = EventSink(out, persist=persist, queue_size=2, stall_warning=0.05)  # type: ignore[arg-type]
        sink.start()
        await sink.emit("vm_found", "a", n=0)
        await asyncio.get_running_loop().run_in_executor(None, out.entered.wait, 2)
        t0 = time.monotonic()
        await sink.emit("stats", None, n=1)
        await sink.emit("stats", None, n=2)
        await sink.emit("stats", None, n=3)            # queue full: dropped
        await sink.emit("vm_booting", "a", n=4)        # evicts stats 1
        await sink.emit("tamper", "a", n=5)            # evicts stats 2
        await sink.emit("vm_booting", "a", n=6)        # nothing to evict: stdout skips it
        await sink.emit("tamper", "a", n=7)            # the reserve beyond the bound
        await sink.emit("action", "a", n=10)
        assert time.monotonic() - t0 < 0.5             # emit never waited for stdout
        await asyncio.sleep(0.2)
        assert sink.stalled
        assert sink.dropped == 4
        out.release.set()
        await sink.close()
        return sink

    sink = asyncio.run(go())
    got = [(e["event"], e["n"]) for e in lines(out.data)]
    assert got == [("vm_found", 0), ("vm_booting", 4), ("tamper", 5), ("tamper", 7),
                   ("action", 10)]
    # In the database before stdout, all but stats, the skipped vm_booting included.
    assert persisted == ["vm_found:0", "vm_booting:4", "tamper:5", "vm_booting:6",
                         "tamper:7", "action:10"]
    assert sink.written == 5


def test_close_gives_up_on_a_stalled_stdout() -> None:
    out = StalledOut()

    async def go() -> float:
        sink = EventSink(out, queue_size=4, close_timeout=0.2)  # type: ignore[arg-type]
        sink.start()
        await sink.emit("tamper", "a")
        await sink.emit("kscan_stopped", None)
        t0 = time.monotonic()
        await sink.close()
        return time.monotonic() - t0

    try:
        assert asyncio.run(go()) < 2
    finally:
        out.release.set()


def test_many_non_stats_events_never_dropped_with_slow_persist() -> None:
    out = io.BytesIO()
    persisted: list[int] = []

    async def go() -> EventSink:
        async def persist(ev: dict[str, Any]) -> None:
            await asyncio.sleep(0.001)
            persisted.append(ev["n"])

        sink = EventSink(out, persist=persist, queue_size=1)
        sink.start()
        for i in range(40):
            await sink.emit("mismatch", "v", n=i)
            await sink.emit("stats", None, n=-1)
        await sink.close()
        return sink

    sink = asyncio.run(go())
    got = lines(out.getvalue())
    assert [e["n"] for e in got if e["event"] == "mismatch"] == list(range(40))
    assert persisted == list(range(40))
    assert sink.written + sink.dropped == 80
    assert sink.dropped > 0  # the slow writer made some stats go
    assert sink.written == len(got)


def test_persist_errors_do_not_stop_the_stream() -> None:
    out = io.BytesIO()
    calls: list[str] = []

    async def go() -> None:
        async def persist(ev: dict[str, Any]) -> None:
            calls.append(ev["event"])
            if ev["event"] == "bad":
                raise RuntimeError("disk full")

        sink = EventSink(out, persist=persist)
        sink.start()
        await sink.emit("bad", "v")
        await sink.emit("stats", None)
        await sink.emit("good", "v")
        await sink.close()

    asyncio.run(go())
    assert calls == ["bad", "good"]
    assert [e["event"] for e in lines(out.getvalue())] == ["bad", "stats", "good"]


class BrokenOut:
    def __init__(self) -> None:
        self.writes = 0

    def write(self, b: bytes) -> int:
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_stdout_keeps_persisting() -> None:
    out = BrokenOut()
    persisted: list[str] = []

    async def go() -> EventSink:
        async def persist(ev: dict[str, Any]) -> None:
            persisted.append(ev["event"])

        sink = EventSink(out, persist=persist)  # type: ignore[arg-type]
        sink.start()
        for ev in ("kscan_started", "stats", "tamper", "action", "stats", "vm_lost"):
            await sink.emit(ev, "v")
        await sink.close()
        return sink

    sink = asyncio.run(go())
    assert persisted == ["kscan_started", "tamper", "action", "vm_lost"]
    assert out.writes == 1  # stdout is abandoned after the first failure
    assert sink.written + sink.dropped == 6


def test_real_pipe_closed_by_reader_keeps_persisting() -> None:
    r, w = os.pipe()
    os.close(r)
    fw = os.fdopen(w, "wb", buffering=0)
    persisted: list[str] = []
    try:
        async def go() -> None:
            async def persist(ev: dict[str, Any]) -> None:
                persisted.append(ev["event"])

            sink = EventSink(fw, persist=persist)
            sink.start()
            for i in range(5):
                await sink.emit("mismatch", "v", n=i)
            await sink.close()

        asyncio.run(go())
    finally:
        fw.close()
    assert persisted == ["mismatch"] * 5


def test_droppable_is_stats_only() -> None:
    assert frozenset({"stats"}) == DROPPABLE


def test_close_without_start_is_noop() -> None:
    async def go() -> None:
        await EventSink(io.BytesIO()).close()

    asyncio.run(go())


# -- human summaries ---------------------------------------------------------------------

def mism(region: str, page: int, kind: str | None = None) -> dict[str, Any]:
    return {"region": region, "page": page, "basis": "golden",
            "ranges": [{"kind": kind}] if kind else []}


def test_human_tamper_summary() -> None:
    ev = {"ts": 0.0, "event": "tamper", "vm": "vm7",
          "mismatches": [mism(".text", 3, "int3 planted"), mism(".rodata", 9)],
          "findings": [{"message": "CR0.WP is clear"}],
          "action": "pause", "forensics": "/f/vm7/x"}
    assert human(ev) == ("vm7: TAMPERED: .text page 3 (golden, int3 planted); "
                         ".rodata page 9 (golden); CR0.WP is clear "
                         "[action pause, forensics /f/vm7/x]")


def test_human_tamper_summary_counts_the_rest() -> None:
    ev = {"ts": 0.0, "event": "tamper", "vm": "v",
          "mismatches": [mism(".text", i, "code bytes changed") for i in range(6)],
          "findings": [{"message": f"f{i}"} for i in range(5)],
          "action": "report", "forensics": None}
    s = human(ev)
    # 4 mismatches + 4 findings shown, 11 - 8 = 3 more
    assert s.count("(golden, code bytes changed)") == 4
    assert "page 4" not in s and "f0; f1; f2; f3" in s and "f4" not in s
    assert "; +3 more [action report, forensics None]" in s


def test_human_action_summaries() -> None:
    ok = {"ts": 0.0, "event": "action", "vm": "v", "action": "pause", "ok": True,
          "run_state": "paused"}
    assert human(ok) == "v: action pause: ok (run state paused)"
    bad = {"ts": 0.0, "event": "action", "vm": "v", "action": "exec:/bin/x", "ok": False,
           "error": "timed out after 30s; killed"}
    assert human(bad) == "v: action exec:/bin/x: FAILED timed out after 30s; killed"


@pytest.mark.parametrize(("ev", "want"), [
    ({"event": "kscan_started", "vm": None, "policy": "interval auto"},
     "kscan_started: interval auto"),
    ({"event": "kscan_stopped", "vm": None}, "kscan_stopped"),
    ({"event": "vm_lost", "vm": "v", "reason": "QMP closed"}, "v: vm_lost: QMP closed"),
    ({"event": "vm_identified", "vm": "v", "release": "6.1.0", "slide": "0x1e000000",
      "boot_profile": "qemu64/2vcpu/ab"}, "v: vm_identified: 6.1.0 slide 0x1e000000 "
                                          "qemu64/2vcpu/ab"),
    ({"event": "clean", "vm": "v"}, "v: clean"),
])
def test_human_other_events(ev: dict[str, Any], want: str) -> None:
    assert human({"ts": 0.0, **ev}) == want

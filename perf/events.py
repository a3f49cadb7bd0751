#!/usr/bin/env python3
"""Event stream: how many events per second kscan's JSON-lines writer sustains.

kscan's `EventSink` (bounded queue → one writer task → orjson → stdout) writes to a
pipe read by another process (`cat > /dev/null`), with realistic events: small
`vm_clean`-sized ones and large `tamper` ones (4 mismatched pages with byte ranges).
Baseline, same run: the bare loop `orjson.dumps + write` to the same kind of pipe.

    events_per_s      kscan writer, events per second
    writer_vs_bare    kscan writer ÷ bare loop throughput

The database log is left out here (`kscan run` persists every non-`stats` event; that
is bounded by SQLite commits, not by the stream).

    python perf/events.py [--events 50000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.common import emit, machine
from scanner.run.events import EventSink


def sample_events() -> list[tuple[str, dict[str, Any]]]:
    rng = {"start": 16, "end": 21, "before": "0084c90f84", "after": "e9deadbeef",
           "kind": "code overwritten with a jmp (inline hook?)"}
    mism = [{"region": ".text", "page": 1536 + i, "va": 0xFFFFFFFF98200000 + i * 4096,
             "gpa": 0x9A00000 + i * 4096, "basis": "golden", "symbol": None,
             "ranges": [rng] * 3} for i in range(4)]
    small = ("vm_clean", {"per_vm_baseline_taken": True,
                          "regions": {".text": {"pages": 3586, "golden_checked": 3586}}})
    big = ("tamper", {"action": "report", "forensics": "/var/lib/kscan/forensics/vm/x",
                      "build_id": "3b43fad5034874490492495d552c0af6a5fab235",
                      "slide": 0x11800000, "mismatches": mism, "findings": []})
    return [small, small, small, big]


def reader() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


async def kscan_writer(n: int) -> tuple[float, int]:
    cat = reader()
    assert cat.stdin is not None
    sink = EventSink(cat.stdin)
    sink.start()
    evs = sample_events()
    t0 = time.perf_counter()
    for i in range(n):
        kind, fields = evs[i % len(evs)]
        await sink.emit(kind, f"vm{i % 500}", **fields)
    await sink.close()
    dt = time.perf_counter() - t0
    cat.stdin.close()
    cat.wait()
    return dt, sink.written


def bare_writer(n: int) -> float:
    cat = reader()
    assert cat.stdin is not None
    out = cat.stdin
    evs = sample_events()
    t0 = time.perf_counter()
    for i in range(n):
        kind, fields = evs[i % len(evs)]
        out.write(orjson.dumps({"ts": time.time(), "event": kind, "vm": f"vm{i % 500}",
                                **fields}) + b"\n")
    out.flush()
    dt = time.perf_counter() - t0
    out.close()
    cat.wait()
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args(argv)
    ks, bs = [], []
    for _ in range(args.rounds):  # alternate, same machine state for both
        dt, written = asyncio.run(kscan_writer(args.events))
        if written != args.events:
            raise SystemExit(f"writer wrote {written} of {args.events} events")
        ks.append(dt)
        bs.append(bare_writer(args.events))
    k, b = sorted(ks)[len(ks) // 2], sorted(bs)[len(bs) // 2]
    f = {"events": args.events, "events_per_s": args.events / k,
         "bare_events_per_s": args.events / b, "writer_vs_bare": b / k,
         "machine": machine()}
    emit(f, args.json, [
        ("kscan event writer", f"{f['events_per_s']:,.0f} events/s to a pipe"),
        ("bare dumps+write loop", f"{f['bare_events_per_s']:,.0f} events/s"),
        ("writer_vs_bare", f"{f['writer_vs_bare']:.2f}"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where `kscan run`'s memory goes: a tracemalloc hook, off unless asked for.

`KSCAN_TRACEMALLOC=DIR` in `kscan run`'s environment starts tracemalloc (frames:
`KSCAN_TRACEMALLOC_FRAMES`, default 6) and dumps a snapshot to DIR every
`KSCAN_TRACEMALLOC_EVERY` seconds (default 60) and once more when the run stops.
tracemalloc slows Python allocation down and costs memory of its own: for finding
where memory goes, never for figures. Then

    python -m scanner.run.memtrace DIR [--top 25]

prints the last snapshot's top allocation sites and what grew from the first snapshot
to the last (`perf/README.md` "Memory").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import tracemalloc
from pathlib import Path

__all__ = ["ENV", "dump", "start"]

ENV = "KSCAN_TRACEMALLOC"


def dump(directory: Path) -> Path:
    path = directory / f"snap-{time.time():.0f}.tracemalloc"
    tracemalloc.take_snapshot().dump(str(path))
    return path


async def _every(directory: Path, seconds: float) -> None:
    try:
        while True:
            await asyncio.sleep(seconds)
            await asyncio.to_thread(dump, directory)
    finally:
        with contextlib.suppress(OSError):
            dump(directory)


def start() -> asyncio.Task[None] | None:
    """The dumping task if `KSCAN_TRACEMALLOC` is set (cancel it to stop: it dumps a
    last snapshot), else None and nothing traced."""
    where = os.environ.get(ENV)
    if not where:
        return None
    directory = Path(where)
    directory.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(int(os.environ.get(f"{ENV}_FRAMES", "6")))
    every = float(os.environ.get(f"{ENV}_EVERY", "60"))
    return asyncio.get_running_loop().create_task(_every(directory, every), name="memtrace")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Top allocation sites of kscan run's "
                                 "tracemalloc snapshots, and their growth.")
    ap.add_argument("directory", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--by", default="lineno", choices=("lineno", "traceback", "filename"))
    args = ap.parse_args(argv)
    snaps = sorted(args.directory.glob("snap-*.tracemalloc"))
    if not snaps:
        print(f"no snapshots in {args.directory}", file=sys.stderr)
        return 2
    first = tracemalloc.Snapshot.load(str(snaps[0]))
    last = tracemalloc.Snapshot.load(str(snaps[-1]))
    total = sum(s.size for s in last.statistics("filename"))
    print(f"== {snaps[-1].name}: {total / 2**20:.1f} MiB traced; top {args.top} sites")
    for stat in last.statistics(args.by)[:args.top]:
        print(stat)
        if args.by == "traceback":
            for line in stat.traceback.format()[-6:]:
                print("    " + line)
    print(f"== growth {snaps[0].name} -> {snaps[-1].name}")
    for diff in last.compare_to(first, args.by)[:args.top]:
        print(diff)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A live VM's fast pass, split: what kscan's CPU pays beyond the hash.

`perf/scale.py` measures the fast pass over replayed VMs, which have no QEMU to ask for
registers. A live VM's pass also fetches every vCPU's registers over QMP (`info
registers -a`) and parses them. This boots one real guest (QEMU/TCG, `--smp` vCPUs),
takes its baseline, and measures kscan's own CPU (the thread's CPU clock: QMP's
reader and writer run on the same event loop) per pass, in alternating blocks so every
figure sees the same machine:

* `registers_us`: `refresh_vcpus()` — the QMP round trip and the parse;
* `parse_us`: parsing the same `info registers -a` text alone (`parse_us_per_vcpu`);
* `check_us`: the pass's checks (`check_registers` + `check_memory`);
* `hash_us`: the floor, raw xxh3-128 of the same regions' views, one call per region.

    pass_vs_hash = (registers + check) / hash   — the live pass over its floor
    registers_share = registers / (registers + check)

    python perf/live_pass.py [--smp 4] [--rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.common import OUT, emit, kscan, live_reference, log, machine
from scanner.check.fastpath import check_memory, check_registers
from scanner.qemu.hmp import parse_registers
from tools.guests import GuestSpec, boot, ensure_kernel


async def _cpu_per_call(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    """Thread CPU seconds per call (the loop's thread: it also runs QMP's I/O)."""
    t0 = time.thread_time()
    for _ in range(n):
        await fn()
    return (time.thread_time() - t0) / n


async def measure(sock: Path, db: str, rounds: int, per_block: int) -> dict[str, Any]:
    async with live_reference(sock, db) as live:
        vm, ref = live.vm, live.ref
        views = [v for _, views, _, _ in ref.compare_list() for v in views]
        text = await vm.qmp.hmp("info registers -a")
        vcpus = len(parse_registers(text))
        nbytes = sum(len(v) for v in views)

        async def registers() -> None:
            await vm.refresh_vcpus()

        async def parse() -> None:
            parse_registers(text)

        async def check() -> None:
            res = check_registers(ref, vm.mem, vm.vcpus)
            if not (res.ok and check_memory(ref, vm.mem, keyed=False).ok):
                raise SystemExit("fast pass failed on an unchanged VM")

        async def raw() -> None:
            for v in views:
                xxhash.xxh3_128_digest(v)

        parts: dict[str, Callable[[], Awaitable[Any]]] = {
            "registers": registers, "parse": parse, "check": check, "hash": raw}
        got: dict[str, list[float]] = {k: [] for k in parts}
        for fn in parts.values():  # warm-up
            await _cpu_per_call(fn, 5)
        for _ in range(rounds):
            for name, fn in parts.items():
                got[name].append(await _cpu_per_call(fn, per_block))
    us = {k: statistics.median(v) * 1e6 for k, v in got.items()}
    live_us = us["registers"] + us["check"]
    return {
        "vcpus": vcpus, "region_bytes": nbytes,
        "registers_us": us["registers"], "parse_us": us["parse"],
        "parse_us_per_vcpu": us["parse"] / vcpus, "qmp_us": us["registers"] - us["parse"],
        "check_us": us["check"], "hash_us": us["hash"], "live_pass_us": live_us,
        "pass_vs_hash": live_us / us["hash"], "check_vs_hash": us["check"] / us["hash"],
        "registers_share": us["registers"] / live_us,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smp", type=int, default=4, help="vCPUs of the guest (default 4)")
    ap.add_argument("--rounds", type=int, default=7, help="alternating blocks (default 7)")
    ap.add_argument("--per-block", type=int, default=40, help="calls per block (default 40)")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args(argv)
    if args.smp < 1 or args.rounds < 1 or args.per_block < 1:
        ap.error("--smp, --rounds and --per-block must be at least 1")
    work = OUT / "live_pass"
    work.mkdir(parents=True, exist_ok=True)
    db = work / "kscan.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    log(f"booting a guest with {args.smp} vCPUs")
    guests = boot([GuestSpec("lp0", smp=args.smp)], OUT / "guests")
    try:
        g = guests[0]
        kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", str(db))
        kscan("baseline", "--qmp", str(g.qmp_aux), "--db", str(db))
        log(f"measuring ({args.rounds} alternating blocks of {args.per_block} calls)")
        # On uvloop, as `kscan run` is.
        f = uvloop.run(measure(g.qmp, str(db), args.rounds, args.per_block))
    finally:
        for g in guests:
            g.stop()
    f["machine"] = machine()
    emit(f, args.json, [
        ("guest", f"{f['vcpus']} vCPUs, {f['region_bytes'] / 1e6:.1f} MB of regions"),
        ("registers (QMP + parse)", f"{f['registers_us']:.0f} us "
                                    f"(QMP {f['qmp_us']:.0f}, parse {f['parse_us']:.0f}: "
                                    f"{f['parse_us_per_vcpu']:.0f} per vCPU)"),
        ("checks", f"{f['check_us']:.0f} us ({f['check_vs_hash']:.2f}x the hash)"),
        ("hash (floor)", f"{f['hash_us']:.0f} us"),
        ("live pass / hash", f"{f['pass_vs_hash']:.2f}x (registers "
                             f"{100 * f['registers_share']:.0f} % of the pass)"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())

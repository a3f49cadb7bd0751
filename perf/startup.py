#!/usr/bin/env python3
"""Startup: how long until every VM has its first verdict, cold and warm.

A fleet of **replayed** VMs (copies of recordings of real booted guests, as in
`perf/scale.py`) is present before kscan starts. Two runs of the real `kscan run
--replay ... --interval auto --cpu-budget B` over the same fleet and database:

* cold_s — an empty per-VM state (a fresh database: the kernel's profile and its golden
  baseline only): every VM is located, read and verified in full once;
* warm_s — kscan stopped (SIGTERM) after the cold run and started again on the same
  database and the same, unchanged VMs: each VM is resumed from its persisted state.

Each figure is seconds from starting the `kscan run` process (Python start-up
included) until every VM has had its first verdict (`vm_clean` or `tamper`). A `tamper`
on these untouched VMs fails the run. Also reported per run: kscan's CPU seconds
until then (`*_cpu_s`), and how many VMs were resumed (`vm_clean` with `resumed`).

    python perf/startup.py [--vms 500] [--budget 10] [--startup-budget 100] [--json]

The last line with --json is `{"vms", "cold_s", "warm_s", ...}`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.common import OUT, database, emit, log, machine, process_cpu_s, recordings
from tools.kscan_run import KscanRun
from tools.record import clone


def fleet_of(recs: list[Path], fleet: Path, n: int) -> list[Path]:
    """`n` replayed VMs under `fleet` (vm0000, ...), copies of `recs` in turn; copies
    already there are kept (their memory is never written here)."""
    fleet.mkdir(parents=True, exist_ok=True)
    staging = fleet.parent / "staging"
    out = []
    for i in range(n):
        final = fleet / f"vm{i:04d}"
        if not (final / "vm.json").exists():
            shutil.rmtree(final, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
            (d,) = clone(recs[i % len(recs)], str(staging / "vm"), 1, i)
            data = json.loads((d / "vm.json").read_text())
            data["name"] = final.name
            (d / "vm.json").write_text(json.dumps(data))
            d.rename(final)
        out.append(final)
    for extra in fleet.glob("vm*"):  # a larger fleet from an earlier run
        if extra not in out:
            shutil.rmtree(extra)
    return out


def first_verdicts(args: list[str], err: Path, n: int, limit: float) -> dict[str, Any]:
    """Start `kscan run args`; seconds until `n` VMs have a first verdict; then stop it."""
    t0 = time.monotonic()
    k = KscanRun(args, err)
    try:
        verdicts: set[str] = set()
        resumed = 0
        seen = 0
        while len(verdicts) < n:
            if time.monotonic() - t0 > limit:
                raise SystemExit(f"only {len(verdicts)} of {n} VMs verified after {limit:.0f}s")
            if k.proc.poll() is not None:
                raise SystemExit(f"kscan exited ({k.proc.returncode}); see {err}")
            with k.cond:
                if len(k.events) == seen:
                    k.cond.wait(0.5)
                new, seen = k.events[seen:], len(k.events)
            for e in new:
                if e["event"] == "tamper":
                    raise SystemExit(f"tampering reported on untouched VM {e['vm']}")
                if e["event"] == "vm_clean":
                    verdicts.add(e["vm"])
                    resumed += bool(e.get("resumed"))
        elapsed = time.monotonic() - t0
        cpu = process_cpu_s(k.proc.pid)
        periods = [e["period_s"] for e in k.of("stats")]
    finally:
        k.stop()
    return {"s": elapsed, "cpu_s": cpu, "resumed": resumed, "period_s": periods[-1:] or None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=500)
    ap.add_argument("--budget", type=float, default=10.0, help="--cpu-budget, percent")
    ap.add_argument("--startup-budget", type=float, default=None,
                    help="--startup-budget, percent (default: kscan's own default)")
    ap.add_argument("--distinct", type=int, default=3, help="real guests recorded")
    ap.add_argument("--limit", type=float, default=1800.0,
                    help="give up after this many seconds per run")
    ap.add_argument("--work", type=Path, default=OUT / "startup",
                    help="where the replayed fleet and the database go")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args(argv)

    recs = recordings(args.distinct)
    work = args.work.resolve()
    log(f"REPLAYED VMs: {args.vms} copies of {len(recs)} recorded real guests; no QEMU runs")
    fleet = fleet_of(recs, work / "vms", args.vms)
    db = database(work, recs[0])
    run_args = ["--replay", str(work / "vms" / "vm*"), "--db", db, "--interval", "auto",
                "--cpu-budget", str(args.budget), "--stats-every", "5",
                "--forensics-dir", str(work / "forensics")]
    if args.startup_budget is not None:
        run_args += ["--startup-budget", str(args.startup_budget)]
    log(f"cold start: {len(fleet)} VMs, empty per-VM state")
    cold = first_verdicts(run_args, work / "cold.err", len(fleet), args.limit)
    log(f"cold: every VM verified after {cold['s']:.1f}s ({cold['cpu_s']:.1f} CPU-s)")
    log("warm restart: same database, same VMs")
    warm = first_verdicts(run_args, work / "warm.err", len(fleet), args.limit)
    log(f"warm: every VM verified after {warm['s']:.1f}s ({warm['cpu_s']:.1f} CPU-s), "
        f"{warm['resumed']} resumed")
    figures = {"vms": len(fleet), "cold_s": round(cold["s"], 2), "warm_s": round(warm["s"], 2),
               "cold_cpu_s": round(cold["cpu_s"], 2), "warm_cpu_s": round(warm["cpu_s"], 2),
               "warm_resumed": warm["resumed"], "budget_percent": args.budget,
               "startup_budget_percent": args.startup_budget, "replayed": True,
               "machine": machine()}
    emit(figures, args.json, [
        ("VMs (replayed)", str(len(fleet))),
        ("cold start", f"{cold['s']:.1f} s until every first verdict "
                       f"({cold['cpu_s']:.1f} CPU-s)"),
        ("warm restart", f"{warm['s']:.1f} s ({warm['cpu_s']:.1f} CPU-s, "
                         f"{warm['resumed']} VMs resumed)"),
        ("targets", "cold <= 120 s, warm <= 15 s (2 cores)"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())

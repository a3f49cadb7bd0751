#!/usr/bin/env python3
"""Overhead: kscan's CPU per fast pass against the raw hash's, both run as the budget runs them.

Issue 17's floor is raw xxh3-128 over every VM's regions, back to back (`perf/scale.py`
measures it after kscan stops). Held to a budget, kscan does not run back to back: at
10 % of a core it hashes a batch of VMs, sleeps, and comes back to memory it left a
period ago. On this machine the raw hash itself sometimes costs more per byte run that
way (it comes and goes with the host), so `scale.py`'s `sweep_vs_floor` can mix two
things: what kscan does beyond the hash, and what the machine charges for hashing at a
low duty cycle. This benchmark tells them apart. With one fleet of replayed VMs and
one `kscan run --cpu-budget B`, it takes turns (`--rounds` of them):

* **kscan** — a window of at least `--window` seconds between two `stats` events: the
  process's CPU seconds ÷ the fast passes `stats` counted (and the share of them that
  were keyed);
* **floor at the budget** — kscan stopped (SIGSTOP), raw xxh3-128 of every VM's regions
  in batches of what the pacer releases at once at this budget, spread over the interval
  kscan's VMs were scanned at in the window (fleet size × window ÷ passes): what a
  scanner that did nothing but hash would pay, paced the same way;
* **floor back to back** — the same passes with no sleep (the issue's floor).

Inside kscan's own process, the `stats` events' `scan_cpu_percent` splits each pass's
CPU into the pass's own checks (hashing and comparing) and the engine around them
(`in_pass_ms_per_pass`, `around_ms_per_pass`): both sides measured in the same process at
the same time, so host drift does not move the split.

The medians are compared. `overhead` = kscan ÷ the floor at the budget, with kscan's keyed
share priced into the floor (the keyed construction's cost over raw xxh3, measured back to
back): kscan's own work beyond the hash. `pacing` = the floor at the budget ÷ the floor
back to back: the machine's. `kscan_vs_floor` = kscan ÷ the floor back to back, about
their product. VMs are REPLAYED recordings of real guests, as in `scale.py`.

    python perf/overhead.py [--vms 500] [--budget 10] [--rounds 6] [--window 30] [--json]
    python perf/overhead.py --budget 90     # kscan nearly flat out: little pacing left
    python perf/overhead.py --cool          # the steady state: once no VM is hot
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.common import database, emit, log, machine, recordings, run
from perf.scale import (
    FleetMemory,
    Kscan,
    add_clones,
    fleet_fits,
    layout_of,
    pacer_batch,
    region_runs,
    scan_share,
    settle,
)
from scanner.run.scheduler import HOT_SECONDS


def kscan_window(k: Kscan, seconds: float) -> dict[str, float]:
    """kscan's CPU, passes and keyed passes between two stats events ≥ `seconds` apart."""
    k.wait_for(lambda e: e["event"] == "stats", 60, k.mark())
    mark, cpu0, t0 = k.mark(), k.cpu(), time.monotonic()
    time.sleep(max(0.0, seconds - 1))
    k.wait_for(lambda e: e["event"] == "stats", 60, k.mark())
    cpu1, t1 = k.cpu(), time.monotonic()
    with k.cond:
        stats = [e for e in k.events[mark:] if e["event"] == "stats"]
    return {"cpu_s": cpu1 - cpu0, "wall_s": t1 - t0, "passes": sum(e["scans"] for e in stats),
            "keyed": sum(e.get("keyed_scans", 0) for e in stats),
            "scan_share": scan_share(stats)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python perf/overhead.py --vms 500 --budget 10\n"
               "  python perf/overhead.py --vms 20 --rounds 3 --window 10 --json")
    ap.add_argument("--vms", type=int, default=500, help="replayed VMs (default 500)")
    ap.add_argument("--budget", type=float, default=10.0, help="kscan's --cpu-budget (10)")
    ap.add_argument("--rounds", type=int, default=6, help="turns of kscan and floor (6)")
    ap.add_argument("--window", type=float, default=30.0,
                    help="seconds of kscan per turn (30)")
    ap.add_argument("--distinct", type=int, default=3, help="real guests recorded (3)")
    ap.add_argument("--settle", type=float, default=300.0,
                    help="longest wait for kscan's steady state after the first verdicts")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/kscan-overhead"),
                    help="where the fleet goes: tmpfs, as guest RAM is (default %(default)s)")
    ap.add_argument("--cool", action="store_true",
                    help="measure once no VM is hot any more (HOT_SECONDS after the first "
                         "verdicts), as scale.py --cool: the steady state, without the "
                         "cold start's tail in the first rounds")
    ap.add_argument("--keep", action="store_true", help="leave the fleet in --work")
    ap.add_argument("--force", action="store_true", help="run even if the fleet won't fit")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)
    if args.vms < 1 or args.rounds < 1 or args.window <= 0 or not 0 < args.budget <= 100:
        ap.error("--vms and --rounds must be ≥ 1, --window > 0, --budget in (0, 100]")

    recs = recordings(args.distinct)
    work = args.work.resolve()
    fleet = work / "vms"
    shutil.rmtree(fleet, ignore_errors=True)
    fleet.mkdir(parents=True)
    unfit = fleet_fits(recs, args.vms, work)
    if unfit is not None:
        print(f"perf/overhead.py: {unfit}" + ("" if args.force else " (--force: run anyway)"),
              file=sys.stderr)
        if not args.force:
            return 2
    try:
        return measure(args, recs, work, fleet)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, recs: list[Path], work: Path, fleet: Path) -> int:
    db = database(work, recs[0])
    layout = layout_of(run(region_runs(recs, db)))
    source_of: dict[str, str] = {}
    log(f"fleet: {args.vms} replayed VMs ({len(recs)} real guests recorded, copied per VM)")
    add_clones(recs, work, 0, args.vms, source_of)
    vms = sorted(fleet.glob("vm*"))
    mem = FleetMemory(vms, layout, source_of)
    mem.raw()  # maps every page (kscan's mappings are mapped too)
    mem.keyed()
    k = Kscan(["--replay", str(fleet / "vm*"), "--db", db, "--interval", "auto",
               "--cpu-budget", str(args.budget), "--stats-every", "2",
               "--forensics-dir", str(work / "forensics")], work / "run.err")
    rounds: list[dict[str, float]] = []
    try:
        while k.count("vm_clean") < args.vms:
            if k.of("tamper"):
                raise SystemExit("tampering reported on an untouched VM")
            if k.proc.poll() is not None:
                raise SystemExit((work / "run.err").read_text()[-3000:])
            time.sleep(1)
        if args.cool:  # a VM is hot for HOT_SECONDS after its first check
            log(f"{args.vms} VMs verified; {HOT_SECONDS + 5:.0f}s more until none is hot")
            time.sleep(HOT_SECONDS + 5)
        log(f"{args.vms} VMs verified; waiting for the steady state")
        settle(k, args.settle)
        keyed_ratio = 1.0  # the keyed construction's CPU over raw xxh3's, from round 1
        for i in range(args.rounds):
            w = kscan_window(k, args.window)
            interval = args.vms * w["wall_s"] / max(w["passes"], 1)
            per_pass = w["cpu_s"] / max(w["passes"], 1)
            os.kill(k.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(0.5)
                raw_cpu = mem.raw()
                batch = pacer_batch(args.budget, raw_cpu / args.vms)
                paced_cpu = mem.raw(interval, batch)
                if i == 0:  # medians of 3 back to back each, as scale.py's floors
                    keyed_ratio = (statistics.median(mem.keyed() for _ in range(3))
                                   / max(statistics.median(mem.raw() for _ in range(3)),
                                         1e-9))
            finally:
                os.kill(k.proc.pid, signal.SIGCONT)
            rounds.append({"kscan_ms": 1000 * per_pass, "keyed_fraction":
                           w["keyed"] / max(w["passes"], 1), "interval_s": interval,
                           "batch": batch, "floor_paced_ms": 1000 * paced_cpu / args.vms,
                           "floor_ms": 1000 * raw_cpu / args.vms,
                           "in_pass_ms": 1000 * per_pass * w["scan_share"],
                           "around_ms": 1000 * per_pass * (1 - w["scan_share"]),
                           "passes": w["passes"]})
            log(f"round {i + 1}: " + json.dumps(rounds[-1]))
            # kscan was stopped: let its bucket and pacer find their pace again.
            k.wait_for(lambda e: e["event"] == "stats", 60, k.mark())
            k.wait_for(lambda e: e["event"] == "stats", 60, k.mark())
    finally:
        k.stop()
        mem.close()

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in rounds))

    share = med("keyed_fraction")
    fast_paced = med("floor_paced_ms") * (1 + share * (keyed_ratio - 1))
    figures: dict[str, Any] = {
        "replayed": True, "vms": args.vms, "budget_percent": args.budget,
        "rounds": rounds, "window_s": args.window, "cool": args.cool,
        "kscan_ms_per_pass": med("kscan_ms"), "keyed_fraction": share,
        "keyed_vs_raw": keyed_ratio, "interval_s": med("interval_s"),
        "floor_ms_per_vm": med("floor_ms"), "floor_paced_ms_per_vm": med("floor_paced_ms"),
        "fast_path_floor_paced_ms_per_vm": fast_paced,
        "overhead": med("kscan_ms") / max(fast_paced, 1e-9),
        "pacing": med("floor_paced_ms") / max(med("floor_ms"), 1e-9),
        "kscan_vs_floor": med("kscan_ms") / max(med("floor_ms"), 1e-9),
        # Inside kscan's process: the passes' own checks, and the engine around them.
        "in_pass_ms_per_pass": med("in_pass_ms"), "around_ms_per_pass": med("around_ms"),
        "machine": machine(),
    }
    f = figures
    emit(figures, args.json, [
        ("VMs", f"{args.vms} replayed, --cpu-budget {args.budget:g}, {args.rounds} rounds "
                f"of ≥{args.window:g} s (medians)"),
        ("kscan", f"{f['kscan_ms_per_pass']:.3f} ms CPU per fast pass "
                  f"({100 * share:.1f}% keyed), each VM every {f['interval_s']:.1f} s"),
        ("inside kscan", f"{f['in_pass_ms_per_pass']:.3f} ms in the pass's own checks "
                         f"(hash, compare), {f['around_ms_per_pass']:.3f} ms around them "
                         "(stats scan_cpu_percent)"),
        ("floor back to back", f"{f['floor_ms_per_vm']:.3f} ms per VM (raw xxh3-128)"),
        ("floor at the budget", f"{f['floor_paced_ms_per_vm']:.3f} ms per VM "
                                f"({f['pacing']:.2f}x back to back: the machine's pacing cost); "
                                f"{fast_paced:.3f} with kscan's keyed share (keyed "
                                f"{keyed_ratio:.1f}x raw)"),
        ("overhead", f"kscan / floor at the budget {f['overhead']:.2f}x; "
                     f"kscan / floor back to back {f['kscan_vs_floor']:.2f}x"),
        ("note", "VMs are REPLAYED recordings of real guests (no QEMU running)"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Soak: one `kscan run --replay` over a churning fleet for M minutes; memory must stay flat.

Replayed VMs (recordings of real guests, each cloned to files of its own, as in
`perf/scale.py`) are watched by one `kscan run --replay --interval auto`. Every `--every`
seconds the fleet churns, in a fixed rotation:

* tamper — bytes of `.text` flipped in a random verified VM, through its memory file
  (as `tools/tamper` does); restored once kscan reports it, then its `tamper_cleared`
  awaited;
* add — a new VM (a fresh clone of a recording) appears;
* reboot — a VM disappears (kscan must say `vm_lost`) and comes back under the same
  name as a fresh clone of a *different* recording (another KASLR slide);
* remove — a VM disappears for good.

Adds and removes balance, so the fleet stays about `--vms`. kscan's USS (private memory,
without the replayed guest RAM mappings: in production those are QEMU's, shared) is
sampled every `--sample` seconds and printed. `uss_initial_mb` is the sample taken when
every VM of the initial fleet has had its first verdict; the growth is measured from
`uss_start_mb`, the median of the three samples after `--warmup` seconds of churn (every
kind of churn done at least once: first-use allocations — a slow path's buffers, the
forensics writer, glibc's arenas — are in), to `uss_end_mb`, the median of the last three
(a slow path's ~19 MB of region copies in flight at a sample is a spike, not growth).

Exits 1 if USS grew more than `--max-growth` percent (5), if a tamper was not reported
within `--detect-timeout` seconds, if a `tamper` (or `tamper_transient`) event named a VM
not tampered at the time (a false alarm), if a new VM got no first verdict in time, or if
kscan still maps files of VMs that are gone.

    python perf/soak.py --minutes 3 --vms 30 [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.common import OUT, database, emit, log, machine, recordings, run
from perf.scale import Kscan, flip, percentile, restore, text_targets
from tools.record import clone

ROTATION = ("tamper", "add", "reboot", "tamper", "remove")

#: Seconds a removed VM's watcher has to notice it and unmap its files (STATE_EVERY
#: is 5 s) before a mapping still held counts as a leak.
LET_GO_S = 15.0


@dataclass
class Vm:
    name: str
    source: str              # the recording it is a clone of
    state: str = "new"       # new, clean, tampered, restoring, gone
    since: float = field(default_factory=time.time)  # when the state began
    tamper: tuple[int, bytes] | None = None  # (offset, original bytes)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.recs = recordings(args.distinct)
        self.work = args.work.resolve()
        self.fleet = self.work / "vms"
        shutil.rmtree(self.fleet, ignore_errors=True)
        self.fleet.mkdir(parents=True)
        self.db = database(self.work, self.recs[0])
        self.targets = run(text_targets(self.recs, self.db))
        self.vms: dict[str, Vm] = {}
        self.next_id = 0
        self.seen = 0  # events processed
        self.latencies: list[float] = []
        self.counts = {a: 0 for a in (*ROTATION, "restore")}
        self.missed: list[str] = []
        self.false_alarms: list[str] = []
        self.unverified: list[str] = []
        self.first_verdicts: list[float] = []

    # -- the fleet ----------------------------------------------------------------------
    def _clone(self, name: str, source: Path) -> None:
        staging = self.work / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        (d,) = clone(source, str(staging / "vm"), 1, 0)
        data = json.loads((d / "vm.json").read_text())
        data["name"] = name
        (d / "vm.json").write_text(json.dumps(data))
        d.rename(self.fleet / name)  # appears complete, or not at all
        self.vms[name] = Vm(name, source.name)

    def add(self) -> str:
        name = f"vm{self.next_id:05d}"
        self.next_id += 1
        self._clone(name, self.rng.choice(self.recs))
        return name

    def pick(self, state: str = "clean") -> Vm | None:
        ready = [v for v in self.vms.values() if v.state == state]
        return self.rng.choice(ready) if ready else None

    def churn(self, action: str) -> None:
        vm = self.pick()
        if action == "add":
            self.add()
        elif vm is None:
            return
        elif action == "tamper":
            off0, size = self.targets[vm.source]
            offset = off0 + self.rng.randrange(0, size - 16) // 16 * 16
            vm.tamper = (offset, flip(self.fleet / vm.name / "mem", offset, 4))
            vm.state, vm.since = "tampered", time.time()
        elif action in ("remove", "reboot"):
            shutil.rmtree(self.fleet / vm.name)
            vm.state, vm.since = "gone" if action == "remove" else "rebooting", time.time()
        self.counts[action] += 1

    # -- kscan's events -----------------------------------------------------------------
    def events(self, k: Kscan) -> None:
        with k.cond:
            new, self.seen = k.events[self.seen:], len(k.events)
        for ev in new:
            vm = self.vms.get(ev.get("vm") or "")
            kind = ev["event"]
            if vm is None:
                continue
            if kind in ("tamper", "tamper_transient"):
                if vm.state != "tampered":
                    self.false_alarms.append(f"{vm.name} ({vm.state}): {kind}")
                    log(f"FALSE ALARM: {kind} on {vm.name}, state {vm.state}")
                    continue
                self.latencies.append(ev["ts"] - vm.since)
                assert vm.tamper is not None
                restore(self.fleet / vm.name / "mem", *vm.tamper)
                vm.tamper, vm.state, vm.since = None, "restoring", time.time()
                self.counts["restore"] += 1
            elif kind == "tamper_cleared" and vm.state == "restoring":
                vm.state, vm.since = "clean", time.time()
            elif kind == "vm_clean" and vm.state == "new":
                self.first_verdicts.append(ev["ts"] - vm.since)
                vm.state, vm.since = "clean", time.time()
            elif kind == "vm_lost" and vm.state == "rebooting":
                others = [r for r in self.recs if r.name != vm.source]
                del self.vms[vm.name]
                self._clone(vm.name, self.rng.choice(others or self.recs))
            elif kind == "vm_lost" and vm.state == "gone":
                del self.vms[vm.name]

    def overdue(self) -> None:
        """Tampers not reported (and other waits) past the timeout."""
        now, limit = time.time(), self.args.detect_timeout
        for vm in list(self.vms.values()):
            if now - vm.since < limit:
                continue
            if vm.state == "tampered":
                self.missed.append(vm.name)
                log(f"MISSED: tamper of {vm.name} not reported in {limit:.0f}s")
                assert vm.tamper is not None
                restore(self.fleet / vm.name / "mem", *vm.tamper)
                vm.tamper, vm.state, vm.since = None, "clean", now
            elif vm.state == "new":
                self.unverified.append(vm.name)
                log(f"no first verdict for {vm.name} in {limit:.0f}s")
                vm.state, vm.since = "stuck", now
            elif vm.state in ("restoring", "gone", "rebooting"):
                log(f"{vm.name}: still {vm.state} after {limit:.0f}s")
                vm.since = now  # said once per timeout; not a verdict on kscan

    def gone_mappings(self, k: Kscan) -> int:
        """Mappings kscan still holds of files of VMs no longer in the fleet."""
        prefix = str(self.fleet) + "/"
        live = {str(self.fleet / n) + "/" for n in self.vms}
        n = 0
        with open(f"/proc/{k.proc.pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if path.startswith(prefix) and (
                        path.endswith("(deleted)")
                        or not any(path.startswith(p) for p in live)):
                    n += 1
        return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--vms", type=int, default=30)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between churn steps")
    ap.add_argument("--sample", type=float, default=15.0, help="seconds between USS samples")
    ap.add_argument("--budget", type=float, default=10.0, help="--cpu-budget, percent")
    ap.add_argument("--distinct", type=int, default=3, help="real guests recorded")
    ap.add_argument("--detect-timeout", type=float, default=120.0)
    ap.add_argument("--max-growth", type=float, default=5.0, help="USS growth allowed, %%")
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds of churn before the start of the USS growth measure")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", type=Path, default=OUT / "soak")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args(argv)

    s = Soak(args)
    log(f"REPLAYED VMs: {args.vms} clones of {len(s.recs)} recorded guests; "
        f"{args.minutes:g} minutes of churn every {args.every:g}s")
    for _ in range(args.vms):
        s.add()
    k = Kscan(["--replay", str(s.fleet / "vm*"), "--db", s.db, "--interval", "auto",
               "--cpu-budget", str(args.budget), "--stats-every", "30",
               "--forensics-dir", str(s.work / "forensics")], s.work / "run.err")
    samples: list[tuple[float, float]] = []
    try:
        t_start = time.monotonic()
        while any(v.state == "new" for v in s.vms.values()):
            s.events(k)
            if k.proc.poll() is not None:
                raise SystemExit(f"kscan exited ({k.proc.returncode}); see {s.work}/run.err")
            if time.monotonic() - t_start > max(600.0, args.vms * 5.0):
                raise SystemExit("the initial fleet was not verified in time")
            time.sleep(0.5)
        log(f"{args.vms} VMs verified after {time.monotonic() - t_start:.0f}s; churn starts")
        s.first_verdicts.clear()  # the start-up burst is not what the soak measures
        t0 = time.monotonic()
        samples.append((0.0, k.uss_mb(s.fleet)))
        print(f"{0:7.0f}s  USS {samples[-1][1]:6.1f} MB  {len(s.vms)} VMs", flush=True)
        end = t0 + args.minutes * 60
        next_churn, next_sample, step = t0 + args.every, t0 + args.sample, 0
        while time.monotonic() < end:
            s.events(k)
            s.overdue()
            if k.proc.poll() is not None:
                raise SystemExit(f"kscan exited ({k.proc.returncode}); see {s.work}/run.err")
            now = time.monotonic()
            if now >= next_churn:
                s.churn(ROTATION[step % len(ROTATION)])
                step += 1
                next_churn += args.every
            if now >= next_sample:
                samples.append((now - t0, k.uss_mb(s.fleet)))
                busy = sum(1 for v in s.vms.values() if v.state != "clean")
                print(f"{now - t0:7.0f}s  USS {samples[-1][1]:6.1f} MB  {len(s.vms)} VMs "
                      f"({busy} busy), {len(s.latencies)} tampers seen", flush=True)
                next_sample += args.sample
            time.sleep(0.25)
        # the last tampers in flight: give them their time
        drain = time.monotonic() + args.detect_timeout
        while (any(v.state in ("tampered", "restoring") for v in s.vms.values())
               and time.monotonic() < drain):
            s.events(k)
            time.sleep(0.25)
        s.events(k)
        s.overdue()
        for v in s.vms.values():
            if v.state == "tampered":
                s.missed.append(v.name)
        samples.append((time.monotonic() - t0, k.uss_mb(s.fleet)))
        # A VM removed in the last seconds is let go at its watcher's next look (the
        # run state every few seconds): only mappings that outlive that are leaks.
        settle = time.monotonic() + LET_GO_S
        leaked = s.gone_mappings(k)
        while leaked and time.monotonic() < settle:
            time.sleep(0.5)
            leaked = s.gone_mappings(k)
    finally:
        k.stop()
    after = [u for t, u in samples if t >= args.warmup][:3] or [samples[0][1]]
    start = statistics.median(after)
    end_mb = statistics.median(u for _, u in samples[-3:])
    growth = 100 * (end_mb - start) / max(start, 1e-9)
    ok = (growth <= args.max_growth and not s.missed and not s.false_alarms
          and not s.unverified and not leaked)
    figures: dict[str, Any] = {
        "replayed": True, "minutes": args.minutes, "vms": args.vms, "every_s": args.every,
        "budget_percent": args.budget, "uss_initial_mb": samples[0][1],
        "uss_start_mb": start, "uss_end_mb": end_mb,
        "uss_max_mb": max(u for _, u in samples), "uss_growth_percent": growth,
        "uss_samples": [[round(t, 1), round(u, 2)] for t, u in samples],
        "churn": s.counts, "tampers_detected": len(s.latencies),
        "latency_p50_s": percentile(s.latencies, 0.5) if s.latencies else None,
        "latency_max_s": max(s.latencies) if s.latencies else None,
        "first_verdict_max_s": max(s.first_verdicts) if s.first_verdicts else None,
        "missed": s.missed, "false_alarms": s.false_alarms, "unverified": s.unverified,
        "gone_vm_mappings": leaked, "ok": ok, "machine": machine()}
    rows = [("USS", f"{samples[0][1]:.1f} MB when verified, {start:.1f} MB after "
                    f"{args.warmup:g}s of churn, {end_mb:.1f} MB at end ({growth:+.1f} %), "
                    f"max {figures['uss_max_mb']:.1f} MB"),
            ("churn", ", ".join(f"{a} {n}" for a, n in s.counts.items())),
            ("tampers", f"{len(s.latencies)} reported, {len(s.missed)} missed, "
                        f"{len(s.false_alarms)} false alarms"),
            ("new VMs", f"{len(s.first_verdicts)} verified, {len(s.unverified)} not in time"),
            ("gone VMs", f"{leaked} mappings of their files still held"),
            ("verdict", "PASS" if ok else "FAIL"),
            ("note", "VMs are REPLAYED recordings of real guests (no QEMU running)")]
    emit(figures, args.json, rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

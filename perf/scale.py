#!/usr/bin/env python3
"""Scale: `kscan run` over 100, 300 and 500 VMs on this 2-core machine.

Booting hundreds of guests is not possible here, so the VMs are REPLAYED: minimal
recordings of real booted guests (distinct KASLR slides; memory + vCPU registers +
layout, see tools/record.py), each copied to its own files so every VM has memory of
its own, watched by the real `kscan run --replay` through the same reading code as a
live VM (only QMP is absent: registers come from the recording).

One `kscan run --interval auto --cpu-budget B` process watches a growing fleet; at each
point, once every VM has had its first check:

* sweep_cpu_s — kscan's CPU seconds per full sweep (CPU used ÷ sweeps done in a window);
  sweep_in_scans_cpu_s — of it, the fast scans' own checks (hashing, comparing: the
  `stats` events' scan_cpu_percent), the rest being the engine around them;
* sweep_wall_s — wall time of a sweep (window ÷ sweeps done in it), and period_s, the
  fleet period P kscan computed (VMs attached or changed in the last 5 minutes are
  scanned every P/2, the others every P);
* cpu_percent — kscan's CPU use in the window, percent of one core (≤ budget);
* latency_p99_s — detection latency: bytes of .text flipped at a random moment in a
  random VM (through its memory file, as `tools/tamper` does) until kscan's `tamper`
  event; several tampers in flight on distinct VMs;
* warmup_s — from the point's VMs all added (each copied into place while kscan runs;
  adding_s is how long the copying took) until the last of them has its first verdict
  (under `--startup-budget`: VMs that appear later open a start-up burst of their own;
  with `--cold`, from kscan's start);
* uss_mb — kscan's private memory: USS, without the guest RAM mappings (in production
  QEMU maps those too, so they are shared, not kscan's).

Targets at 500 VMs: latency p99 ≤ 15 s within a 10 % budget; USS ≤ 150 MB, growing by
< 0.2 MB per VM. Writes perf/scale.png (latency and CPU vs VM count).

`--cold`: the whole fleet (the largest point) is there before kscan starts, so every VM
is first checked in one start-up burst (`--startup-budget`); the steady state measured
after it must be the one growth gives (fleet period, CPU, latency).

    python perf/scale.py [--points 100,300,500] [--tampers 24] [--cold] [--json]

The floor, measured in the same run once kscan has stopped, over each point's VMs (their
own files, mmap'd; the same `.text`/`.rodata`/`__ex_table`/IDT runs kscan hashes): one
warm-up pass, then `--floor-passes` passes (median) of raw xxh3-128 over every region
(`floor_sweep_cpu_s`) and of kscan's keyed construction over the same memory
(`keyed_floor_sweep_cpu_s`: AES-GMAC then AES, `scanner.hashing.keyed_digest`); then
`sweep_vs_floor` and `sweep_vs_keyed_floor` (sweep_cpu_s ÷ each), `floor_period_s` (the
floor's CPU ÷ the budget: the shortest period the budget allows) and
`p99_vs_floor_period`. `period_s` is the period kscan's `stats` measured at the end of
the CPU window (`period_target_s` beside it; `period_at_settle_s`: what it said when the
window began, which after a start-up burst still counts the burst's long waits).

At 1,000 VMs the fleet needs ~18 GB of memory of its own: put `--work` on tmpfs
(`/dev/shm/...`, as QEMU's guest RAM is in production). On a disk-backed `--work` this
machine's kernel evicts pages idle between passes and every sweep re-reads the fleet
from disk; `fleet_fits` refuses that (and a tmpfs fleet larger than free memory) unless
`--force`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.common import (
    OUT,
    ROOT,
    database,
    emit,
    log,
    machine,
    process_cpu_s,
    recordings,
    run,
)
from scanner.check.fastpath import KEYED_EVERY_S
from scanner.check.locate import locate_kernel
from scanner.examine import load_profiles
from scanner.examine.keying import keyed_store
from scanner.run.scheduler import HOT_SECONDS
from scanner.vm.replay import ReplayVm
from tools.kscan_run import KscanRun
from tools.record import clone

PAGE = 4096


class Kscan(KscanRun):
    """`kscan run` plus what the benchmark reads of its process."""

    def count(self, kind: str) -> int:
        with self.cond:
            return len({e["vm"] for e in self.events if e["event"] == kind})

    def cpu(self) -> float:
        return process_cpu_s(self.proc.pid)

    def uss_mb(self, exclude: Path) -> float:
        """Private memory, not counting mappings of files under `exclude`."""
        total = 0
        skip = False
        prefix = str(exclude)
        with open(f"/proc/{self.proc.pid}/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's header line
                    parts = line.split()
                    skip = len(parts) >= 6 and parts[5].startswith(prefix)
                elif head in ("Private_Clean:", "Private_Dirty:") and not skip:
                    total += int(line.split()[1])
        return total / 1024


#: Per recording: the (file name, offset, size) of every run of every region kscan hashes.
Layout = list[tuple[str, int, int]]


async def region_runs(recs: list[Path], db: str) -> dict[str, dict[str, Layout]]:
    """Per recording, per protected region (`.text`, `.rodata`, ...): where each of its
    runs lives in the recording's files — the same places in each of its clones."""
    out: dict[str, dict[str, Layout]] = {}
    async with keyed_store(db) as st:
        profiles = await load_profiles(st)
    for rec in recs:
        vm = await ReplayVm.open(rec)
        try:
            lk = locate_kernel(vm.mem, vm.walker(), vm.vcpus, profiles, vm=vm.name)
            regions: dict[str, Layout] = {}
            for name, region in lk.regions.items():
                regions[name] = []
                for gpa, n in region.runs:
                    path, off = vm.mem.host_range(gpa, n)
                    regions[name].append((Path(path).name, off, n))
            out[rec.name] = regions
        finally:
            await vm.close()
    return out


def text_of(runs: dict[str, dict[str, Layout]]) -> dict[str, tuple[int, int]]:
    """Per recording: (file offset, size) of its .text's first run in its memory file."""
    return {rec: (regions[".text"][0][1], regions[".text"][0][2])
            for rec, regions in runs.items()}


def layout_of(runs: dict[str, dict[str, Layout]]) -> dict[str, Layout]:
    """Per recording: every run of every protected region, in one list."""
    return {rec: [r for rr in regions.values() for r in rr] for rec, regions in runs.items()}


async def text_targets(recs: list[Path], db: str) -> dict[str, tuple[int, int]]:
    return text_of(await region_runs(recs, db))


class FleetMemory:
    """Every VM's region runs, mmap'd read-only from its own files (as kscan maps them):
    the floor's memory."""

    def __init__(self, vms: list[Path], layout: dict[str, Layout],
                 source_of: dict[str, str]) -> None:
        import mmap

        self.maps: list[mmap.mmap] = []
        self.views: list[list[memoryview]] = []
        try:
            for vm in vms:
                files: dict[str, mmap.mmap] = {}
                regions = []
                for name, off, n in layout[source_of[vm.name]]:
                    if name not in files:
                        with open(vm / name, "rb") as f:
                            files[name] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                        self.maps.append(files[name])
                    regions.append(memoryview(files[name])[off:off + n])
                self.views.append(regions)
        except BaseException:
            self.close()
            raise

    @property
    def bytes(self) -> int:
        return sum(len(v) for regions in self.views for v in regions)

    def raw(self, interval: float = 0.0, batch: int = 0) -> float:
        """CPU seconds of one raw xxh3-128 pass over every VM's regions: back to back, or
        `batch` VMs at a time with the batches spread evenly over `interval` seconds (as
        kscan's pacer runs a fleet under a budget)."""
        import xxhash

        h = xxhash.xxh3_128_digest
        size = batch if batch > 0 else max(1, len(self.views))
        groups = [self.views[i:i + size] for i in range(0, len(self.views), size)]
        gap = interval / max(1, len(groups))
        cpu, due = 0.0, time.monotonic()
        for group in groups:
            t0 = time.thread_time()
            for regions in group:
                for v in regions:
                    h(v)
            cpu += time.thread_time() - t0
            due += gap
            left = due - time.monotonic()
            if left > 0:
                time.sleep(left)
        return cpu

    def keyed(self) -> float:
        """CPU seconds of one pass of kscan's keyed construction over every VM's regions
        (`scanner.hashing.keyed_digest`, under the key installed in this process)."""
        from scanner import hashing

        keys = hashing.current()
        t0 = time.thread_time()
        for regions in self.views:
            for v in regions:
                keys.keyed_digest([v])
        return time.thread_time() - t0

    def close(self) -> None:
        for regions in self.views:
            for v in regions:
                v.release()
        self.views = []
        for m in self.maps:
            m.close()
        self.maps = []


def pacer_batch(budget: float, per_vm_cpu: float) -> int:
    """VMs kscan's pacer releases at one wake-up under `budget` percent once the bucket
    binds: it sleeps until its debt is repaid plus TICK of credit and releases that
    much work, at most BATCH_CPU."""
    from scanner.run.pacer import BATCH_CPU, TICK

    return max(1, round(min(BATCH_CPU, TICK * budget / 100) / max(per_vm_cpu, 1e-6)))


def floor_sweeps(vms: list[Path], layout: dict[str, Layout], source_of: dict[str, str],
                 passes: int, interval: float = 0.0, budget: float = 0.0) -> dict[str, float]:
    """The floor of a sweep over `vms`, kscan not running: each VM's own files mmap'd,
    then every region hashed whole — raw xxh3-128 (`floor`) and the keyed construction
    of kscan's keyed passes (`keyed_floor`) — one warm-up pass (maps every page, as
    kscan's mappings are), then `passes` measured passes of each, back to back; CPU
    seconds per pass, the median. With `interval` and `budget`: also `floor_budget`, the
    raw pass run as kscan's pacer runs the fleet at that budget — batches of what it
    releases at once, spread over `interval` (each VM's period in kscan's window). On
    this machine memory read at a low duty cycle sometimes costs more per byte than back
    to back, and sometimes not (perf/README, "2026-12-04 (late): kscan and the floor in
    turns")."""
    import statistics

    mem = FleetMemory(vms, layout, source_of)
    try:
        out: dict[str, float] = {}
        for label, fn in (("floor", mem.raw), ("keyed_floor", mem.keyed)):
            fn()  # warm-up
            out[label] = statistics.median(fn() for _ in range(passes))
        if interval > 0 and budget > 0:
            batch = pacer_batch(budget, out["floor"] / max(1, len(vms)))
            out["floor_budget"] = mem.raw(interval, batch)
            out["floor_budget_batch"] = float(batch)
        out["bytes"] = float(mem.bytes)
        return out
    finally:
        mem.close()


def scan_share(stats: list[dict[str, Any]]) -> float:
    """Of kscan's CPU over these stats events (equal intervals), the share its fast scans'
    own checks took (hashing, comparing: `scan_cpu_percent`); the rest is the engine
    around them. Both come from kscan's own process, so host drift moves them alike."""
    total = sum(e["cpu_percent"] for e in stats)
    return sum(e.get("scan_cpu_percent", 0.0) for e in stats) / total if total > 0 else 0.0


def window_periods(k: Kscan, mark: int) -> dict[str, Any]:
    """The measured and target periods kscan reported at the end of the CPU window."""
    with k.cond:
        stats = [e for e in k.events[mark:] if e["event"] == "stats"]
    if not stats:
        return {}
    return {"period_measured_s": stats[-1]["period_s"],
            "period_target_s": stats[-1].get("period_target_s")}


def add_floor(points: list[dict[str, Any]], vms: list[Path], layout: dict[str, Layout],
              source_of: dict[str, str], passes: int, budget: float) -> None:
    """Each point's floor, over its own VMs (the first `vms` of the fleet), and the
    ratios of kscan's figures to it."""
    for p in points:
        log(f"floor: hashing the regions of {p['vms']} VMs, kscan not running")
        interval = float(p.get("period_measured_s") or p.get("period_s") or 0.0)
        f = floor_sweeps(vms[:p["vms"]], layout, source_of, passes, interval, budget)
        floor, keyed = f["floor"], f["keyed_floor"]
        # The floor of what the fast path hashes with: seeded xxh3 (as costly as raw),
        # and the keyed construction at the share of passes kscan keyed in the window.
        share = float(p.get("keyed_fraction") or 0.0)
        fast_floor = floor + share * (keyed - floor)
        if "floor_budget" in f:
            # The floor run as the budget runs kscan, with kscan's keyed share priced in.
            at = f["floor_budget"] * fast_floor / max(floor, 1e-9)
            p.update({"floor_budget_sweep_cpu_s": f["floor_budget"],
                      "floor_budget_interval_s": interval,
                      "floor_budget_batch": int(f["floor_budget_batch"]),
                      "budget_floor_vs_floor": f["floor_budget"] / max(floor, 1e-9),
                      "fast_path_budget_floor_sweep_cpu_s": at,
                      "sweep_vs_budget_floor": p["sweep_cpu_s"] / max(at, 1e-9)})
        period = floor / (budget / 100)
        keyed_period = keyed / (budget / 100)
        p.update({
            "floor_sweep_cpu_s": floor, "keyed_floor_sweep_cpu_s": keyed,
            "floor_bytes": int(f["bytes"]), "floor_gb_per_s": f["bytes"] / max(floor, 1e-9) / 1e9,
            "sweep_vs_floor": p["sweep_cpu_s"] / max(floor, 1e-9),
            "fast_path_floor_sweep_cpu_s": fast_floor,
            "sweep_vs_fast_path_floor": p["sweep_cpu_s"] / max(fast_floor, 1e-9),
            "p99_vs_fast_path_floor_period":
                p["latency_p99_s"] / max(fast_floor / (budget / 100), 1e-9),
            "sweep_vs_keyed_floor": p["sweep_cpu_s"] / max(keyed, 1e-9),
            "floor_period_s": period, "keyed_floor_period_s": keyed_period,
            "p99_vs_floor_period": p["latency_p99_s"] / max(period, 1e-9),
            "p99_vs_keyed_floor_period": p["latency_p99_s"] / max(keyed_period, 1e-9),
        })
        log(f"floor at {p['vms']} VMs: xxh3 {floor:.2f} CPU-s "
            f"({p['floor_gb_per_s']:.1f} GB/s), keyed {keyed:.2f} CPU-s per sweep")


def floor_rows(points: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f"{p['vms']} VMs floor",
             f"xxh3 {p['floor_sweep_cpu_s']:.2f} CPU-s ({p['floor_gb_per_s']:.1f} GB/s), "
             f"keyed {p['keyed_floor_sweep_cpu_s']:.2f} CPU-s; sweep/floor "
             f"{p['sweep_vs_floor']:.2f}x, sweep/keyed floor {p['sweep_vs_keyed_floor']:.2f}x; "
             f"floor period {p['floor_period_s']:.1f} s, p99/floor period "
             f"{p['p99_vs_floor_period']:.2f}x; sweep/fast-path floor "
             f"{p['sweep_vs_fast_path_floor']:.2f}x (keyed "
             f"{100 * p.get('keyed_fraction', 0):.1f}% of passes)"
             + (f"; floor at the budget (batches of {p['floor_budget_batch']} VMs over "
                f"{p['floor_budget_interval_s']:.1f} s) {p['floor_budget_sweep_cpu_s']:.2f} "
                f"CPU-s ({p['budget_floor_vs_floor']:.2f}x), sweep/it with the keyed share "
                f"{p['sweep_vs_budget_floor']:.2f}x" if "floor_budget_sweep_cpu_s" in p
                else ""))
            for p in points if "floor_sweep_cpu_s" in p]


def flip(path: Path, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, n, offset)
        os.pwrite(fd, bytes(~b & 0xFF for b in old), offset)
        return old
    finally:
        os.close(fd)


def restore(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def latencies(k: Kscan, vms: list[Path], source_of: dict[str, str],
              targets: dict[str, tuple[int, int]], count: int, period: float,
              in_flight: int, rng: random.Random) -> list[float]:
    """Tamper `count` times (at most `in_flight` at once, distinct VMs) at random moments;
    return detection latencies in seconds."""
    results: list[float] = []
    splits: list[tuple[float, float]] = []  # (until the fast pass saw it, slow path)
    lock = threading.Lock()
    chosen = rng.sample(vms, min(count, len(vms)))

    def one(vm: Path, delay: float) -> None:
        time.sleep(delay)
        off0, size = targets[source_of[vm.name]]
        offset = off0 + rng.randrange(0, size - 16) // 16 * 16
        mark = k.mark()
        t_write = time.time()
        old = flip(vm / "mem", offset, 4)
        ev = k.wait_for(lambda e: e["event"] == "tamper" and e["vm"] == vm.name, 120, mark)
        with lock:
            results.append(ev["ts"] - t_write)
            seen = ev.get("seen_at") or ev["ts"]
            splits.append((seen - t_write, ev["ts"] - seen))
        mark = k.mark()
        restore(vm / "mem", offset, old)
        k.wait_for(lambda e: e["event"] == "tamper_cleared" and e["vm"] == vm.name, 120, mark)

    pending = list(chosen)
    while pending:
        batch, pending = pending[:in_flight], pending[in_flight:]
        threads = [threading.Thread(target=one, args=(vm, rng.uniform(0, period)))
                   for vm in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    log("latency = until a fast pass saw the change + slow path: " + ", ".join(
        f"{a:.1f}+{b:.1f}" for a, b in sorted(splits, key=sum)))
    return results


def settle(k: Kscan, limit: float) -> dict[str, Any]:
    """Wait for the steady state after a warm-up: the budget debt of the first checks
    repaid and the period settled — three stats events in a row whose scan counts are
    within 15 % of each other (at most `limit` seconds). Returns the last stats event."""
    deadline = time.monotonic() + limit
    recent: list[dict[str, Any]] = []
    while True:
        ev = k.wait_for(lambda e: e["event"] == "stats", 60, k.mark())
        recent = [*recent[-2:], ev]
        counts = [e["scans"] for e in recent]
        if len(recent) == 3 and min(counts) > 0 and max(counts) <= 1.15 * min(counts):
            return ev
        if time.monotonic() > deadline:
            log(f"not settled after {limit:.0f}s; measuring anyway")
            return ev


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """Optional modules this run will import at its end, checked at its start."""
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


def plot(points: list[dict[str, Any]], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vms = [p["vms"] for p in points]
    fig, ax1 = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax1.plot(vms, [p["latency_p99_s"] for p in points], "o-", color="tab:red",
             label="detection latency p99 (s)")
    ax1.plot(vms, [p["latency_p50_s"] for p in points], "o--", color="tab:orange",
             label="detection latency p50 (s)")
    ax1.axhline(15, color="tab:red", lw=0.8, ls=":", label="p99 target 15 s")
    ax1.set_xlabel("replayed VMs watched by one kscan process")
    ax1.set_ylabel("seconds")
    ax2 = ax1.twinx()
    ax2.plot(vms, [p["cpu_percent"] for p in points], "s-", color="tab:blue",
             label="kscan CPU (% of one core)")
    ax2.axhline(budget, color="tab:blue", lw=0.8, ls=":", label=f"budget {budget:g}%")
    ax2.set_ylabel("% of one core")
    ax2.set_ylim(0, max(budget * 1.6, max(p["cpu_percent"] for p in points) * 1.2))
    lines = ax1.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
    ax1.set_title("kscan run --interval auto: latency and CPU vs VM count")
    fig.tight_layout()
    fig.savefig(path)


def add_clones(recs: list[Path], work: Path, have: int, n: int,
               source_of: dict[str, str]) -> None:
    """VMs `have`..`n`-1 of the fleet under `work`/vms: copies of `recs` in turn, each
    renamed into place whole (kscan may be watching the directory); `source_of` learns
    which recording each is."""
    fleet, staging = work / "vms", work / "staging"
    for i in range(have, n):
        src = recs[i % len(recs)]
        shutil.rmtree(staging, ignore_errors=True)
        (d,) = clone(src, str(staging / "vm"), 1, i)
        final = fleet / f"vm{i:04d}"
        d.rename(final)  # appears complete, or not at all
        data = json.loads((final / "vm.json").read_text())
        data["name"] = final.name
        (final / "vm.json").write_text(json.dumps(data))
        source_of[final.name] = src.name


def fleet_fits(recs: list[Path], n: int, work: Path) -> str | None:
    """Why a fleet of `n` clones of `recs` under `work` would measure something else than
    kscan (None: it fits). Every VM's memory is its own, so the fleet needs n × a
    recording's populated bytes of RAM. On a disk-backed `work` the kernel may evict
    pages a VM leaves idle between passes (kswapd, or this machine's DAMON pageout of
    memory idle ≥ 60 s): each sweep would then re-read the fleet from disk. On tmpfs
    (like the shared memory QEMU's guest RAM lives in) nothing is evicted, but what
    does not fit is an out-of-memory kill."""
    need = n * max(sum(f.stat().st_blocks * 512 for f in r.iterdir() if f.is_file())
                   for r in recs)
    avail = psutil.virtual_memory().available
    # The file system `work` is on: the longest mount point above it.
    mounts = [p for p in psutil.disk_partitions(all=True)
              if str(work).startswith(p.mountpoint.rstrip("/") + "/")]
    on_tmpfs = bool(mounts) and max(mounts, key=lambda p: len(p.mountpoint)).fstype == "tmpfs"
    gib = 1 << 30
    if on_tmpfs and need > avail - 2 * gib:
        return (f"{n} VMs need {need / gib:.1f} GiB of tmpfs under {work}, and only "
                f"{avail / gib:.1f} GiB of memory is available (2 GiB kept for the rest): "
                "use fewer VMs, or free memory")
    if not on_tmpfs and need > avail * 0.6:
        return (f"{n} VMs need {need / gib:.1f} GiB of page cache ({avail / gib:.1f} GiB "
                f"available) under a disk-backed {work}: pages idle between passes may be "
                "evicted and re-read from disk. Put --work on tmpfs (e.g. /dev/shm/kscan-"
                "scale), as guest RAM is in production")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="100,300,500")
    ap.add_argument("--budget", type=float, default=10.0, help="--cpu-budget, percent")
    ap.add_argument("--distinct", type=int, default=3, help="real guests recorded")
    ap.add_argument("--tampers", type=int, default=24, help="latency samples per point")
    ap.add_argument("--in-flight", type=int, default=2,
                    help="tampers in flight at once (each costs two slow paths)")
    ap.add_argument("--window", type=float, default=0.0,
                    help="CPU window seconds (default: 2 periods, at least 20 s)")
    ap.add_argument("--plot", type=Path, default=ROOT / "perf" / "scale.png")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keyed-every", type=float, default=KEYED_EVERY_S,
                    help="kscan run --keyed-every (default kscan's)")
    ap.add_argument("--settle", type=float, default=180.0,
                    help="longest wait for the steady state after a warm-up (seconds)")
    ap.add_argument("--work", type=Path, default=OUT / "scale",
                    help="where the replayed fleet and the database go")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--force", action="store_true",
                    help="run even if the fleet does not fit in memory (see fleet_fits)")
    ap.add_argument("--floor-passes", type=int, default=3,
                    help="measured passes of the floor (after kscan stops; 0: no floor)")
    ap.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib)")
    ap.add_argument("--cool", action="store_true",
                    help="measure each point only once no VM is hot any more (attached in "
                         "the last 5 minutes): the steady state of a fleet at rest")
    ap.add_argument("--cold", action="store_true",
                    help="a cold start: the largest point's VMs all there before kscan "
                         "starts (one point), instead of a growing fleet")
    args = ap.parse_args(argv)
    if not args.no_plot:
        missing = missing_modules(("matplotlib",))
        if missing:  # found now, not after a 20-minute run
            print(f"perf/scale.py: {', '.join(missing)} not installed; install the perf "
                  "extras (pip install -e '.[perf]') or pass --no-plot", file=sys.stderr)
            return 2
    points_n = [int(x) for x in args.points.split(",")]
    if args.cold:
        points_n = [max(points_n)]
    rng = random.Random(args.seed)

    recs = recordings(args.distinct)
    work = args.work.resolve()
    fleet = work / "vms"
    shutil.rmtree(fleet, ignore_errors=True)  # before measuring what memory is free
    fleet.mkdir(parents=True)
    unfit = fleet_fits(recs, max(points_n), work)
    if unfit is not None:
        print(f"perf/scale.py: {unfit}" + ("" if args.force else " (--force: run anyway)"),
              file=sys.stderr)
        if not args.force:
            return 2
    db = database(work, recs[0])
    runs = run(region_runs(recs, db))
    targets, layout = text_of(runs), layout_of(runs)
    log(f"REPLAYED VMs: {len(recs)} real guests recorded, copied per VM; no QEMU runs")
    source_of: dict[str, str] = {}

    def grow(have: int, n: int) -> None:
        add_clones(recs, work, have, n, source_of)

    have = 0
    if args.cold:
        log(f"cold start: {points_n[0]} replayed VMs there before kscan starts")
        grow(0, points_n[0])
        have = points_n[0]
    started = time.monotonic()
    k = Kscan(["--replay", str(fleet / "vm*"), "--db", db, "--interval", "auto",
               "--cpu-budget", str(args.budget), "--stats-every", "5",
               "--keyed-every", str(args.keyed_every),
               "--forensics-dir", str(work / "forensics")], work / "run.err")
    points = []
    try:
        for n in points_n:
            log(f"fleet: {have} -> {n} replayed VMs")
            t_add = time.monotonic()
            grow(have, n)
            have = n
            t0, warm_mark = time.monotonic(), k.mark()
            adding = t0 - t_add  # copying the VMs into place (kscan checks them meanwhile)
            if args.cold:
                t0, warm_mark = started, 0
            while k.count("vm_clean") < n:
                with k.cond:
                    false = [e for e in k.events[warm_mark:] if e["event"] == "tamper"]
                if false:
                    raise SystemExit(f"tampering reported on untouched VM {false[0]['vm']}")
                time.sleep(1)
            warm = time.monotonic() - t0
            if args.cool:  # a VM is hot for HOT_SECONDS after its first check
                log(f"{n} VMs verified after {warm:.0f}s; {HOT_SECONDS + 5:.0f}s more until "
                    "none is hot")
                time.sleep(HOT_SECONDS + 5)
            stats = settle(k, args.settle)
            period = stats["period_s"]
            window = args.window or max(20.0, 2 * period)
            log(f"{n} VMs verified after {warm:.0f}s, settled after "
                f"{time.monotonic() - t0 - warm:.0f}s more (kscan's period then {period:.1f}s); "
                f"measuring CPU over {window:.0f}s")
            mark, cpu0, t0 = k.mark(), k.cpu(), time.monotonic()
            time.sleep(window)
            cpu1, t1 = k.cpu(), time.monotonic()
            with k.cond:
                window_stats = [e for e in k.events[mark:] if e["event"] == "stats"]
            scans = sum(e["scans"] for e in window_stats)
            keyed_scans = sum(e.get("keyed_scans", 0) for e in window_stats)
            uss = k.uss_mb(fleet)
            sweeps = max(scans / n, 1e-9)
            periods = window_periods(k, mark)
            # The period kscan measured at the end of the window (just after a start-up
            # burst, the one it said at settling still counts the burst's long waits).
            settled_period, period = period, periods.get("period_measured_s") or period
            log(f"measuring detection latency: {args.tampers} tampers")
            lat = latencies(k, sorted(fleet.glob("vm*")), source_of, targets, args.tampers,
                            period, args.in_flight, rng)
            points.append({
                "vms": n, "sweep_cpu_s": (cpu1 - cpu0) / sweeps,
                # None: no stats event in the window (a window shorter than --stats-every).
                "sweep_in_scans_cpu_s": ((cpu1 - cpu0) / sweeps * scan_share(window_stats)
                                         if window_stats else None),
                "sweep_wall_s": (t1 - t0) / sweeps, "period_s": period,
                "period_at_settle_s": settled_period,
                "cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0),
                "latency_p99_s": percentile(lat, 0.99), "latency_p50_s": percentile(lat, 0.5),
                "latency_max_s": max(lat), "latency_samples": len(lat), "uss_mb": uss,
                "warmup_s": warm, "adding_s": 0.0 if args.cold else adding,
                "cold": args.cold, "cool": args.cool,
                "period_factor": stats.get("period_factor"),
                "keyed_fraction": keyed_scans / max(scans, 1), "keyed_every_s": args.keyed_every,
                **periods,
            })
            log(json.dumps(points[-1]))
    finally:
        k.stop()
    if args.floor_passes > 0:
        add_floor(points, sorted(fleet.glob("vm*")), layout, source_of, args.floor_passes,
                  args.budget)
    growth = ((points[-1]["uss_mb"] - points[0]["uss_mb"])
              / max(1, points[-1]["vms"] - points[0]["vms"])) if len(points) > 1 else 0.0
    if not args.no_plot:
        plot(points, args.plot, args.budget)
    figures = {"replayed": True, "budget_percent": args.budget, "points": points,
               "uss_growth_mb_per_vm": growth, "plot": str(args.plot), "machine": machine()}
    rows = [(f"{p['vms']} VMs", f"sweep {p['sweep_cpu_s']:.2f} CPU-s / {p['sweep_wall_s']:.1f} s"
             + (f" wall ({p['sweep_in_scans_cpu_s']:.2f} in the scans' own checks)"
                if p["sweep_in_scans_cpu_s"] is not None else " wall")
             + f", CPU {p['cpu_percent']:.1f}%, latency p50 {p['latency_p50_s']:.1f} s "
             f"p99 {p['latency_p99_s']:.1f} s, USS {p['uss_mb']:.0f} MB, first verdicts of the "
             f"point's VMs {p['warmup_s']:.0f} s") for p in points]
    rows += floor_rows(points)
    rows.append(("USS growth", f"{growth:.3f} MB per VM"))
    rows.append(("note", "VMs are REPLAYED recordings of real guests (no QEMU running)"))
    emit(figures, args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared set-up for the benchmarks: real guests, recordings, a database, timing helpers.

Every benchmark boots or replays the guests it needs by itself:

* `live_guests(n)` boots real guests (QEMU/TCG, Debian cloud kernel) for the duration;
* `recordings(k)` boots k guests once, records each with `tools.record --minimal`
  (distinct KASLR slides), and caches them under perf/out/recordings;
* `database(dir)` builds a kscan database with the kernel's profile and a golden
  baseline taken from the first recording.

Figures are ratios or counts measured in one run; absolute times are context only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "perf" / "out"
sys.path.insert(0, str(ROOT))

from tools.guests import Guest, GuestSpec, boot, ensure_kernel  # noqa: E402

if TYPE_CHECKING:
    from scanner.check.fastpath import Reference
    from scanner.examine import Examined
    from scanner.image.kernel_profile import KernelProfile
    from scanner.vm import AttachedVm
    from store import Store


def log(msg: str) -> None:
    print(f"[perf] {msg}", file=sys.stderr, flush=True)


def kscan(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "scanner", *args], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode not in (0, 1):
        raise SystemExit(f"kscan {' '.join(args)} failed: {out.stderr}")
    return out.stdout


@contextlib.contextmanager
def live_guests(n: int, prefix: str = "perf") -> Iterator[list[Guest]]:
    run_dir = OUT / "guests"
    guests = boot([GuestSpec(f"{prefix}{i}") for i in range(n)], run_dir)
    try:
        yield guests
    finally:
        for g in guests:
            g.stop()


@dataclass
class LiveReference:
    """A live guest attached and examined, with its fast-path reference and the store
    (and profiles) it was examined against."""

    st: Store
    profiles: list[KernelProfile]
    vm: AttachedVm
    ex: Examined
    ref: Reference


@contextlib.asynccontextmanager
async def live_reference(sock: Path, db: str) -> AsyncIterator[LiveReference]:
    """Attach the guest behind QMP socket `sock`, examine it and make its fast-path
    reference, as the watcher does after a full check; released and detached on exit."""
    from scanner.check.fastpath import make_reference
    from scanner.examine import examine, load_profiles
    from scanner.examine.keying import keyed_store
    from scanner.vm import AttachedVm

    async with keyed_store(db) as st:
        profiles = await load_profiles(st)
        vm = await AttachedVm.attach(sock)
        try:
            ex = await examine(vm, profiles)
            ref = make_reference(vm.mem, ex.lk, ex.vcpus, ex.space.pgd,
                                 ex.space.top_shift, ex.raw_digests)
            try:
                yield LiveReference(st, profiles, vm, ex, ref)
            finally:
                ref.release()
        finally:
            await vm.close()


def recordings(k: int) -> list[Path]:
    """k minimal recordings of real booted guests with distinct slides (cached)."""
    base = OUT / "recordings" / ensure_kernel().release
    have = sorted(p for p in base.glob("rec*") if (p / "vm.json").exists())
    if len(have) >= k:
        return have[:k]
    log(f"recording {k} real guests (booted once, cached in {base})")
    db = str(base / "record.db")
    base.mkdir(parents=True, exist_ok=True)
    kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", db)
    with live_guests(k, "rec") as guests:
        for i, g in enumerate(guests):
            subprocess.run([sys.executable, "-m", "tools.record", "save", "--qmp",
                            str(g.qmp_aux), "--out", str(base / f"rec{i}"), "--minimal",
                            "--db", db, "--name", f"rec{i}"], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
    return sorted(p for p in base.glob("rec*") if (p / "vm.json").exists())[:k]


def database(directory: Path, recording: Path) -> str:
    """A fresh database with the kernel's profile and a baseline from `recording`."""
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "kscan.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", str(db))
    kscan("baseline", "--replay", str(recording), "--db", str(db))
    return str(db)


def timeit(fn: Callable[[], Any], n: int) -> float:
    """Seconds per call over n calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def interleaved(a: Callable[[], Any], b: Callable[[], Any], n: int,
                rounds: int) -> tuple[float, float]:
    """Median seconds per call of a and of b, measured in alternating blocks so both
    see the same machine (these hosts are shared and noisy)."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timeit(a, n))
        tb.append(timeit(b, n))
    return statistics.median(ta), statistics.median(tb)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread, exited ones too) another process has
    used, to the nanosecond: its process CPU clock. /proc/PID/stat (psutil) counts in
    10 ms ticks, which reads 0 over a short window of a small fleet."""
    clock = ((~pid) << 3) | 2   # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    try:
        return time.clock_gettime(clock)
    except OSError:  # the process is gone, or a kernel without CPU clocks of others
        import psutil

        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "kernel": platform.release()}


def emit(figures: dict[str, Any], as_json: bool, table: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in table) if table else 0
    for k, v in table:
        print(f"{k:<{width}}  {v}")
    if as_json:
        print(json.dumps(figures))


def run(coro: Any) -> Any:
    return asyncio.run(coro)

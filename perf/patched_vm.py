"""What verified patching costs: the slow path that verifies a kernel with the function
tracer on, and the fast path afterwards, against the same VM unpatched.

Boots two real guests (Debian 6.1, TCG), baselines one, and on the other measures, in
one run on this machine:

* `slow_unpatched_s` / `slow_ftrace_s`: CPU seconds of one full check (examine + verify)
  before and after `echo function > current_tracer` (~35,000 ftrace sites in ~2,363
  `.text` pages, every one verified); target: under 1 s;
* `attribution_s`: of `slow_ftrace_s`, the CPU seconds of attributing every runtime
  patch to its owner (`scanner.check.attribution`: the ftrace ops list and filters, the
  kprobe table, the module list), timed on its own on the same patches, and
  `attribution_share` (its share of the full check);
* `fast_unpatched_ms` / `fast_ftrace_ms`: one fast pass (the patched state becomes the
  VM's checked state), and their ratio `fast_ftrace_vs_unpatched` (target ≈ 1).

    .venv/bin/python perf/patched_vm.py [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.common import OUT, emit, interleaved, kscan, live_guests, log, machine, run
from scanner.check.attribution import attribute
from scanner.check.fastpath import fast_scan, make_reference
from scanner.check.kernel_lists import walker_reader
from scanner.examine import check_examined, examine, golden_for, load_profiles
from scanner.examine.keying import keyed_store
from scanner.vm import AttachedVm
from tools.guests import Guest, ensure_kernel


async def measure(g: Guest, db: str, rounds: int) -> dict[str, float]:
    vm = await AttachedVm.attach(g.qmp_aux)
    async with keyed_store(db) as st:
        profiles = await load_profiles(st)

        async def slow() -> tuple[float, object]:
            cpu = []
            ex = None
            for _ in range(rounds):
                t0 = time.thread_time()
                ex = await examine(vm, profiles)
                rep = await check_examined(st, ex, vm.name, await golden_for(st, ex),
                                           mem=vm.mem)
                cpu.append(time.thread_time() - t0)
                assert not rep.tampered, [m.to_json() for m in rep.mismatches[:3]]
            return statistics.median(cpu), (ex, rep)

        t_clean, (ex, rep) = await slow()
        assert rep.patches is None, "the VM is already patched"  # type: ignore[attr-defined]
        ref_clean = make_reference(vm.mem, ex.lk, ex.vcpus, ex.space.pgd,  # type: ignore[attr-defined]
                                   ex.space.top_shift, ex.raw_digests)  # type: ignore[attr-defined]
        log("function tracer on")
        rc, out = g.run("echo function > /sys/kernel/tracing/current_tracer", timeout=240)
        assert rc == 0, out
        try:
            t_ftrace, (ex2, rep2) = await slow()
            counts = rep2.patches.counts()  # type: ignore[attr-defined]
            owners = rep2.patches.attribution  # type: ignore[attr-defined]
            assert owners is not None and not owners.tampering(), "attribution off?"
            runtime = rep2.patches.runtime  # type: ignore[attr-defined]
            t_attr = []
            for _ in range(rounds):
                t0 = time.thread_time()
                attribute(ex2.lk.profile, ex2.lk.slide,  # type: ignore[attr-defined]
                          walker_reader(ex2.space.walker(vm.mem)), runtime)  # type: ignore[attr-defined]
                t_attr.append(time.thread_time() - t0)
            pages = len(rep2.patches.pages)  # type: ignore[attr-defined]
            ref_ftrace = make_reference(vm.mem, ex2.lk, ex2.vcpus, ex2.space.pgd,  # type: ignore[attr-defined]
                                        ex2.space.top_shift, ex2.raw_digests)  # type: ignore[attr-defined]
            # The unpatched reference now fails (the bytes changed): time it on its own
            # digests anyway — same work — and the patched one, which passes.
            assert fast_scan(ref_ftrace, vm.mem, vm.vcpus).ok
            t_unp, t_pat = interleaved(lambda: fast_scan(ref_clean, vm.mem, None),
                                       lambda: fast_scan(ref_ftrace, vm.mem, None), 20, 9)
        finally:
            g.run("echo nop > /sys/kernel/tracing/current_tracer", timeout=240)
    ref_clean.release()
    ref_ftrace.release()
    await vm.close()
    return {"slow_unpatched_s": t_clean, "slow_ftrace_s": t_ftrace,
            "ftrace_sites": counts.get("ftrace", 0), "patched_pages": pages,
            "attribution_s": statistics.median(t_attr),
            "attribution_share": statistics.median(t_attr) / t_ftrace,
            "fast_unpatched_ms": t_unp * 1e3, "fast_ftrace_ms": t_pat * 1e3,
            "fast_ftrace_vs_unpatched": t_pat / t_unp}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args(argv)
    work = OUT / "patched"
    work.mkdir(parents=True, exist_ok=True)
    db = work / "kscan.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    with live_guests(2, "pv") as (golden, target):
        kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", str(db))
        kscan("baseline", "--qmp", str(golden.qmp_aux), "--db", str(db))
        fig = run(measure(target, str(db), args.rounds))
    fig["machine"] = machine()  # type: ignore[assignment]
    emit(fig, args.json, [
        ("slow path, unpatched (CPU s)", f"{fig['slow_unpatched_s']:.3f}"),
        ("slow path, function tracer on (CPU s)", f"{fig['slow_ftrace_s']:.3f}  "
         f"({fig['ftrace_sites']:,} ftrace sites in {fig['patched_pages']:,} pages)"),
        ("of which owner attribution (CPU s)", f"{fig['attribution_s']:.3f}  "
         f"({fig['attribution_share']:.0%} of the check)"),
        ("fast pass, unpatched (ms)", f"{fig['fast_unpatched_ms']:.2f}"),
        ("fast pass, function tracer on (ms)", f"{fig['fast_ftrace_ms']:.2f}"),
        ("fast_ftrace_vs_unpatched", f"{fig['fast_ftrace_vs_unpatched']:.2f}"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())

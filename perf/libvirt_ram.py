#!/usr/bin/env python3
"""libvirt domains, one per RAM kind: kscan's fast pass vs raw xxh3, and what anonymous
RAM (read by copying from /proc/PID/mem) costs per VM against the mmap'd kinds.

Sets up libvirtd (`tools.libvirt_host`), boots TCG domains two at a time with file,
hugepage, memfd and anonymous RAM, attaches to each through libvirt, locates the kernel
and times, interleaved in blocks:

* **raw** — xxh3-128 over the protected regions' bytes as the memory gives them: the
  zero-copy views for the mmap'd kinds; for anonymous RAM a fresh `pread` of each run
  plus the hash (the least any reader of that memory must do);
* **fast** — kscan's fast pass (`fast_scan`: page-table entries, vCPU kernel mappings,
  control registers, region digests), vCPU registers not refreshed (`vs_qemu.py`
  measures the monitor round trip; through libvirt it adds ~7 ms).

    fast_vs_raw = raw time / fast-pass time         (per kind, target ≥ 0.9)
    anon_extra_ms_per_vm = fast pass (anonymous) − fast pass (mean of the mmap'd kinds)

    python perf/libvirt_ram.py [--rounds 15] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.common import emit, interleaved, log, machine, run
from scanner.check.fastpath import fast_scan, make_reference
from scanner.examine import examine
from scanner.image.kernel_profile import profile_from_path
from tools import libvirt_host as lh
from tools.guests import ensure_kernel

KINDS = ("file", "hugepage", "memfd", "anonymous")


async def measure(name: str, rounds: int, n: int) -> dict[str, float]:
    from scanner.vm.domain import attach_domain

    profiles = [profile_from_path(ensure_kernel().vmlinuz)]
    t0 = time.perf_counter()
    vm = await attach_domain(name)
    attach_ms = (time.perf_counter() - t0) * 1e3
    try:
        ex = await examine(vm, profiles)
        ref = make_reference(vm.mem, ex.lk, ex.vcpus, ex.space.pgd, ex.space.top_shift,
                             ex.raw_digests)
        runs = [run_ for r in ex.lk.regions.values() for run_ in r.runs]
        nbytes = sum(k for _, k in runs)
        mem = vm.mem
        views = [v for vs in ref.views.values() for v in vs]

        def raw() -> None:
            if mem.zero_copy:
                for v in views:
                    xxhash.xxh3_128_digest(v)
            else:
                for g, k in runs:
                    xxhash.xxh3_128_digest(mem.view(g, k))

        def fast() -> None:
            if not fast_scan(ref, mem, ex.vcpus).ok:
                raise SystemExit(f"{name}: fast pass failed on an unchanged VM")

        for _ in range(3):
            raw()
            fast()
        t_raw, t_fast = interleaved(raw, fast, n, rounds)
        t_slow = []
        for _ in range(5):
            t1 = time.perf_counter()
            await examine(vm, profiles)
            t_slow.append(time.perf_counter() - t1)
        ref.release()
        return {"region_bytes": nbytes, "zero_copy": mem.zero_copy,
                "raw_ms": t_raw * 1e3, "fast_ms": t_fast * 1e3,
                "fast_vs_raw": t_raw / t_fast, "fast_gbps": nbytes / t_fast / 1e9,
                "examine_ms": statistics.median(t_slow) * 1e3, "attach_ms": attach_ms,
                "ram": str(vm.layout[0].path)}
    finally:
        await vm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args(argv)
    lh.up(hugepages_mb=512)
    kinds: dict[str, Any] = {}
    try:
        for pair in (KINDS[:2], KINDS[2:]):  # two domains at a time
            names = [f"{lh.PREFIX}perf-{k}" for k in pair]
            for k, nm in zip(pair, names, strict=True):
                lh.boot(lh.DomainSpec(nm, k))
            lh.wait_ready(names)
            time.sleep(3)  # let the guests settle into idle
            for k, nm in zip(pair, names, strict=True):
                log(f"measuring {k} RAM ({args.rounds} rounds x {args.per_round})")
                kinds[k] = run(measure(nm, args.rounds, args.per_round))
            for nm in names:
                lh.destroy(nm)
    finally:
        lh.down()
    mapped = statistics.mean(kinds[k]["fast_ms"] for k in KINDS[:3])
    f: dict[str, Any] = {
        "kinds": kinds,
        "anon_fast_ms": kinds["anonymous"]["fast_ms"],
        "mmap_fast_ms": mapped,
        "anon_extra_ms_per_vm": kinds["anonymous"]["fast_ms"] - mapped,
        "anon_vs_mmap": kinds["anonymous"]["fast_ms"] / mapped,
        "machine": machine(),
    }
    table = [(f"{k} ({'mmap' if v['zero_copy'] else 'copy'})",
              f"fast_vs_raw {v['fast_vs_raw']:.3f}  fast {v['fast_ms']:.2f} ms "
              f"({v['fast_gbps']:.1f} GB/s)  raw {v['raw_ms']:.2f} ms  "
              f"examine {v['examine_ms']:.0f} ms") for k, v in kinds.items()]
    table.append(("anonymous vs mmap", f"+{f['anon_extra_ms_per_vm']:.2f} ms per VM per "
                  f"pass ({f['anon_vs_mmap']:.1f}x)"))
    emit(f, args.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

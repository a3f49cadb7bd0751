#!/usr/bin/env python3
"""Ceiling: kscan's fast verification pass vs raw xxh3 over the same memory.

Since keyed comparison, the first fast pass every `--keyed-every` seconds (300 by
default) hashes with the keyed construction (AES-GMAC then AES, `scanner.hashing`)
instead of seeded xxh3. The script times plain and keyed passes apart and weighs them
by the share of passes kscan keys at a `--period` (default 6 s: kscan's period at 500
replayed VMs under --cpu-budget 10): `keyed_share` = period / keyed-every. It also measures that
construction alone over the same views (`keyed_gbps`), the fast path's hashing floor at
that share (`floor_ms`, `floor_vs_raw`) and the pass against that floor (`fast_vs_floor`).

One VM's protected regions (~19 MB: .text, .rodata, __ex_table, IDT), from a recording
of a real booted guest. Both sides hash the same zero-copy memoryviews of the mapped
guest RAM; kscan's pass adds what makes it a verification — proving the translations
unchanged (page-table entries), each vCPU's kernel mapping and control registers, and
comparing digests. Measured in alternating blocks; the ratio is the figure:

    fast_vs_raw = raw time / kscan fast-pass time      (target ≥ 0.9)

The slow path (re-locate, normalize, per-page compare with the baselines) is reported
separately as `slow_path_ms`. A live VM's fast pass also refreshes the vCPU registers
over QMP (`vs_qemu.py` measures that); a recording has them on file.

    python perf/ceiling.py [--rounds 15] [--period 6] [--keyed-every 300] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.common import OUT, database, emit, interleaved, log, machine, recordings, run
from scanner.check.fastpath import KEYED_EVERY_S, fast_scan, make_reference
from scanner.examine import check_examined, examine, golden_for, load_profiles
from scanner.examine.keying import keyed_store
from scanner.hashing import fast_digest, keyed_digest
from scanner.vm.replay import ReplayVm


async def measure(rec: Path, db: str, rounds: int, n: int, period: float,
                  every: float) -> dict[str, float]:
    vm = await ReplayVm.open(rec)
    async with keyed_store(db) as st:
        profiles = await load_profiles(st)
        ex = await examine(vm, profiles)
        golden = await golden_for(st, ex)
        report = await check_examined(st, ex, vm.name, golden)
        assert not report.tampered, "the recording does not match its own baseline"
        ref = make_reference(vm.mem, ex.lk, ex.vcpus, ex.space.pgd, ex.space.top_shift,
                             ex.raw_digests)
        views = [v for vs in ref.views.values() for v in vs]
        nbytes = sum(len(v) for v in views)

        def raw() -> None:
            for v in views:
                xxhash.xxh3_128_digest(v)

        regions = list(ref.views.values())

        def keyed() -> None:   # the keyed construction alone (AES-GMAC, then AES)
            for vs in regions:
                keyed_digest(vs)

        def seeded() -> None:  # the fast digest alone (xxh3_128 seeded from the key)
            for vs in regions:
                fast_digest(vs)

        def fast() -> None:
            if not fast_scan(ref, vm.mem, vm.vcpus, keyed=False).ok:
                raise SystemExit("fast pass failed on an unchanged VM")

        def fast_keyed() -> None:
            if not fast_scan(ref, vm.mem, vm.vcpus, keyed=True).ok:
                raise SystemExit("fast pass failed on an unchanged VM")

        for _ in range(3):  # warm caches and code paths
            raw()
            fast()
        t_raw, t_plain = interleaved(raw, fast, n, rounds)
        t_raw_f, t_fast_keyed = interleaved(raw, fast_keyed, max(1, n // 4), rounds)
        t_keyed_pass = t_fast_keyed * t_raw / t_raw_f  # on the plain passes' raw scale
        # The pass on average: plain passes, and keyed ones at kscan's share.
        share = min(1.0, period / every)
        t_fast = (1 - share) * t_plain + share * t_keyed_pass
        # Each against raw xxh3 in its own alternation (the machine's load drifts).
        t_raw_s, t_seeded = interleaved(raw, seeded, n, rounds)
        t_raw_k, t_keyed = interleaved(raw, keyed, max(1, n // 4), rounds)
        # What the fast path's hashing alone costs on average, relative to raw xxh3:
        # seeded passes, and keyed ones at the same share.
        floor_vs_raw = (1 - share) * t_seeded / t_raw_s + share * t_keyed / t_raw_k
        t_floor = floor_vs_raw * t_raw
        slow = []
        for _ in range(max(5, rounds // 2)):
            t0 = time.perf_counter()
            ex2 = await examine(vm, profiles)
            await check_examined(st, ex2, vm.name, golden)
            slow.append(time.perf_counter() - t0)
            del ex2
    ref.release()
    await vm.close()
    return {
        "region_bytes": nbytes,
        "raw_gbps": nbytes / t_raw / 1e9,
        "fast_gbps": nbytes / t_fast / 1e9,
        "fast_vs_raw": t_raw / t_fast,
        "keyed_gbps": nbytes / t_keyed / 1e9,
        "keyed_vs_raw": t_keyed / t_raw_k,
        "seeded_vs_raw": t_seeded / t_raw_s,
        "keyed_every_s": every, "period_s": period, "keyed_share": share,
        "floor_ms": t_floor * 1e3,
        "floor_vs_raw": floor_vs_raw,
        "fast_vs_floor": t_floor / t_fast,
        "fast_pass_ms": t_fast * 1e3, "plain_pass_ms": t_plain * 1e3,
        "keyed_pass_ms": t_keyed_pass * 1e3,
        "raw_pass_ms": t_raw * 1e3,
        "slow_path_ms": statistics.median(slow) * 1e3,
        "slow_vs_fast": statistics.median(slow) / t_fast,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--period", type=float, default=6.0,
                    help="seconds between two passes of the VM, for the keyed schedule")
    ap.add_argument("--keyed-every", type=float, default=KEYED_EVERY_S,
                    help="kscan run --keyed-every (default kscan's)")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args(argv)
    (rec,) = recordings(1)
    db = database(OUT / "ceiling", rec)
    log(f"measuring on {rec.name} ({args.rounds} rounds x {args.per_round})")
    f = run(measure(rec, db, args.rounds, args.per_round, args.period, args.keyed_every))
    f["machine"] = machine()
    emit(f, args.json, [
        ("protected regions", f"{f['region_bytes'] / 1e6:.1f} MB"),
        ("raw xxh3 over the views", f"{f['raw_gbps']:.1f} GB/s ({f['raw_pass_ms']:.2f} ms)"),
        ("kscan fast pass", f"{f['fast_gbps']:.1f} GB/s ({f['fast_pass_ms']:.2f} ms on "
                            f"average: plain {f['plain_pass_ms']:.2f}, keyed "
                            f"{f['keyed_pass_ms']:.2f} ms)"),
        ("fast_vs_raw", f"{f['fast_vs_raw']:.3f}  (target >= 0.9 unkeyed; keyed: see below)"),
        ("keyed construction alone", f"{f['keyed_gbps']:.1f} GB/s = "
                                     f"{f['keyed_vs_raw']:.1f}x raw xxh3's time"),
        ("seeded xxh3 alone", f"{f['seeded_vs_raw']:.2f}x raw xxh3's time"),
        (f"hashing floor ({100 * f['keyed_share']:.1f}% of passes keyed: every "
         f"{f['keyed_every_s']:g} s at a {f['period_s']:g} s period)",
         f"{f['floor_ms']:.2f} ms = {f['floor_vs_raw']:.2f}x raw xxh3's time"),
        ("fast_vs_floor", f"{f['fast_vs_floor']:.3f}  (floor time / fast-pass time)"),
        ("slow path (full check)", f"{f['slow_path_ms']:.1f} ms = "
                                   f"{f['slow_vs_fast']:.0f}x the fast pass"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())

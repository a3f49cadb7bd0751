"""Patch verification (scanner.check.patching) at the scale of a fully ftrace-enabled kernel.

Synthetic, no guest: a `.text` the size of Debian 6.1's (14,687,986 B) with 35,276
ftrace sites spread over 2,363 of its pages (what the function tracer changed on the
6.1 test guest, DESIGN.md), each a function start. Two live states: every site calls
the one allocated trampoline of a single ftrace_ops (the function tracer alone), and
every site calls ftrace_regs_caller (several ops). Plus 73 jump labels and 7 kprobe
int3s, as measured. Figure: verification time ÷ a plain numpy diff of the same buffers.

    .venv/bin/python perf/patching.py [--json] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scanner.check.patching import NOP5, verify_text_changes
from scanner.image.patchsites import PatchSites

BASE = 0xFFFFFFFF81000000
SLIDE = 0x28E00000
TEXT_SIZE = 14_687_986
SITES = 35_276
PAGES = 2_363
TRAMP_VA = 0xFFFFFFFFC0A00000
OPS = 0xFFFF888003A1B000


def va(off: np.ndarray) -> np.ndarray:
    return np.asarray(off, dtype=np.int64).astype(np.uint64) + np.uint64(BASE)


def build() -> tuple[bytes, bytes, bytes, PatchSites, dict[int, bytes]]:
    rng = np.random.default_rng(7)
    # Code-like filler: simple one-byte instructions (push/pop/nop/ret), so capstone
    # decodes every function quickly and predictably.
    text = rng.choice(np.frombuffer(b"\x50\x51\x52\x53\x58\x59\x5a\x5b\x90", np.uint8),
                      TEXT_SIZE).astype(np.uint8)
    pages = np.sort(rng.choice(np.arange(16, TEXT_SIZE // 4096 - 1), PAGES, replace=False))
    per = np.full(PAGES, SITES // PAGES)
    per[: SITES - per.sum()] += 1
    sites: list[int] = []
    for pg, k in zip(pages.tolist(), per.tolist(), strict=True):
        step = 4096 // k
        sites.extend(pg * 4096 + i * step for i in range(k))
    site_off = np.array(sites, dtype=np.int64)
    cols = site_off[:, None] + np.arange(5)
    text[cols] = np.frombuffer(NOP5, np.uint8)
    # ftrace_caller / ftrace_regs_caller at the start of .text (tiny, as in the tests)
    caller = bytes.fromhex("55 48 89 e5") + b"\x48\x8b\x15" + struct.pack("<i", 0x1000) \
        + b"\xe8" + struct.pack("<i", 0) + bytes.fromhex("5d c3")
    text[0:len(caller)] = np.frombuffer(caller, np.uint8)
    regs_at = 0x40
    text[regs_at:regs_at + len(caller)] = np.frombuffer(caller, np.uint8)
    text[0x80] = 0xC3            # ftrace_stub / callback
    base = text.tobytes()
    funcs = np.unique(np.concatenate([site_off, [0, regs_at, 0x80]]))
    # jump labels (73) in pages without ftrace sites
    free_pages = np.setdiff1d(np.arange(16, TEXT_SIZE // 4096 - 1), pages)[:73]
    jl = free_pages * 4096 + 100
    text[jl[:, None] + np.arange(5)] = np.frombuffer(NOP5, np.uint8)
    base = text.tobytes()
    names = {"ftrace_caller": 0, "ftrace_caller_end": 16, "ftrace_caller_op_ptr": 4,
             "ftrace_call": 11, "ftrace_regs_caller": regs_at, "ftrace_stub": 0x80}
    ps = PatchSites(
        ftrace=va(site_off),
        jump_code=va(jl),
        jump_target=va(jl + 200),
        jump_key=np.zeros(jl.size, dtype=np.uint64),
        ftrace_trampolines={k: (BASE + v, BASE + v) for k, v in names.items()},
        function_starts=va(np.unique(np.concatenate([funcs, jl - 50]))),
    )
    # live 1: every site calls one allocated trampoline
    live1 = np.frombuffer(base, np.uint8).copy()
    # rel32 = TRAMP_VA - (run-time site + 5), computed with the VAs' low 32 bits
    site_rt = (BASE + SLIDE) & 0xFFFFFFFF
    rel = ((TRAMP_VA & 0xFFFFFFFF) - (site_off + site_rt + 5)).astype("<i4")
    live1[site_off] = 0xE8
    live1[cols[:, 1:]] = rel.view(np.uint8).reshape(-1, 4)
    # live 2: every site calls ftrace_regs_caller
    live2 = np.frombuffer(base, np.uint8).copy()
    rel2 = (regs_at - (site_off + 5)).astype("<i4")
    live2[site_off] = 0xE8
    live2[cols[:, 1:]] = rel2.view(np.uint8).reshape(-1, 4)
    for live in (live1, live2):
        for j in jl.tolist():   # static keys on
            live[j:j + 5] = np.frombuffer(b"\xe9" + struct.pack("<i", 195), np.uint8)
        for f in site_off[:7].tolist():   # kprobes just after a function's NOP
            live[f + 5] = 0xCC
    tramp = bytearray(base[0:16]) + b"\xc3\xcc" + OPS.to_bytes(8, "little")
    tramp[7:11] = struct.pack("<i", 16 + 2 - 11)
    tramp[11:16] = b"\xe8" + struct.pack("<i", BASE + 0x80 + SLIDE - (TRAMP_VA + 16))
    return base, live1.tobytes(), live2.tobytes(), ps, {TRAMP_VA: bytes(tramp)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    base, live1, live2, ps, mem = build()

    def read(va: int, size: int) -> bytes | None:
        for s, d in mem.items():
            if s <= va and va + size <= s + len(d):
                return d[va - s:va - s + size]
        return None

    a = np.frombuffer(base, np.uint8)
    figures: dict[str, object] = {}
    for name, live in (("trampoline", live1), ("regs_caller", live2)):
        b = np.frombuffer(live, np.uint8)
        diff_t, ver_t = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            np.flatnonzero(a != b)
            diff_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            v = verify_text_changes(base, live, BASE, SLIDE, ps, read)
            ver_t.append(time.perf_counter() - t0)
        assert v.clean, v.unverified[:3]
        s = v.summary()
        d, t = min(diff_t), min(ver_t)
        figures[name] = {"verify_ms": round(t * 1e3, 1), "numpy_diff_ms": round(d * 1e3, 2),
                         "ratio": round(t / d, 1), "changed_bytes": v.changed_bytes,
                         "sites": {m: x.count for m, x in s.items()}}
        if not args.json:
            print(f"{name:12s} verify {t * 1e3:7.1f} ms   numpy diff {d * 1e3:6.2f} ms   "
                  f"ratio {t / d:5.1f}x   changed {v.changed_bytes} B   "
                  + ", ".join(f"{m} {x.count}" for m, x in s.items()))
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""The kprobe verifier (`scanner.check.patching`): an `int3` at an instruction
boundary, and the decoding of functions it (and `optprobe`) relies on.

`kprobe` — an `int3` (0xcc) replacing the first byte of an instruction, decoded with
capstone from the start of its function over the baseline bytes (kprobes/core.c,
can_probe); not in `kprobe_blacklist`, not inside another mechanism's site.
"""

from __future__ import annotations

import bisect
import re

import numpy as np

from scanner.check.patching.common import (
    VerifierBase,
    _Func,
    _s64,
    _u64,
)

_HEX = re.compile(r"^0x[0-9a-f]+$")
_JUMPS = frozenset({"jmp", "jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns",
                    "jp", "jnp", "jl", "jge", "jle", "jg", "jrcxz", "jecxz", "jcxz",
                    "loop", "loope", "loopne"})


class KprobeVerifier(VerifierBase):
    """`kprobe` int3s, and the function decoding `optprobe` shares."""

    def func_of(self, off: int) -> tuple[int, int] | None:
        """[start, end) text offsets of the function containing text offset `off`."""
        va = self.base_s + off
        i = bisect.bisect_right(self.fs_list, va) - 1
        if i < 0:
            return None
        start = self.fs_list[i] - self.base_s
        end = self.fs_list[i + 1] - self.base_s if i + 1 < len(self.fs_list) else self.n
        end = min(end, self.n)
        if start < 0 or start > off or off >= end:
            return None
        return start, end

    def decode(self, start: int, end: int) -> _Func | None:
        if start in self.funcs:
            return self.funcs[start]
        if self.decoded_bytes + (end - start) > self.limits.max_decode_bytes:
            return None
        self.decoded_bytes += end - start
        starts: list[int] = []
        jumps: list[tuple[int, int]] = []
        pos = start
        for addr, size, mnem, ops in self.md.disasm_lite(bytes(self.bmem[start:end]),
                                                         _u64(self.base_s + start)):
            o = _s64(addr) - self.base_s
            starts.append(o)
            if mnem in _JUMPS and _HEX.match(ops):
                jumps.append((o, _s64(int(ops, 16))))
            pos = o + size
        f = _Func(starts, frozenset(starts), jumps, pos == end)
        self.funcs[start] = f
        return f

    def in_reserved(self, lo: int, hi: int, opt: bool = False) -> bool:
        """Does [lo, hi) intersect a fixed patch site? kprobes refuse ftrace, jump label
        and static call sites (kprobes/core.c check_kprobe_address_safe); optprobes
        also alternatives' smp_locks (opt.c copy_optimized_instructions)."""
        if opt not in self.res:
            parts = self.reserved_parts + (self.opt_reserved_parts if opt else [])
            if parts:
                st = np.concatenate([a for a, _ in parts])
                en = np.concatenate([a + n for a, n in parts])
                order = np.argsort(st, kind="stable")
                st, en = st[order], en[order]
                self.res[opt] = (st, en, np.maximum.accumulate(en))
            else:
                z = np.zeros(0, dtype=np.int64)
                self.res[opt] = (z, z, z)
        st, en, mx = self.res[opt]
        i = int(np.searchsorted(st, hi - 1, side="right")) - 1
        while i >= 0 and int(mx[i]) > lo:
            if int(st[i]) < hi and int(en[i]) > lo:
                return True
            i -= 1
        return False

    def kprobe(self, p: int) -> tuple[bool, str]:
        fr = self.func_of(p)
        if fr is None:
            return False, "int3 outside any known function"
        if self.blacklisted(self.base_s + p) or self.blacklisted(self.base_s + fr[0]):
            return False, "int3 in a function where kprobes are not allowed (blacklist)"
        if self.in_reserved(p, p + 1):
            return False, "int3 inside another mechanism's patch site"
        f = self.decode(*fr)
        if f is None:
            return False, "decode budget exhausted"
        if p not in f.startset:
            if f.complete or (f.starts and p < f.starts[-1]):
                return False, "int3 not at an instruction boundary"
            return False, "function could not be decoded up to the int3"
        return True, ""

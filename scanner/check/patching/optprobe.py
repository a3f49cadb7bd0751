"""The optprobe verifier (`scanner.check.patching`): a `jmp` to a slot outside `.text`,
verified by reading the slot.

`optprobe` — `jmp rel32` at an instruction boundary to outside `.text`, within the
function, with no jump in the function into the 4 bytes after the first
(opt.c, can_optimize), and the slot verified by reading it
(arch_prepare_optimized_kprobe): template bytes except the NOP3 → `clac`, the
`movabs $op, %rdi` (op: the struct optimized_kprobe whose kp.addr is this site)
and the `call optimized_callback`; then the
copied instructions (whole instructions covering ≥ 5 bytes, no relative branches,
%rip-relative displacements re-based exactly as __copy_instruction does); then
`jmp` back to the instruction after them. One slot serves one site.
"""

from __future__ import annotations

import bisect

import capstone
import numpy as np

from scanner.check.patching.common import (
    CALL,
    CLAC,
    INT3,
    JMP32,
    KERNEL_HALF,
    KPROBE_ADDR_OFF,
    NOP3,
    NOP5,
    _s64,
    _u64,
)
from scanner.check.patching.kprobe import KprobeVerifier


class OptprobeVerifier(KprobeVerifier):
    """`optprobe` jmps and the slots they jump to."""

    def optprobe(self, p: int) -> tuple[bool, str, int, int]:
        """(ok, reason, patch length, link target) for a jmp (or int3+rel) at p."""
        if p + 5 > self.n:
            return False, "jmp runs past .text", 0, 0
        rel = int.from_bytes(self.lmem[p + 1:p + 5], "little", signed=True)
        tgt = self.base_s + p + 5 + rel
        if self.in_text_off(self.off_of(tgt)):
            return False, "jmp into .text at a non-site (inline hook?)", 5, tgt
        fr = self.func_of(p)
        if fr is None:
            return False, "jmp outside any known function", 5, tgt
        if self.blacklisted(self.base_s + p) or self.blacklisted(self.base_s + fr[0]):
            return False, "jmp in a function where kprobes are not allowed (blacklist)", 5, tgt
        if p + 5 > fr[1]:
            return False, "jmp crosses the function's end", 5, tgt
        f = self.decode(*fr)
        if f is None:
            return False, "decode budget exhausted", 5, tgt
        if p not in f.startset:
            return False, "jmp not at an instruction boundary", 5, tgt
        i = bisect.bisect_left(f.starts, p)
        j = i
        while j < len(f.starts) and f.starts[j] < p + 5:
            j += 1
        if j >= len(f.starts) and not f.complete:
            return False, "function could not be decoded past the jmp", 5, tgt
        copy_end = f.starts[j] if j < len(f.starts) else fr[1]
        if copy_end - p < 5:
            return False, "jmp crosses the function's end", 5, tgt
        if self.in_reserved(p, copy_end, opt=True):
            return False, "optprobe over another mechanism's patch site", 5, tgt
        lo, hi = self.base_s + p + 1, self.base_s + p + 5
        for _o, jt in f.jumps:
            if lo <= jt <= hi:
                return False, "a jump in the function lands inside the optprobe jmp", 5, tgt
        # Cached by (site, slot): a slot verified for one site says nothing of another.
        key = ("optprobe", p, tgt)
        if key not in self.remote_cache:
            if self.remote_reads >= self.limits.max_remote_targets:
                return False, "too many distinct out-of-text targets (limit)", 5, tgt
            self.remote_reads += 1
            self.remote_cache[key] = self._optprobe_slot(self.runtime(tgt), p,
                                                         f.starts[i:j], copy_end)
        ok, why = self.remote_cache[key]
        if ok:
            self.opt_slots.setdefault(tgt, []).append(p)
        return ok, why, 5, tgt

    def template(self) -> bytes | None:
        rng = self.sites.optprobe_template
        if rng is not None:
            so = _s64(rng[0]) - self.base_s
            size = _s64(rng[1]) - _s64(rng[0])
            if 0 < size <= 4096 and self.in_text_off(so, size):
                return bytes(self.bmem[so:so + size])
        return self.optprobe_template

    def _optprobe_slot(self, slot: int, p: int, insns: list[int], copy_end: int
                       ) -> tuple[bool, str]:
        """The slot arch_prepare_optimized_kprobe() (kprobes/opt.c) fills: template
        [entry, end) with the NOP3 at optprobe_template_clac → clac (SMAP), the two NOP5
        at optprobe_template_val → `movabs $op, %rdi`, the NOP5 at
        optprobe_template_call → `call optimized_callback`; then the copied
        instructions; then `jmp` to the instruction after them."""
        tmpl = self.template()
        if tmpl is None:
            return False, "optprobe template unknown"
        tl = len(tmpl)
        clac = tmpl.find(NOP3)
        val = tmpl.find(NOP5 * 3)
        if clac < 0 or val < 0:
            return False, "optprobe template has no NOP3/NOP5x3 fields"
        callo = val + 10
        size = copy_end - p
        data = self.read(slot, tl + size + 5)
        if data is None:
            return False, "optprobe slot unreadable"
        allowed = np.zeros(tl, dtype=np.bool_)
        allowed[clac:clac + 3] = True
        allowed[val:val + 15] = True
        diff = np.frombuffer(data[:tl], np.uint8) != np.frombuffer(tmpl, np.uint8)
        bad = np.flatnonzero(diff & ~allowed)
        if bad.size:
            return False, f"optprobe slot differs from the template at +{int(bad[0]):#x}"
        if data[clac:clac + 3] not in (NOP3, CLAC):
            return False, "optprobe slot: clac field is neither NOP3 nor clac"
        if data[val:val + 2] != b"\x48\xbf":
            return False, "optprobe slot: no movabs $op, %rdi"
        op = int.from_bytes(data[val + 2:val + 10], "little")
        if op < KERNEL_HALF:
            return False, "optprobe slot: op is not a kernel address"
        # op is the struct optimized_kprobe of this probe: its kp.addr is the site.
        kp_addr = self.read(op + KPROBE_ADDR_OFF, 8)
        if kp_addr is None:
            return False, "optprobe slot: its optimized_kprobe (op) is unreadable"
        if int.from_bytes(kp_addr, "little") != self.runtime(self.base_s + p):
            return False, "optprobe slot: its optimized_kprobe (op) probes another address"
        if data[callo] != CALL:
            return False, "optprobe slot: no call to the callback"
        crel = int.from_bytes(data[callo + 1:callo + 5], "little", signed=True)
        callee = self.to_link(slot + callo + 5 + crel)
        cb = self.named.get("optimized_callback")
        if cb is not None and callee != cb:
            return False, "optprobe slot does not call optimized_callback"
        if cb is None and not self.text_func_start(callee):
            return False, "optprobe slot calls something that is not a function in .text"
        copy = bytearray(data[tl:tl + size])
        self._normalize_copy(copy, p, size)
        for q, qe in zip(insns, [*insns[1:], copy_end], strict=True):
            src = bytes(self.bmem[q:qe])
            d = q - p
            got = bytes(copy[d:d + len(src)])
            ins = next(iter(self.mdd.disasm(src, _u64(self.base_s + q), 1)), None)
            if ins is None or ins.size != len(src):
                return False, "copied instruction does not decode"
            if ins.group(capstone.CS_GRP_BRANCH_RELATIVE) or src[0] == INT3:
                return False, "copied instruction is a relative branch (never boosted)"
            riprel = any(op.type == capstone.x86.X86_OP_MEM
                         and op.mem.base == capstone.x86.X86_REG_RIP for op in ins.operands)
            if riprel and ins.disp_size == 4:
                do = ins.disp_offset
                old = int.from_bytes(src[do:do + 4], "little", signed=True)
                new = old + self.runtime(self.base_s + q) - (slot + tl + d)
                want = src[:do] + (new & 0xFFFFFFFF).to_bytes(4, "little") + src[do + 4:]
                if not -(1 << 31) <= new < 1 << 31 or got != want:
                    return False, "copied %rip-relative instruction not re-based exactly"
            elif got != src:
                return False, "copied instruction differs from the original"
        back = data[tl + size:tl + size + 5]
        brel = int.from_bytes(back[1:5], "little", signed=True)
        if back[0] != JMP32 or _u64(slot + tl + size + 5 + brel) != self.runtime(
                self.base_s + copy_end):
            return False, "optprobe slot does not jump back after the copied instructions"
        return True, ""

"""The ftrace verifier (`scanner.check.patching`): call sites, ftrace_caller's own
call sites, and the trampolines the kernel allocates.

`ftrace` — `__mcount_loc` sites (kernel/ftrace.c: ftrace_nop_replace = x86_nops[5],
ftrace_call_replace = `call rel32`, ftrace_get_addr_new): the 5-byte NOP, or a
`call` to `ftrace_caller` / `ftrace_regs_caller`, or a `call` to a trampoline the
kernel allocated (create_trampoline), verified by reading it: the bytes of
ftrace_caller..ftrace_caller_end (or the regs variant) from the baseline, except
the fields create_trampoline writes (see `_Verifier._ftrace_trampoline`): its
return `jmp` goes to the return thunk, its call to ftrace_ops_assist_func or its
ops' own function (ftrace_ops_get_func). Also the `ftrace_call` / `ftrace_regs_call`
sites inside ftrace_caller (ftrace_update_ftrace_func): a `call` to a function in
`.text`, and
`ftrace_graph_call` where it exists (6.1 without WITH_ARGS only): `jmp` to
ftrace_graph_caller or ftrace_stub.

`call direct` — a site calling outside `.text` something that is not an allocated
trampoline is verified when the kernel's `direct_functions` hash names exactly that
target for the site's function (a BPF trampoline, a module's `register_ftrace_direct`
trampoline): what the target is and whose it is is `scanner.check.attribution`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from scanner.check.patching.common import (
    CALL,
    I64,
    INT3,
    JMP32,
    KERNEL_HALF,
    NOP2,
    NOP5,
    U8,
    B,
    _eq_row,
    _isin_sorted,
    _u64,
)
from scanner.check.patching.text_poke import TextPokeVerifier


class FtraceVerifier(TextPokeVerifier):
    """`ftrace` sites, ftrace_caller's own call sites, allocated trampolines."""

    def do_ftrace(self) -> None:
        s = self.sites
        sym = self.sym
        callers = [sym[k] for k in ("ftrace_caller", "ftrace_regs_caller") if k in sym]
        caller_arr = np.array(sorted(set(callers)), dtype=np.int64)
        forms = ["nop", "call ftrace_caller", "call ftrace_regs_caller",
                 "call allocated trampoline", "call direct"]

        def validate(live: U8, off: I64, aux: Mapping[str, npt.NDArray[Any]]
                     ) -> tuple[B, npt.NDArray[np.int8], I64]:
            k = off.size
            ok = _eq_row(live, NOP5)
            form = np.zeros(k, dtype=np.int8)
            tgt = np.zeros(k, dtype=np.int64)
            call = live[:, 0] == CALL
            if call.any():
                t = self.branch_targets(live, off, 1, 5)
                known = call & _isin_sorted(caller_arr, t)
                ok |= known
                for name, fi in (("ftrace_caller", 1), ("ftrace_regs_caller", 2)):
                    if name in sym:
                        form[known & (t == sym[name])] = fi
                out = call & ~self.text_mask(t)
                if out.any():
                    uniq, inv = np.unique(t[out], return_inverse=True)
                    checked = [self.remote("ftrace", u) for u in uniq.tolist()]
                    res = np.array([c[0] for c in checked], dtype=np.bool_)
                    rows = np.flatnonzero(out)
                    inv1 = inv.reshape(-1)
                    good = rows[res[inv1]]
                    ok[good] = True
                    form[good] = 3
                    bad = rows[~res[inv1]]
                    direct = self.direct_calls(off[bad], t[bad])
                    ok[bad[direct]] = True
                    form[bad[direct]] = 4
                    for r in bad[~direct][:1000].tolist():
                        why = checked[int(inv1[np.searchsorted(rows, r)])][1]
                        self.reasons.setdefault(int(off[r]), "ftrace site calls outside "
                                                "text: " + why + self.direct_why.get(
                                                    int(off[r]), ""))
                tgt = np.where(call, t, 0)
            return ok, form, tgt

        off = self.offsets(s.ftrace)
        self.check_sites("ftrace", off, 5, validate, forms, bytes((0x0F, CALL)),
                         reason="ftrace site: not the NOP nor a call to ftrace_caller, "
                                "ftrace_regs_caller or a verified trampoline")

        # ftrace_call / ftrace_regs_call inside ftrace_caller: call to a function start.
        func_forms = ["call function"]

        def validate_func(live: U8, off: I64, aux: Mapping[str, npt.NDArray[Any]]
                          ) -> tuple[B, npt.NDArray[np.int8], I64]:
            t = self.branch_targets(live, off, 1, 5)
            ok = (live[:, 0] == CALL) & self.func_start_mask(t)
            return ok, np.zeros(off.size, dtype=np.int8), t

        labels = [sym[k] for k in ("ftrace_call", "ftrace_regs_call") if k in sym]
        if labels:
            self.check_sites("ftrace", np.array(labels, dtype=np.int64) - self.base_s, 5,
                             validate_func, func_forms, bytes((CALL,)),
                             reason="ftrace_call: not a call to a function start")
        if "ftrace_graph_call" in sym:
            gt = np.array(sorted({sym[k] for k in ("ftrace_graph_caller", "ftrace_stub",
                                                   "ftrace_stub_graph") if k in sym}),
                          dtype=np.int64)

            def validate_graph(live: U8, off: I64, aux: Mapping[str, npt.NDArray[Any]]
                               ) -> tuple[B, npt.NDArray[np.int8], I64]:
                t = self.branch_targets(live, off, 1, 5)
                ok = (live[:, 0] == JMP32) & _isin_sorted(gt, t)
                return ok, np.zeros(off.size, dtype=np.int8), t

            self.check_sites("ftrace", np.array([sym["ftrace_graph_call"] - self.base_s]),
                             5, validate_graph, ["jmp graph caller/stub"], bytes((JMP32,)),
                             reason="ftrace_graph_call: not a jmp to ftrace_graph_caller "
                                    "or ftrace_stub")


    # ftrace direct calls -------------------------------------------------------------
    def direct_calls(self, off: I64, target: I64) -> B:
        """Which of these sites (offsets, link-time call targets outside `.text`) call
        the direct target `direct_functions` names for their function. Why not, per
        site, in `direct_why` (appended to the site's reason)."""
        out = np.zeros(off.size, dtype=np.bool_)
        if self.direct is None:
            return out
        for i, (o, t) in enumerate(zip(off.tolist(), target.tolist(), strict=True)):
            ip = self.runtime(self.base_s + o)
            got, why = self.direct(ip)
            if got is not None and got == self.runtime(t):
                out[i] = True
            elif len(self.direct_why) < 1000:
                self.direct_why[o] = ("; not a direct call: " + why if got is None else
                                      f"; not a direct call: direct_functions names "
                                      f"{got:#x} for this function, the site calls "
                                      f"{self.runtime(t):#x}")
        return out

    # out-of-text targets --------------------------------------------------------------
    def remote(self, kind: str, link_target: int) -> tuple[bool, str]:
        key = (kind, 0, link_target)
        if key in self.remote_cache:
            return self.remote_cache[key]
        if self.remote_reads >= self.limits.max_remote_targets:
            return False, "too many distinct out-of-text targets (limit)"
        self.remote_reads += 1
        res = self._ftrace_trampoline(self.runtime(link_target))
        self.remote_cache[key] = res
        return res


    def _ftrace_trampoline(self, t: int) -> tuple[bool, str]:
        """Is the run-time address `t` a trampoline create_trampoline() made?

        create_trampoline() (arch/x86/kernel/ftrace.c) copies [start, end) of
        ftrace_caller (or ftrace_regs_caller) and then writes exactly:
          * at `size`: RET_SIZE bytes: `jmp x86_return_thunk` (RETHUNK) or `c3 cc`
            (RET_SIZE is 1, 2 or 5 by config; with 5 and no RETHUNK the last 3 bytes
            are never written, so any value is accepted there);
          * at `size + RET_SIZE`: the 8-byte ftrace_ops pointer (a kernel address);
          * at op_ptr+3: the rel32 of `movq X(%rip), %rdx`, pointing exactly at that
            ops pointer;
          * at ftrace_call (ftrace_regs_call): `call` to ftrace_ops_get_func(ops) — a
            function start in .text (or int3 + such a call's tail, text_poke_bp);
          * regs variant only: the 2-byte `jnz` at ftrace_regs_caller_jmp → NOP2.
        Everything else must equal the baseline (KASLR-normalized when relocs are given).
        """
        sym = self.sym
        layouts: list[tuple[str, str, str, str, str | None]] = [
            ("ftrace_caller", "ftrace_caller_end", "ftrace_caller_op_ptr", "ftrace_call",
             None),
            ("ftrace_regs_caller", "ftrace_regs_caller_end", "ftrace_regs_caller_op_ptr",
             "ftrace_regs_call", "ftrace_regs_caller_jmp")]
        why = "ftrace trampoline layout unknown (symbols missing)"
        for start_n, end_n, op_n, call_n, jmp_n in layouts:
            if not all(k in sym for k in (start_n, end_n, op_n, call_n)):
                continue
            if jmp_n is not None and jmp_n not in sym:
                continue
            so = self.off_of(sym[start_n])
            size = sym[end_n] - sym[start_n]
            opr = sym[op_n] - sym[start_n]
            cr = sym[call_n] - sym[start_n]
            jr = None if jmp_n is None else sym[jmp_n] - sym[start_n]
            if not (self.in_text_off(so, max(size, 1)) and 0 < size <= 8192
                    and 0 <= opr <= size - 7 and 0 <= cr <= size - 5
                    and (jr is None or 0 <= jr <= size - 2)):
                why = "ftrace trampoline layout inconsistent"
                continue
            ok, w = self._check_tramp(t, so, size, opr, cr, jr)
            if ok:
                return True, ""
            # report the layout that got furthest: an unreadable longer variant says less
            if "unreadable" not in w or "layout" in why:
                why = w
        return False, why

    def _check_tramp(self, t: int, so: int, size: int, opr: int, cr: int, jr: int | None
                     ) -> tuple[bool, str]:
        base = bytes(self.bmem[so:so + size])
        if base[opr:opr + 3] != b"\x48\x8b\x15":
            return False, "baseline ftrace_caller has no movq X(%rip),%rdx at op_ptr"
        head = self.read(t, size + 7)
        if head is None:
            return False, "trampoline unreadable"
        rel = int.from_bytes(head[opr + 3:opr + 7], "little", signed=True)
        ret_size = rel - (size - (opr + 7))
        if ret_size not in (1, 2, 5):
            return False, "trampoline ops pointer load does not point past the return"
        data = self.read(t, size + ret_size + 8)
        if data is None:
            return False, "trampoline unreadable"
        copy = bytearray(data[:size])
        self._normalize_copy(copy, so, size)
        # Fields create_trampoline writes: compare them separately, mask them here.
        allowed = np.zeros(size, dtype=np.bool_)
        allowed[opr + 3:opr + 7] = True
        allowed[cr:cr + 5] = True
        if jr is not None:
            if base[jr] != 0x75 or copy[jr:jr + 2] != NOP2:
                return False, "trampoline: jnz at ftrace_regs_caller_jmp not NOPed"
            allowed[jr:jr + 2] = True
        diff = np.frombuffer(bytes(copy), np.uint8) != np.frombuffer(base, np.uint8)
        bad = np.flatnonzero(diff & ~allowed)
        if bad.size:
            return False, f"trampoline differs from ftrace_caller at +{int(bad[0]):#x}"
        call = bytes(copy[cr:cr + 5])
        if call[0] not in (CALL, INT3):
            return False, "trampoline: no call at ftrace_call"
        ops = int.from_bytes(data[size + ret_size:size + ret_size + 8], "little")
        if ops < KERNEL_HALF:
            return False, "trampoline ops pointer is not a kernel address"
        crel = int.from_bytes(call[1:5], "little", signed=True)
        dest = self.to_link(t + cr + 5 + crel)
        why = self._tramp_callee(dest, ops)
        if why:
            return False, why
        if call[0] == INT3:   # text_poke_bp() half-way through retargeting the call
            why = self.half_state(f"t:{_u64(t + cr):#x}", call, "ftrace trampoline call")
            if why:
                return False, why
        tail = data[size:size + ret_size]
        if ret_size == 5 and tail[0] == JMP32:
            jrel = int.from_bytes(tail[1:5], "little", signed=True)
            ret_to = self.to_link(t + size + 5 + jrel)
            if self.thunks.size and not self.is_thunk(ret_to):
                return False, "trampoline return jmp not to the return thunk"
            if not self.thunks.size and not self.text_func_start(ret_to):
                return False, "trampoline return jmp not to a function in .text"
        elif tail[:2] != b"\xc3\xcc"[:ret_size]:
            return False, "trampoline return is not ret; int3"
        return True, ""

    def _tramp_callee(self, dest: int, ops: int) -> str:
        """arch_ftrace_update_trampoline() writes `call ftrace_ops_get_func(ops)`:
        ftrace_ops_assist_func, or the ops' own function (ops->func, the first field
        of struct ftrace_ops), a function in `.text`. Why not ("" when it is)."""
        helpers = {self.named[n] for n in ("ftrace_ops_assist_func", "ftrace_ops_list_func")
                   if n in self.named}
        if not helpers:     # a profile without the names: any function in .text
            return ("" if self.text_func_start(dest) else
                    "trampoline calls something that is not a function in .text")
        if dest in helpers:
            return ""
        f = self.read(ops, 8)
        if f is None:
            return "trampoline's ftrace_ops unreadable"
        if self.to_link(int.from_bytes(f, "little")) != dest:
            return ("trampoline calls neither ftrace_ops_assist_func nor its ops' "
                    "function")
        if not self.is_call_target(dest):
            return "trampoline calls its ops' function, which is not a function in .text"
        return ""

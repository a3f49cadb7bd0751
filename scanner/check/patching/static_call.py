"""The static-call verifier (`scanner.check.patching`): call sites, trampolines, and
the agreement of a key's sites and trampoline.

`static_call` — `.static_call_sites` (kernel/static_call.c, __static_call_transform):
non-tail: `call` to a function start or to that key's trampoline, NOP5, or
`2e 2e 2e 31 c0` (xor5rax, for __static_call_return0); tail: `jmp` to a function
start (including the return thunk) or that key's trampoline, or `c3 cc cc cc cc`;
a tail site that is a `Jcc rel32` in the baseline stays the same `Jcc` (6 bytes),
only retargeted to a function start. Trampolines (`__SCT__*`): bytes 0..4 are
`jmp` to a function start or `c3 cc cc cc cc` (or `jmp` to the return thunk). A
key's trampoline and all its sites name one function (or NULL): the kernel updates
them together (__static_call_update). LSM hooks' static calls keep what the first
check of the boot saw. "Function" means a sized function symbol (a `__pfx_`
partner on 6.2+; never an asm inner label: `PatchSites.call_targets`).
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
    NOP5,
    RET,
    RETINSN,
    U8,
    XOR5RAX,
    B,
    VerifierBase,
    _eq_row,
    _isin_sorted,
    _s64,
    _to_signed_sorted,
    _u64,
)


class StaticCallVerifier(VerifierBase):
    """`static_call` sites and trampolines, and the agreement of a key's."""

    def do_static_calls(self) -> None:
        s = self.sites
        n = min(s.static_call_addr.size, s.static_call_key.size, s.static_call_tail.size)
        tramps = {_s64(a): _u64(k) & ~3 for a, k in s.static_call_trampolines.items()}
        tr_addr = np.array(sorted(tramps), dtype=np.int64)
        tr_key = np.array([tramps[a] for a in tr_addr.tolist()], dtype=np.uint64)
        ret0 = self.named.get("__static_call_return0")
        nullret = self.named.get("__static_call_return")

        def any_tramp(t: I64) -> B:
            return _isin_sorted(tr_addr, t)

        def own_tramp(t: I64, key: npt.NDArray[Any]) -> B:
            if tr_addr.size == 0:
                return np.zeros(t.shape, dtype=np.bool_)
            pos = np.minimum(np.searchsorted(tr_addr, t), tr_addr.size - 1)
            return np.asarray((tr_addr[pos] == t) & (tr_key[pos] == key), dtype=np.bool_)

        def fn_mask(t: I64) -> B:
            return self.func_start_mask(t) & ~any_tramp(t)

        off: I64 = np.zeros(0, dtype=np.int64)
        key: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
        tail: B = np.zeros(0, dtype=np.bool_)
        jcc: B = tail
        keep5: B = tail
        if n:
            off = self.offsets(s.static_call_addr[:n])
            key = np.asarray(s.static_call_key[:n], dtype=np.uint64) & ~np.uint64(3)
            tail = np.asarray(s.static_call_tail[:n], dtype=np.bool_)
            keep = (off >= 0) & (off + 6 <= self.n)
            keep5 = (off >= 0) & (off + 5 <= self.n)
            jcc = np.zeros(off.shape, dtype=np.bool_)
            jcc[keep] = tail[keep] & (self.b[off[keep]] == 0x0F) & (
                (self.b[off[keep] + 1] & 0xF0) == 0x80)
            forms_nt = ["call function", "call trampoline", "nop", "xor5rax"]

            def v_nontail(live: U8, o: I64, aux: Mapping[str, npt.NDArray[Any]]
                          ) -> tuple[B, npt.NDArray[np.int8], I64]:
                t = self.branch_targets(live, o, 1, 5)
                call = live[:, 0] == CALL
                fn = call & fn_mask(t)
                tr = call & own_tramp(t, aux["key"])
                nop = _eq_row(live, NOP5)
                xor = _eq_row(live, XOR5RAX)
                form = np.select([fn, tr, nop, xor], [0, 1, 2, 3], 0).astype(np.int8)
                return fn | tr | nop | xor, form, np.where(call, t, 0)

            forms_t = ["jmp function", "jmp trampoline", "ret"]

            def v_tail(live: U8, o: I64, aux: Mapping[str, npt.NDArray[Any]]
                       ) -> tuple[B, npt.NDArray[np.int8], I64]:
                t = self.branch_targets(live, o, 1, 5)
                jmp = live[:, 0] == JMP32
                fn = jmp & fn_mask(t)
                tr = jmp & own_tramp(t, aux["key"])
                ret = _eq_row(live, RETINSN) | (jmp & self.thunk_mask(t))
                form = np.select([fn, tr, ret], [0, 1, 2], 0).astype(np.int8)
                return fn | tr | ret, form, np.where(jmp, t, 0)

            def v_jcc(live: U8, o: I64, aux: Mapping[str, npt.NDArray[Any]]
                      ) -> tuple[B, npt.NDArray[np.int8], I64]:
                t = self.branch_targets(live, o, 2, 6)
                ok = ((live[:, 0] == 0x0F) & (live[:, 1] == aux["cc"])
                      & (fn_mask(t) | self.thunk_mask(t)
                         | (t == (nullret if nullret is not None else -1))))
                return ok, np.zeros(o.size, dtype=np.int8), t

            reason = "static call site: not an allowed call/jmp/nop/ret form or target"
            sel = keep5 & ~tail
            self.check_sites("static_call", off[sel], 5, v_nontail, forms_nt,
                             bytes((CALL, 0x0F, 0x2E)), aux={"key": key[sel]}, reason=reason)
            sel = keep5 & tail & ~jcc
            self.check_sites("static_call", off[sel], 5, v_tail, forms_t,
                             bytes((JMP32, RET)), aux={"key": key[sel]}, reason=reason)
            if jcc.any():
                self.check_sites("static_call", off[jcc], 6, v_jcc, ["jcc function"],
                                 bytes((0x0F,)), aux={"cc": self.b[off[jcc] + 1]},
                                 reason=reason)

        if tr_addr.size:
            def v_tramp(live: U8, o: I64, aux: Mapping[str, npt.NDArray[Any]]
                        ) -> tuple[B, npt.NDArray[np.int8], I64]:
                t = self.branch_targets(live, o, 1, 5)
                isj = live[:, 0] == JMP32
                jmp = isj & fn_mask(t)
                ret = _eq_row(live, RETINSN) | (isj & self.thunk_mask(t))
                form = np.where(jmp, 0, 1).astype(np.int8)
                return jmp | ret, form, np.where(isj, t, 0)

            self.check_sites("static_call", tr_addr - np.int64(self.base_s), 5, v_tramp,
                             ["trampoline jmp function", "trampoline ret"],
                             bytes((JMP32, RET)),
                             reason="static call trampoline: not a jmp to a function "
                                    "start nor ret")
        self._static_call_agreement(off, key, tail, jcc, keep5, tr_addr, tr_key, ret0)
        bk = _to_signed_sorted(self.sites.boot_static_keys)
        if bk.size:     # LSM hook static calls: only boot code updates them
            why = ("static call: an LSM hook's call (only boot code sets it) changed since "
                   "the first check of this boot")
            sb = keep5 & _isin_sorted(bk, key.view(np.int64))
            self._pin(off[sb], np.where(jcc[sb], 6, 5).astype(np.int64), why)
            tb = _isin_sorted(bk, tr_key.view(np.int64))
            tro = tr_addr[tb] - np.int64(self.base_s)
            tro = tro[(tro >= 0) & (tro + 5 <= self.n)]
            self._pin(tro, np.full(tro.shape, 5, dtype=np.int64), why)

    def _static_call_agreement(self, off: I64, key: npt.NDArray[np.uint64], tail: B, jcc: B,
                               keep5: B, tr_addr: I64, tr_key: npt.NDArray[np.uint64],
                               ret0: int | None) -> None:
        """__static_call_update() (kernel/static_call_inline.c) rewrites a key's
        trampoline and every site of it together, to one function: each site and the
        trampoline must say the same function (or NULL) — a site rewritten alone (one
        LSM hook's call set to `xor eax,eax`, "return 0") is not the kernel's."""
        tro = tr_addr - np.int64(self.base_s)
        okt = (tro >= 0) & (tro + 5 <= self.n)
        tro, tk = tro[okt], tr_key[okt]
        so = off[keep5]
        if so.size == 0 and tro.size == 0:
            return
        touched_keys = np.concatenate([
            key[keep5][self.touched(so, np.full(so.shape, 6, dtype=np.int64))],
            tk[self.touched(tro, np.full(tro.shape, 5, dtype=np.int64))]])
        if touched_keys.size == 0:
            return
        wanted = np.unique(touched_keys.view(np.int64))
        sk = key[keep5]
        ssel = _isin_sorted(wanted, sk.view(np.int64))
        tsel = _isin_sorted(wanted, tk.view(np.int64))
        stail, sjcc = tail[keep5][ssel], jcc[keep5][ssel]
        so, sk = so[ssel], sk[ssel]
        tro, tk = tro[tsel], tk[tsel]
        wild = np.int64(-1)
        r0 = np.int64(ret0 if ret0 is not None else -2)

        def says(o: I64, k: npt.NDArray[np.uint64], is_tail: B, is_jcc: B) -> I64:
            cols = o[:, None] + np.arange(5, dtype=np.int64)
            live = self.l[cols]
            t = self.branch_targets(live, o, 1, 5)
            tj = np.where(is_jcc, self.branch_targets(
                self.l[np.minimum(o[:, None] + np.arange(6), self.n - 1)], o, 2, 6), t)
            op = live[:, 0]
            null = (_eq_row(live, NOP5) | _eq_row(live, RETINSN)
                    | (((op == JMP32) | is_jcc) & self.thunk_mask(tj)))
            nullret = self.named.get("__static_call_return")
            if nullret is not None:
                null |= is_jcc & (tj == nullret)
            mine = np.zeros(o.shape, dtype=np.bool_)
            if tr_addr.size:
                pos = np.minimum(np.searchsorted(tr_addr, t), tr_addr.size - 1)
                mine = ((op == CALL) | (op == JMP32)) & (tr_addr[pos] == t) & (
                    tr_key[pos] == k)
            out = np.where(is_jcc, tj, t)
            out = np.where(_eq_row(live, XOR5RAX), r0, out)
            out = np.where(null, 0, out)
            return np.asarray(np.where(mine | (op == INT3), wild, out), dtype=np.int64)

        s_says = says(so, sk, stail, sjcc)
        t_says = says(tro, tk, np.ones(tro.shape, dtype=np.bool_),
                      np.zeros(tro.shape, dtype=np.bool_))
        allk = np.concatenate([sk, tk]).view(np.int64)
        alls = np.concatenate([s_says, t_says])
        allo = np.concatenate([so, tro])
        alln = np.concatenate([np.where(sjcc, 6, 5), np.full(tro.shape, 5)])
        m = alls != wild
        if not m.any():
            return
        order = np.lexsort((alls[m], allk[m]))
        kk, vv = allk[m][order], alls[m][order]
        first = np.r_[True, kk[1:] != kk[:-1]]
        changes = np.r_[False, (kk[1:] == kk[:-1]) & (vv[1:] != vv[:-1])]
        grp = np.cumsum(first) - 1
        bad_grp = np.zeros(int(grp[-1]) + 1 if grp.size else 0, dtype=np.bool_)
        bad_grp[grp[changes]] = True
        bad_keys = np.unique(kk[bad_grp[grp]])
        if bad_keys.size == 0:
            return
        hit = _isin_sorted(bad_keys, allk)
        for o, ln in zip(allo[hit].tolist(), alln[hit].tolist(), strict=True):
            self.revoked.setdefault(o, (ln, "static call: this site and its key's other "
                                           "sites/trampoline call different functions "
                                           "(the kernel updates them together)"))

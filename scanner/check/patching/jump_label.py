"""The jump-label verifier (`scanner.check.patching`): `__jump_table` sites, and the
agreement of a key's sites.

`jump_label` — `__jump_table` code addresses (kernel/jump_label.c, __jump_label_patch):
the size is the baseline instruction's (2: `66 90`/`eb rel8`, 5: NOP5/`e9 rel32`); live
bytes are x86_nops[size] or the `jmp` of that size to that entry's own target. All
sites of one key are flipped from the golden baseline, or none (jump_label_update).
A key only boot code sets — in read-only data (`__ro_after_init`), or an LSM hook's
`security_hook_active_*` (not a BPF LSM hook's) — keeps the sites the first check
of the boot saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from scanner.check.patching.common import (
    I64,
    INT3,
    JMP8,
    JMP32,
    NOP2,
    NOP5,
    U8,
    B,
    VerifierBase,
    _eq_row,
    _isin_sorted,
    _to_signed_sorted,
    _u64,
)


class JumpLabelVerifier(VerifierBase):
    """`jump_label` sites and the rules across a key's sites and checks."""

    def do_jump_labels(self) -> None:
        s = self.sites
        n = min(s.jump_code.size, s.jump_target.size)
        if n == 0:
            return
        off = self.offsets(s.jump_code[:n])
        tgt = np.asarray(s.jump_target[:n], dtype=np.uint64).view(np.int64)
        keep = (off >= 0) & (off + 2 <= self.n)
        off, tgt = off[keep], tgt[keep]
        b0 = self.b[off]
        b1 = self.b[off + 1]
        two = ((b0 == 0x66) & (b1 == 0x90)) | (b0 == JMP8)
        five = np.zeros(off.shape, dtype=np.bool_)
        f5 = np.flatnonzero(~two & (off + 5 <= self.n))
        if f5.size:
            cols = off[f5, None] + np.arange(5)
            m = self.b[cols]
            five[f5] = _eq_row(m, NOP5) | (m[:, 0] == JMP32)
        forms = ["nop", "jmp target"]
        for size, sel, nop, op in ((2, two, NOP2, JMP8), (5, five, NOP5, JMP32)):
            def validate(live: U8, o: I64, aux: Mapping[str, npt.NDArray[Any]],
                         nop: bytes = nop, op: int = op, size: int = size
                         ) -> tuple[B, npt.NDArray[np.int8], I64]:
                isnop = _eq_row(live, nop)
                if size == 2:
                    rel = live[:, 1].view(np.int8).astype(np.int64)
                    t = np.int64(self.base_s) + o + 2 + rel
                else:
                    t = self.branch_targets(live, o, 1, 5)
                isjmp = (live[:, 0] == op) & (t == aux["target"])
                form = np.where(isjmp, 1, 0).astype(np.int8)
                return isnop | isjmp, form, np.where(isjmp, t, 0)

            self.check_sites("jump_label", off[sel], size, validate, forms,
                             bytes((nop[0], op)), aux={"target": tgt[sel]},
                             reason="jump label: not the NOP nor a jmp to the entry's target")
        odd = off[~two & ~five]
        if odd.size:
            t = self.touched(odd, np.full(odd.shape, 2, dtype=np.int64))
            for o in odd[t][:10000].tolist():
                self.reasons.setdefault(o, "jump label: baseline instruction is neither "
                                           "a 2- nor a 5-byte NOP/jmp")
        key = np.asarray(s.jump_key[:n], dtype=np.uint64)[keep]
        sized = two | five
        self._jump_label_keys(off[sized], np.where(two, 2, 5)[sized].astype(np.int64),
                              key[sized])

    def _jump_label_keys(self, off: I64, size: I64, key: npt.NDArray[np.uint64]) -> None:
        """Across sites and checks. jump_label_update() (kernel/jump_label.c) sets every
        entry of a key to the key's state: the sites of one key are all flipped from the
        golden baseline or none is (a half-state, int3 first, may be either). A key in
        data that is read-only after boot cannot change once the kernel has booted: its
        sites keep the bytes the first check of the boot saw."""
        if off.size == 0:
            return
        cols = off[:, None] + np.arange(5, dtype=np.int64)
        cols = np.minimum(cols, self.n - 1)
        diff = (self.l[cols] != self.b[cols]) & (np.arange(5) < size[:, None])
        changed = diff.any(axis=1)
        half = changed & (self.l[off] == INT3)
        flipped = changed & ~half
        # agreement (only keys with a changed site need it)
        if flipped.any():
            ks = key.view(np.int64)
            fk = np.unique(ks[flipped])
            of_fk = _isin_sorted(fk, ks)
            steady = of_fk & ~changed                 # unchanged site of a flipped key
            bad = np.unique(ks[steady])
            hit = flipped & _isin_sorted(bad, ks)
            for o, ln in zip(off[hit][:10000].tolist(), size[hit][:10000].tolist(),
                             strict=True):
                self.revoked.setdefault(o, (ln, "jump label: its key's other sites are not "
                                                "flipped (the kernel sets all of a key's "
                                                "sites to the key's state)"))
        ro = np.zeros(off.shape, dtype=np.bool_)
        for lo, hi in self.sites.readonly:
            ro |= (key >= np.uint64(_u64(lo))) & (key < np.uint64(_u64(hi)))
        self._pin(off[ro], size[ro], "jump label: its static key is in read-only data "
                  "(__ro_after_init): it cannot change after boot, but this site changed "
                  "since the first check of this boot")
        boot = self._boot_only_keys(key) & ~ro
        self._pin(off[boot], size[boot], "jump label: an LSM hook's static key (only boot "
                  "code sets it) changed since the first check of this boot")

    def _boot_only_keys(self, key: npt.NDArray[np.uint64]) -> B:
        """Which of `key` are LSM hook keys only boot code sets: security_hook_active_*
        whose hook slot's trampoline does not jump to a BPF LSM hook (those the kernel
        toggles when a BPF program attaches)."""
        s = self.sites
        bk = np.asarray(s.boot_jump_keys, dtype=np.uint64)
        if bk.size == 0 or bk.size != s.boot_jump_tramps.size:
            return np.zeros(key.shape, dtype=np.bool_)
        pos = np.minimum(np.searchsorted(bk, key), bk.size - 1)
        hit = bk[pos] == key
        if not hit.any():
            return np.asarray(hit, dtype=np.bool_)
        tr = self.offsets(np.asarray(s.boot_jump_tramps, dtype=np.uint64)[pos[hit]])
        ok = (tr >= 0) & (tr + 5 <= self.n)
        bpf_t = _to_signed_sorted(s.bpf_lsm_hooks)
        bpf = np.zeros(tr.shape, dtype=np.bool_)
        if ok.any():
            t = tr[ok]
            live = self.l[t[:, None] + np.arange(5, dtype=np.int64)]
            dest = self.branch_targets(live, t, 1, 5)
            bpf[ok] = (live[:, 0] == JMP32) & _isin_sorted(bpf_t, dest)
        out = np.zeros(key.shape, dtype=np.bool_)
        out[np.flatnonzero(hit)] = ~bpf
        return out

"""The driver of a check of `.text` patching (`scanner.check.patching`): the mechanisms'
fixed sites in registry order, then `int3`/`jmp` changes outside them (kprobes,
optprobes), half-states and cross-site rules, then the verdict."""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from scanner.check.patch_state import PatchMemory, VmFacts
from scanner.check.patching.common import (
    I64,
    INT3,
    JMP32,
    B,
    DirectLookup,
    Limits,
    ReadVA,
    _Batch,
    _isin_sorted,
    _u64,
)
from scanner.check.patching.ftrace import FtraceVerifier
from scanner.check.patching.jump_label import JumpLabelVerifier
from scanner.check.patching.optprobe import OptprobeVerifier
from scanner.check.patching.registry import REGISTRY
from scanner.check.patching.runtime_const import RuntimeConstVerifier
from scanner.check.patching.smp_lock import SmpLockVerifier
from scanner.check.patching.static_call import StaticCallVerifier
from scanner.check.patching.verdict import PatchVerdict, UnverifiedRange, VerifiedPatch
from scanner.image.patchsites import PatchSites
from scanner.image.relocs import RegionRelocs


class _Verifier(FtraceVerifier, JumpLabelVerifier, StaticCallVerifier, OptprobeVerifier,
                SmpLockVerifier, RuntimeConstVerifier):
    """All mechanisms' verifiers over one `.text`, and the driver of a check."""

    def probes(self, uncovered: I64) -> None:
        """int3 and jmp rel32 changes outside the fixed sites."""
        lv = self.l[uncovered]
        cand = uncovered[(lv == INT3) | (lv == JMP32)]
        if cand.size == 0:
            return
        unc = set(uncovered.tolist()) if uncovered.size <= 200000 else None
        offs: list[int] = []
        lens: list[int] = []
        forms: list[str] = []
        mechs: list[str] = []
        targets: list[int | None] = []
        inprog: list[bool] = []
        covered_to = -1
        if cand.size > self.limits.max_candidates:
            self.cand_cut = int(cand[self.limits.max_candidates])
            cand = cand[:self.limits.max_candidates]
        for p in cand.tolist():
            if p < covered_to:
                continue
            first = int(self.l[p])
            more = unc is not None and any((p + k) in unc for k in range(1, 5))
            if first == JMP32 or (first == INT3 and more):
                ok, why, ln, tgt = self.optprobe(p)
                if ok:
                    offs.append(p)
                    lens.append(ln)
                    forms.append("jmp slot" if first == JMP32 else "int3 (jmp slot tail)")
                    mechs.append("optprobe")
                    targets.append(self.runtime(tgt))
                    inprog.append(first == INT3)
                    covered_to = p + ln
                    continue
                if first == JMP32:
                    self.reasons.setdefault(p, why)
                    self.failed.append((np.array([p], dtype=np.int64), min(5, self.n - p)))
                    continue
            ok, why = self.kprobe(p)
            if ok:
                offs.append(p)
                lens.append(1)
                forms.append("int3")
                mechs.append("kprobe")
                targets.append(None)
                inprog.append(False)
                covered_to = p + 1
            else:
                self.reasons.setdefault(p, why)
        shared = {p for ps in self.opt_slots.values() if len(ps) > 1 for p in ps}
        if shared:   # one slot serves one probe (arch_prepare_optimized_kprobe)
            for i, m in enumerate(mechs):
                if m == "optprobe" and offs[i] in shared:
                    mechs[i] = ""
                    self.reasons[offs[i]] = "optprobe: another site jumps into the same slot"
                    self.failed.append((np.array([offs[i]], dtype=np.int64),
                                        min(5, self.n - offs[i])))
        for mech in ("kprobe", "optprobe"):
            sel = [i for i, m in enumerate(mechs) if m == mech]
            if sel:
                self.batches.append(_Batch(
                    mech, np.array([offs[i] for i in sel], dtype=np.int64),
                    np.array([lens[i] for i in sel], dtype=np.int64),
                    [forms[i] for i in sel], [targets[i] for i in sel],
                    [inprog[i] for i in sel]))

    # driver -------------------------------------------------------------------------
    def coverage(self) -> B:
        idx = self.idx
        if not self.batches:
            return np.zeros(idx.shape, dtype=np.bool_)
        starts = np.concatenate([b.off for b in self.batches])
        ends = np.concatenate([b.off + b.length for b in self.batches])
        lo = np.searchsorted(idx, starts, side="left")
        hi = np.searchsorted(idx, ends, side="left")
        d = np.zeros(idx.size + 1, dtype=np.int64)
        np.add.at(d, lo, 1)
        np.add.at(d, hi, -1)
        return np.asarray(np.cumsum(d)[:-1] > 0, dtype=np.bool_)

    def unverified_ranges(self, rest: I64) -> list[tuple[int, int, str]]:
        """Runs of unexplained changed bytes, each widened to the whole of any site it
        falls in that failed to verify (so a rejected `call` shows all 5 bytes)."""
        breaks = np.flatnonzero(np.diff(rest) > 1)
        rs = np.concatenate((rest[:1], rest[breaks + 1]))
        re_ = np.concatenate((rest[breaks], rest[-1:])) + 1
        if self.failed:
            fst = np.concatenate([a for a, _ in self.failed])
            fen = np.concatenate([a + n for a, n in self.failed])
            order = np.argsort(fst, kind="stable")
            fst, fen = fst[order], fen[order]
            for arr, is_start in ((rs, True), (re_ - 1, False)):
                k = np.searchsorted(fst, arr, side="right") - 1
                # the latest-starting failed site at or before arr, if it contains arr
                kk = np.maximum(k, 0)
                inside = (k >= 0) & (fen[kk] > arr)
                if is_start:
                    rs = np.where(inside, np.minimum(rs, fst[kk]), rs)
                else:
                    re_ = np.where(inside, np.maximum(re_, fen[kk]), re_)
            rs = np.clip(rs, 0, self.n)
            re_ = np.clip(re_, 0, self.n)
            order = np.argsort(rs, kind="stable")
            rs, re_ = rs[order], re_[order]
            reach = np.maximum.accumulate(re_)
            new = np.ones(rs.shape, dtype=np.bool_)
            new[1:] = rs[1:] > reach[:-1]
            rs = rs[new]
            re_ = np.maximum.reduceat(re_, np.flatnonzero(new)) if rs.size else re_[:0]
        cap = self.limits.max_ranges
        merged_tail = rs.size > cap
        if merged_tail:       # hostile amounts of change: merge the rest into the last
            last = re_[-1]
            rs, re_ = rs[:cap], re_[:cap].copy()
            re_[-1] = last
        starts, ends = rs.tolist(), re_.tolist()
        # the first recorded reason inside each range
        roff = np.array(sorted(self.reasons), dtype=np.int64)
        first = np.searchsorted(roff, rs) if roff.size else np.zeros(rs.shape, np.int64)
        has = (first < roff.size) & (roff[np.minimum(first, max(roff.size - 1, 0))] < re_) \
            if roff.size else np.zeros(rs.shape, dtype=np.bool_)
        rlist = roff.tolist()
        out: list[tuple[int, int, str]] = []
        for i, (s, e, h, f) in enumerate(zip(starts, ends, has.tolist(), first.tolist(),
                                             strict=True)):
            why = self.reasons[rlist[f]] if h else None
            if why is None and self.cand_cut is not None and s >= self.cand_cut:
                why = "too many int3/jmp candidates (limit)"
            if merged_tail and i == cap - 1:
                why = "too many changed ranges (limit): the rest of .text, merged"
            out.append((s, e, why or "not a known patch site or form"))
        return out


    def revoke(self) -> None:
        """Sites that verified alone but break a rule across sites or checks."""
        if not self.revoked:
            return
        rv = np.array(sorted(self.revoked), dtype=np.int64)
        for i, bt in enumerate(self.batches):
            hit = _isin_sorted(rv, bt.off)
            if not hit.any():
                continue
            keep = ~hit
            idx = np.flatnonzero(keep).tolist()
            self.batches[i] = _Batch(bt.mech, bt.off[keep], bt.length[keep],
                                     [bt.forms[j] for j in idx], [bt.targets[j] for j in idx],
                                     [bt.in_progress[j] for j in idx])
        for o, (ln, why) in self.revoked.items():
            self.reasons[o] = why
            self.failed.append((np.array([o], dtype=np.int64), max(1, min(ln, self.n - o))))

    def next_memory(self) -> PatchMemory:
        return PatchMemory(True, dict(self.rc_now), dict(self.fixed_now),
                           {k: (b, self.half_first[k]) for k, b in self.half_seen.items()})

    def run(self) -> PatchVerdict:
        verdict = PatchVerdict(changed_bytes=int(self.idx.size))
        # Even with nothing changed: the first check of a boot pins what later checks
        # must see again, and a pinned state undone shows only here.
        for mech in REGISTRY:     # do_ftrace, do_jump_labels, ... in registry order
            if mech.verify is not None:
                mech.verify(self)
        cov = self.coverage()
        self.probes(self.idx[~cov])
        self.track_half_states()
        self.revoke()
        verdict.memory = self.next_memory()
        for o, ln, before, why in self.undone[:self.limits.max_ranges]:
            verdict.unverified.append(UnverifiedRange(
                _u64(self.base + o), _u64(self.base + o + ln), before,
                bytes(self.lmem[o:o + ln]), why))
        if self.idx.size == 0:
            return verdict
        cov = self.coverage()
        base = self.base
        bm, lm = self.bmem, self.lmem
        ubase = np.uint64(base)
        for bt in self.batches:
            starts = (bt.off.astype(np.uint64) + ubase).tolist()
            ends = (bt.off.astype(np.uint64) + bt.length.astype(np.uint64) + ubase).tolist()
            verdict.verified.extend(
                VerifiedPatch(bt.mech, va, va, ve, bytes(bm[o:o + ln]), bytes(lm[o:o + ln]),
                              form, tgt, ip)
                for o, ln, va, ve, form, tgt, ip in zip(
                    bt.off.tolist(), bt.length.tolist(), starts, ends, bt.forms, bt.targets,
                    bt.in_progress, strict=True))
        verdict.verified.sort(key=attrgetter("start"))
        rest = self.idx[~cov]
        if rest.size:
            for s, e, why in self.unverified_ranges(rest):
                verdict.unverified.append(UnverifiedRange(
                    _u64(base + s), _u64(base + e), bytes(self.bmem[s:e]),
                    bytes(self.lmem[s:e]), why))
        verdict.unverified.sort(key=attrgetter("start"))
        return verdict




def verify_text_changes(baseline: bytes | bytearray | memoryview,
                        live: bytes | bytearray | memoryview, link_base: int, slide: int,
                        sites: PatchSites, read_va: ReadVA | None = None, *,
                        relocs: RegionRelocs | None = None,
                        optprobe_template: bytes | None = None,
                        limits: Limits | None = None, facts: VmFacts | None = None,
                        memory: PatchMemory | None = None,
                        direct: DirectLookup | None = None) -> PatchVerdict:
    """Which changed bytes of `.text` are the kernel's own patching, and which are not.

    `baseline` and `live` are the whole KASLR-normalized `.text` (same length, link-time
    layout); `link_base` is the link-time VA of its first byte; `slide` the VM's KASLR
    slide (run-time VA = link VA + slide); `read_va(va, size)` reads guest memory at a
    run-time VA (None when unmapped) — used for targets outside `.text` (allocated
    ftrace trampolines, optprobe slots); without it those are unverified.
    `relocs` (the `.text` relocation sites, offsets from `link_base`) lets copies of
    kernel code read from elsewhere be normalized before comparison; `optprobe_template`
    gives the normalized bytes of optprobe_template_entry..end when that template is not
    inside `.text` (6.x keeps it in .rodata).

    `facts` is what the check knows of the VM besides its memory (vCPU count, paging
    mode, the time); `memory` what the previous check of this boot left (None: this is
    the first). The verdict's `memory` is what the next check of this boot needs.

    `direct(ip)` names the ftrace direct-call target of a function's run-time ip from
    the kernel's `direct_functions` (None: a site calling outside `.text` anything but
    an ftrace trampoline is unverified).
    """
    v = _Verifier(baseline, live, link_base, slide, sites, read_va, relocs,
                  optprobe_template, limits or Limits(), facts, memory)
    v.direct = direct
    return v.run()

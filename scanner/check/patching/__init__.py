"""Exact verifiers for the kernel's own run-time patching of `.text` (pure: no I/O).

Linux rewrites its own `.text` while it runs. When a `.text` page differs from its
baseline, `verify_text_changes` decides, byte by byte, which changes are the kernel's
own patching at a known site, in exactly an encoding the kernel writes there, and
which are not (tampering). A changed byte is verified only if it lies in a site that
verifies as a whole; every other changed byte is reported, whatever page it is in.

What each mechanism accepts (x86-64, Linux 6.1 and 6.12; sources under arch/x86/):

* `ftrace` — `__mcount_loc` sites (kernel/ftrace.c: ftrace_nop_replace = x86_nops[5],
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
* `jump_label` — `__jump_table` code addresses (kernel/jump_label.c, __jump_label_patch):
  the size is the baseline instruction's (2: `66 90`/`eb rel8`, 5: NOP5/`e9 rel32`); live
  bytes are x86_nops[size] or the `jmp` of that size to that entry's own target. All
  sites of one key are flipped from the golden baseline, or none (jump_label_update).
  A key only boot code sets — in read-only data (`__ro_after_init`), or an LSM hook's
  `security_hook_active_*` (not a BPF LSM hook's) — keeps the sites the first check
  of the boot saw.
* `static_call` — `.static_call_sites` (kernel/static_call.c, __static_call_transform):
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
* `kprobe` — an `int3` (0xcc) replacing the first byte of an instruction, decoded with
  capstone from the start of its function over the baseline bytes (kprobes/core.c,
  can_probe); not in `kprobe_blacklist`, not inside another mechanism's site.
* `optprobe` — `jmp rel32` at an instruction boundary to outside `.text`, within the
  function, with no jump in the function into the 4 bytes after the first
  (opt.c, can_optimize), and the slot verified by reading it
  (arch_prepare_optimized_kprobe): template bytes except the NOP3 → `clac`, the
  `movabs $op, %rdi` (op: the struct optimized_kprobe whose kp.addr is this site)
  and the `call optimized_callback`; then the
  copied instructions (whole instructions covering ≥ 5 bytes, no relative branches,
  %rip-relative displacements re-based exactly as __copy_instruction does); then
  `jmp` back to the instruction after them. One slot serves one site.
* `smp_lock` — a `.smp_locks` byte that is 0xf0 or 0x3e in both (alternative.c): all
  sites alike, and 0x3e only on a one-vCPU VM.
* `runtime_const` — the immediates of a runtime constant (6.11+, asm/runtime-const.h):
  one value across its sites, equal to its variable in guest memory, to what the
  kernel computes (USER_PTR_MAX), and to the value the first check of the boot saw.

text_poke_bp() writes an `int3` first, then the tail, then the first byte: a site of
ftrace, jump_label, static_call (or an optprobe jmp) whose first byte is `int3` and
whose other bytes are the baseline's or those of an allowed form is verified as that
mechanism with `in_progress=True` — outside the kprobe blacklist, and only once: the
same half-state seen again HALF_STATE_MAX seconds later is tampering.

What must hold across checks of one boot comes in as `memory` (`PatchMemory`, pinned at
the first check) and goes out in the verdict; what the check knows of the VM besides
its memory (vCPUs, paging mode, the time) as `facts` (`VmFacts`).

Bounded: numpy finds the changed bytes and checks all fixed sites in bulk; per-site
Python work (decoding, reading out-of-text targets) is capped by `Limits`, and what
is over the caps stays unverified.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import capstone
import numpy as np
import numpy.typing as npt

from scanner.check.patch_state import HALF_STATE_MAX, PatchMemory, VmFacts
from scanner.image.patchsites import MECHANISMS, PatchSites
from scanner.image.relocs import RegionRelocs

__all__ = ["Limits", "MechanismSummary", "PatchMemory", "PatchVerdict", "ReadVA",
           "UnverifiedRange", "VerifiedPatch", "VmFacts", "verify_text_changes"]

#: Reads `size` bytes of guest memory at a run-time virtual address (None: unmapped).
ReadVA = Callable[[int, int], bytes | None]

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
B = npt.NDArray[np.bool_]

NOP2 = b"\x66\x90"                  # x86_nops[2] (asm/nops.h BYTES_NOP2)
NOP3 = b"\x0f\x1f\x00"              # x86_nops[3]
NOP5 = b"\x0f\x1f\x44\x00\x00"      # x86_nops[5] (BYTES_NOP5 on x86-64, 6.1 and 6.12)
CLAC = b"\x0f\x01\xca"
XOR5RAX = b"\x2e\x2e\x2e\x31\xc0"   # static_call.c: cs cs cs xorl %eax, %eax
RETINSN = b"\xc3\xcc\xcc\xcc\xcc"   # static_call.c: ret; int3 x4
INT3 = 0xCC
CALL, JMP32, JMP8, RET = 0xE8, 0xE9, 0xEB, 0xC3
KERNEL_HALF = 0xFFFF800000000000
#: offsetof(struct optimized_kprobe, kp.addr) (include/linux/kprobes.h, 6.1 and 6.12:
#: hlist_node, list_head, nmissed before it).
KPROBE_ADDR_OFF = 40
#: Names of the return thunks the kernel writes `jmp x86_return_thunk` to.
RETURN_THUNKS = ("__x86_return_thunk", "retbleed_return_thunk", "srso_return_thunk",
                 "srso_alias_return_thunk", "its_return_thunk")
_M64 = (1 << 64) - 1


def _s64(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


def _u64(x: int) -> int:
    return x & _M64


@dataclass(frozen=True)
class Limits:
    """Caps on per-site work, so hostile input cannot make a check slow. Changes over a
    cap stay unverified (reason says which cap)."""

    #: int3/jmp candidates (outside the fixed sites) examined by decoding.
    max_candidates: int = 4096
    #: Bytes of baseline code decoded with capstone per call.
    max_decode_bytes: int = 4 << 20
    #: Distinct out-of-text targets (trampolines, optprobe slots) read per call.
    max_remote_targets: int = 512
    #: Largest single read through read_va.
    max_read: int = 1 << 16
    #: Unverified ranges reported; past this the rest is merged into the last one.
    max_ranges: int = 100_000


@dataclass(frozen=True, slots=True)
class VerifiedPatch:
    """One site whose changed bytes are the kernel's own patching."""

    mechanism: str
    site: int            #: link-time VA of the site
    start: int           #: [start, end): link-time VAs of the site's bytes
    end: int
    before: bytes        #: baseline bytes of [start, end)
    after: bytes         #: live bytes of [start, end)
    form: str            #: which allowed encoding ("nop", "call ftrace_caller", ...)
    #: Branch target: link-time VA inside .text, run-time VA outside (None: no branch).
    target: int | None = None
    #: text_poke_bp() caught half-way (int3 first byte).
    in_progress: bool = False


@dataclass(frozen=True, slots=True)
class UnverifiedRange:
    """Changed bytes that no verifier explains: tampering."""

    start: int           #: link-time VA, [start, end)
    end: int
    before: bytes
    after: bytes
    reason: str


@dataclass(frozen=True)
class MechanismSummary:
    count: int
    sites: tuple[int, ...]        #: link-time VAs, sorted
    in_progress: int


@dataclass
class PatchVerdict:
    verified: list[VerifiedPatch] = field(default_factory=list)
    unverified: list[UnverifiedRange] = field(default_factory=list)
    changed_bytes: int = 0
    #: What the next check of this boot needs (`scanner.check.patch_state`).
    memory: PatchMemory = field(default_factory=PatchMemory)

    @property
    def clean(self) -> bool:
        """True when every changed byte is verified patching."""
        return not self.unverified

    def summary(self) -> dict[str, MechanismSummary]:
        """Per mechanism (only those seen): how many sites, which, how many in progress."""
        by: dict[str, list[VerifiedPatch]] = {}
        for v in self.verified:
            by.setdefault(v.mechanism, []).append(v)
        return {m: MechanismSummary(len(by[m]), tuple(sorted(v.site for v in by[m])),
                                    sum(v.in_progress for v in by[m]))
                for m in MECHANISMS if m in by}


# ---------------------------------------------------------------------------------
# helpers

def _isin_sorted(sorted_arr: I64, vals: I64) -> B:
    if sorted_arr.size == 0:
        return np.zeros(vals.shape, dtype=np.bool_)
    pos = np.searchsorted(sorted_arr, vals)
    pos = np.minimum(pos, sorted_arr.size - 1)
    return np.asarray(sorted_arr[pos] == vals, dtype=np.bool_)


def _rel32(m: U8, col: int) -> I64:
    """Signed little-endian int32 at columns col..col+3 of each row."""
    raw = np.ascontiguousarray(m[:, col:col + 4]).view("<i4").reshape(-1)
    return raw.astype(np.int64)


def _eq_row(m: U8, pattern: bytes) -> B:
    return np.asarray((m == np.frombuffer(pattern, np.uint8)).all(axis=1), dtype=np.bool_)


def _to_signed_sorted(a: npt.ArrayLike) -> I64:
    arr = np.asarray(a, dtype=np.uint64).view(np.int64)
    return np.sort(arr)


_HEX = re.compile(r"^0x[0-9a-f]+$")
_JUMPS = frozenset({"jmp", "jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns",
                    "jp", "jnp", "jl", "jge", "jle", "jg", "jrcxz", "jecxz", "jcxz",
                    "loop", "loope", "loopne"})


@dataclass
class _Func:
    starts: list[int]          # instruction start offsets (in .text), ascending
    startset: frozenset[int]
    jumps: list[tuple[int, int]]   # (insn offset, direct jump target link VA)
    complete: bool             # decoded to the function's end without an invalid insn


@dataclass
class _Batch:
    mech: str
    off: I64
    length: I64
    forms: list[str]
    targets: list[int | None]
    in_progress: list[bool]


Validate = Callable[[U8, I64, Mapping[str, npt.NDArray[Any]]],
                    tuple[B, npt.NDArray[np.int8], I64]]


class _Verifier:
    def __init__(self, baseline: bytes | bytearray | memoryview,
                 live: bytes | bytearray | memoryview, link_base: int, slide: int,
                 sites: PatchSites, read_va: ReadVA | None, relocs: RegionRelocs | None,
                 optprobe_template: bytes | None, limits: Limits,
                 facts: VmFacts | None = None, memory: PatchMemory | None = None) -> None:
        self.bmem = memoryview(baseline).cast("B")
        self.lmem = memoryview(live).cast("B")
        if len(self.bmem) != len(self.lmem):
            raise ValueError(f"baseline ({len(self.bmem)} B) and live ({len(self.lmem)} B) "
                             ".text differ in length")
        self.b: U8 = np.frombuffer(self.bmem, dtype=np.uint8)
        self.l: U8 = np.frombuffer(self.lmem, dtype=np.uint8)
        self.n = len(self.b)
        self.base = _u64(link_base)
        self.base_s = _s64(link_base)
        self.slide = slide
        self.sites = sites
        self.read_va = read_va
        self.relocs = relocs
        self.optprobe_template = optprobe_template
        self.limits = limits
        self.idx: I64 = np.flatnonzero(self.b != self.l).astype(np.int64)
        fs = _to_signed_sorted(sites.function_starts)
        self.fs: I64 = fs
        self.fs_list: list[int] = fs.tolist()
        self.batches: list[_Batch] = []
        self.reasons: dict[int, str] = {}
        # Fixed sites kprobes may not use: (start offsets, size) per batch of sites.
        self.reserved_parts: list[tuple[I64, int]] = []
        self.opt_reserved_parts: list[tuple[I64, int]] = []
        self.res: dict[bool, tuple[I64, I64, I64]] = {}
        self.cand_cut: int | None = None
        #: Sites that were touched but did not verify: reported whole.
        self.failed: list[tuple[I64, int]] = []
        self.remote_cache: dict[tuple[str, int, int], tuple[bool, str]] = {}
        self.remote_reads = 0
        self.decoded_bytes = 0
        self.funcs: dict[int, _Func | None] = {}
        self.md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.mdd = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.mdd.detail = True
        names = sites.ftrace_trampolines
        self.sym: dict[str, int] = {k: _s64(v[0]) for k, v in names.items()}
        bl = sorted((_s64(a), _s64(b)) for a, b in sites.kprobe_blacklist)
        self.bl_starts = [a for a, _ in bl]
        self.bl = bl
        self.bl_maxend: list[int] = []
        m = -(1 << 63)
        for _, e in bl:
            m = max(m, e)
            self.bl_maxend.append(m)
        self.facts = facts or VmFacts()
        self.memory = memory or PatchMemory()
        self.now = self.facts.now
        # Branch targets the kernel writes: functions, not labels inside one.
        ct = _to_signed_sorted(sites.call_targets)
        self.ct: I64 = ct if ct.size else fs
        self.named: dict[str, int] = {k: _s64(v) for k, v in sites.symbols.items()}
        self.thunks: I64 = np.array(sorted({self.named[n] for n in RETURN_THUNKS
                                            if n in self.named}), dtype=np.int64)
        self.opt_slots: dict[int, list[int]] = {}   # optprobe slot → sites jumping to it
        #: Half-states seen by this check: key → live bytes, when first seen
        #: (see PatchMemory.half).
        self.half_seen: dict[str, str] = {}
        self.half_first: dict[str, float] = {}
        #: Keys (link VAs) of ftrace trampolines found in a half-state (int3 at their call).
        self.tramp_half: dict[int, tuple[str, str]] = {}
        #: Sites that verified one by one but break a rule across sites or checks:
        #: text offset → (length, reason).
        self.revoked: dict[int, tuple[int, str]] = {}
        #: Unverified ranges of bytes that equal the golden baseline but should not
        #: (a pinned state undone): (offset, length, before, reason).
        self.undone: list[tuple[int, int, bytes, str]] = []
        #: PatchMemory.fixed_sites for the next check.
        self.fixed_now: dict[str, str] = (dict(self.memory.fixed_sites) if self.memory.pinned
                                          else {})
        #: PatchMemory.runtime_const for the next check.
        self.rc_now: dict[str, int] = dict(self.memory.runtime_const)

    # -- small utilities ------------------------------------------------------------
    def off_of(self, va_s: int) -> int:
        return va_s - self.base_s

    def in_text_off(self, off: int, size: int = 1) -> bool:
        return off >= 0 and off + size <= self.n

    def is_func_start(self, va_s: int) -> bool:
        i = bisect.bisect_left(self.fs_list, va_s)
        return i < len(self.fs_list) and self.fs_list[i] == va_s

    def text_func_start(self, va_s: int) -> bool:
        return self.in_text_off(self.off_of(va_s)) and self.is_func_start(va_s)

    def is_call_target(self, va_s: int) -> bool:
        """A function in `.text` the kernel may branch to (not a label inside one)."""
        return (self.in_text_off(self.off_of(va_s))
                and bool(_isin_sorted(self.ct, np.array([va_s], dtype=np.int64))[0]))

    def is_thunk(self, va_s: int) -> bool:
        return bool(_isin_sorted(self.thunks, np.array([va_s], dtype=np.int64))[0])

    def blacklisted(self, va_s: int) -> bool:
        i = bisect.bisect_right(self.bl_starts, va_s) - 1
        return i >= 0 and self.bl_maxend[i] > va_s

    def offsets(self, vas: npt.ArrayLike) -> I64:
        a = np.asarray(vas, dtype=np.uint64).view(np.int64)
        return np.asarray(a - np.int64(self.base_s), dtype=np.int64)

    def touched(self, off: I64, length: I64) -> B:
        lo = np.searchsorted(self.idx, off, side="left")
        hi = np.searchsorted(self.idx, off + length, side="left")
        return np.asarray(hi > lo, dtype=np.bool_)

    def read(self, va: int, size: int) -> bytes | None:
        if self.read_va is None or size <= 0 or size > self.limits.max_read:
            return None
        try:
            data = self.read_va(_u64(va), size)
        except Exception:   # a reader failing on hostile addresses is "unreadable"
            return None
        if data is None or len(data) < size:
            return None
        return bytes(data[:size])

    def runtime(self, link_s: int) -> int:
        return _u64(link_s + self.slide)

    def to_link(self, runtime: int) -> int:
        return _s64(runtime - self.slide)

    # -- fixed sites ----------------------------------------------------------------
    def check_sites(self, mech: str, off: I64, size: int, validate: Validate,
                    forms: Sequence[str], first_bytes: bytes,
                    aux: Mapping[str, npt.NDArray[Any]] | None = None,
                    reason: str = "") -> None:
        """Verify fixed-size sites at text offsets `off` (one row each, rows may repeat
        an offset: a site is verified if any of its rows is)."""
        aux = dict(aux or {})
        keep = (off >= 0) & (off + size <= self.n)
        off = off[keep]
        aux = {k: v[keep] for k, v in aux.items()}
        if off.size:
            (self.reserved_parts if mech in ("ftrace", "jump_label", "static_call")
             else self.opt_reserved_parts).append((off, size))
        t = self.touched(off, np.full(off.shape, size, dtype=np.int64))
        off = off[t]
        aux = {k: v[t] for k, v in aux.items()}
        if off.size == 0:
            return
        cols = off[:, None] + np.arange(size, dtype=np.int64)
        live = self.l[cols]
        base = self.b[cols]
        ok, form, tgt = validate(live, off, aux)
        ok = ok.copy()
        form = form.astype(np.int16)
        inprog = np.zeros(off.shape, dtype=np.bool_)
        if size > 1 and first_bytes:
            cand = np.flatnonzero(~ok & (live[:, 0] == INT3))
            if cand.size:
                sub_live = live[cand]
                sub_off = off[cand]
                sub_aux = {k: v[cand] for k, v in aux.items()}
                got = np.asarray((sub_live[:, 1:] == base[cand, 1:]).all(axis=1),
                                 dtype=np.bool_)
                gform = np.full(cand.shape, len(forms), dtype=np.int16)   # "baseline tail"
                gtgt = np.zeros(cand.shape, dtype=np.int64)
                for fb in first_bytes:
                    m = sub_live.copy()
                    m[:, 0] = fb
                    o2, f2, t2 = validate(m, sub_off, sub_aux)
                    new = o2 & ~got
                    gform[new] = f2[new]
                    gtgt[new] = t2[new]
                    got |= o2
                ok[cand] = got
                form[cand] = np.where(got, gform, form[cand])
                tgt[cand] = np.where(got, gtgt, tgt[cand])
                inprog[cand] = got
        good = np.flatnonzero(ok)
        if good.size:
            uoff, first = np.unique(off[good], return_index=True)
            rows = good[first]
            names = [*forms, "int3 (baseline tail)"]
            fl = form[rows].tolist()
            tv = tgt[rows]
            shown = np.where(self.text_mask(tv), tv, tv + np.int64(_s64(self.slide)))
            tl = shown.view(np.uint64).tolist()
            nob = (form[rows] == len(forms)) | (tv == 0)
            self.batches.append(_Batch(
                mech, uoff, np.full(uoff.shape, size, dtype=np.int64),
                [names[f] for f in fl],
                [None if z else t for z, t in zip(nob.tolist(), tl, strict=True)],
                inprog[rows].tolist()))
        bad = off[~ok]
        if bad.size:
            self.failed.append((bad, size))
        if bad.size and reason:
            okset = set(off[good].tolist())
            for o in bad[:10000].tolist():
                if o not in okset:
                    self.reasons.setdefault(o, reason)

    def branch_targets(self, live: U8, off: I64, col: int, insn_len: int) -> I64:
        return np.asarray(np.int64(self.base_s) + off + insn_len + _rel32(live, col),
                          dtype=np.int64)

    def text_mask(self, t: I64) -> B:
        o = t - np.int64(self.base_s)
        return np.asarray((o >= 0) & (o < self.n), dtype=np.bool_)

    def func_start_mask(self, t: I64) -> B:
        """Branch targets the kernel may write: functions in `.text` (not labels)."""
        return self.text_mask(t) & _isin_sorted(self.ct, t)

    def thunk_mask(self, t: I64) -> B:
        return _isin_sorted(self.thunks, t)

    # ftrace --------------------------------------------------------------------------
    def do_ftrace(self) -> None:
        s = self.sites
        sym = self.sym
        callers = [sym[k] for k in ("ftrace_caller", "ftrace_regs_caller") if k in sym]
        caller_arr = np.array(sorted(set(callers)), dtype=np.int64)
        forms = ["nop", "call ftrace_caller", "call ftrace_regs_caller",
                 "call allocated trampoline"]

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
                    for r in rows[~res[inv.reshape(-1)]][:1000].tolist():
                        self.reasons.setdefault(int(off[r]), "ftrace site calls outside "
                                                "text: " + checked[int(inv.reshape(-1)[
                                                    np.searchsorted(rows, r)])][1])
                    good = rows[res[inv.reshape(-1)]]
                    ok[good] = True
                    form[good] = 3
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

    # jump labels ----------------------------------------------------------------------
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

    def _pin(self, off: I64, size: I64, why: str) -> None:
        """Sites only boot code writes: at the first check of a boot, remember those that
        differ from the golden baseline; later, each must hold what was seen then."""
        if off.size == 0:
            return
        cols = np.minimum(off[:, None] + np.arange(6, dtype=np.int64), self.n - 1)
        changed = ((self.l[cols] != self.b[cols]) & (np.arange(6) < size[:, None])).any(axis=1)
        mem = self.memory
        if not mem.pinned:
            self.fixed_now.update(
                (f"{_u64(self.base_s + o):#x}", bytes(self.lmem[o:o + ln]).hex())
                for o, ln in zip(off[changed].tolist(), size[changed].tolist(), strict=True))
            return
        for o, ln in zip(off[changed].tolist(), size[changed].tolist(), strict=True):
            if mem.fixed_sites.get(f"{_u64(self.base_s + o):#x}") != bytes(
                    self.lmem[o:o + ln]).hex():
                self.revoked.setdefault(o, (ln, why))
        if not mem.fixed_sites:
            return
        for o, ln in zip(off[~changed].tolist(), size[~changed].tolist(), strict=True):
            was = mem.fixed_sites.get(f"{_u64(self.base_s + o):#x}")
            if was is not None and len(self.undone) < 10000:
                # unchanged from golden now, but not what the first check saw: undone
                self.undone.append((o, ln, bytes.fromhex(was)[:ln], why))

    # static calls ---------------------------------------------------------------------
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

    # smp locks, runtime constants -----------------------------------------------------
    def do_smp_locks(self) -> None:
        """alternatives_smp_unlock() (alternative.c) turns every `lock` prefix into `ds`
        when the kernel boots with one CPU, and alternatives_smp_lock() all of them
        back when a second comes online: all sites are `lock` or all are `ds`, and
        `ds` only on a one-vCPU VM."""
        off = self.offsets(self.sites.smp_locks)
        off = off[(off >= 0) & (off < self.n)]
        base = self.b[off]
        off = off[(base == 0xF0) | (base == 0x3E)]
        lv = self.l[off]
        n_ds = int((lv == 0x3E).sum())
        n_lock = int((lv == 0xF0).sum())
        cpus = self.facts.cpus
        if cpus is not None and cpus > 1:
            bad_state, why = 0x3E, (f"smp lock site: `ds` in place of `lock` on a VM with "
                                    f"{cpus} vCPUs (only a one-CPU boot unlocks)")
        elif n_ds and n_lock:
            bad_state = 0x3E if n_ds <= n_lock else 0xF0
            why = (f"smp lock site: {n_ds} of {n_ds + n_lock} lock prefixes unlocked "
                   "(the kernel unlocks all or none)")
        else:
            bad_state, why = -1, ""

        def validate(live: U8, o: I64, aux: Mapping[str, npt.NDArray[Any]]
                     ) -> tuple[B, npt.NDArray[np.int8], I64]:
            v = live[:, 0]
            ok = ((v == 0xF0) | (v == 0x3E)) & (v != bad_state)
            return ok, np.where(v == 0xF0, 0, 1).astype(np.int8), np.zeros(o.size, np.int64)

        self.check_sites("smp_lock", off, 1, validate, ["lock", "ds"], b"",
                         reason=why or "smp lock site: not 0xf0/0x3e")
        if bad_state >= 0:   # the minority left as in the golden baseline: undone sites
            quiet = off[(lv == bad_state) & (lv == base)]
            for o in quiet[:10000].tolist():
                self.undone.append((o, 1, bytes((0xF0 if bad_state == 0x3E else 0x3E,)),
                                    why))

    def do_runtime_consts(self) -> None:
        """Runtime constants (6.11+, asm/runtime-const.h): runtime_const_init() writes a
        variable's value into all its immediates once, at boot. All sites of a variable
        hold one value; it equals the variable in guest memory (where kallsyms names
        it), what the kernel computes (USER_PTR_MAX: TASK_SIZE_MAX for the VM's paging
        mode), and the value pinned at the first check of the boot."""
        groups: dict[tuple[str, int], list[int]] = {}
        for rc in self.sites.runtime_const:
            if 1 <= rc.size <= 8:
                groups.setdefault((rc.name, rc.size), []).append(_s64(rc.addr) - self.base_s)
        mem = self.memory
        pins: dict[str, int] = {}
        for (name, size), offs in sorted(groups.items()):
            o = np.array(offs, dtype=np.int64)
            o = o[(o >= 0) & (o + size <= self.n)]
            if o.size == 0:
                continue
            cols = o[:, None] + np.arange(size, dtype=np.int64)
            raw = np.zeros((o.size, 8), dtype=np.uint8)
            raw[:, :size] = self.l[cols]
            vals = np.unique(raw.view("<u8").reshape(-1))
            why = ""
            if vals.size > 1:
                why = (f"runtime constant {name}: its {o.size} sites hold {vals.size} "
                       "different values (the kernel writes one, at boot)")
            else:
                v = int(vals[0])
                why = self._runtime_const_value(name, size, v)
                was = mem.runtime_const.get(name)
                if was is None and mem.pinned:
                    # pinned without a value: the first check saw the golden bytes
                    b = np.zeros((o.size, 8), dtype=np.uint8)
                    b[:, :size] = self.b[cols]
                    bvals = np.unique(b.view("<u8").reshape(-1))
                    was = int(bvals[0]) if bvals.size == 1 else None
                if not why and was is not None and was != v:
                    why = (f"runtime constant {name}: {v:#x}, not the {was:#x} the first "
                           "check of this boot saw (written once, at boot)")
                if not why:
                    pins[name] = v

            def validate(live: U8, oo: I64, aux: Mapping[str, npt.NDArray[Any]],
                         ok: bool = not why) -> tuple[B, npt.NDArray[np.int8], I64]:
                return (np.full(oo.size, ok, dtype=np.bool_), np.zeros(oo.size, dtype=np.int8),
                        np.zeros(oo.size, dtype=np.int64))

            self.check_sites("runtime_const", o, size, validate, ["immediate"], b"",
                             reason=why)
        self.rc_now = dict(mem.runtime_const) if mem.pinned else pins

    def _runtime_const_value(self, name: str, size: int, v: int) -> str:
        """Why `v` cannot be the value of runtime constant `name` ("" when it can)."""
        la57 = self.facts.la57
        if name == "USER_PTR_MAX" and la57 is not None:
            # arch/x86/kernel/cpu/common.c: USER_PTR_MAX = TASK_SIZE_MAX, which is
            # (1 << __VIRTUAL_MASK_SHIFT) - PAGE_SIZE (47, or 56 with 5-level paging).
            want = (1 << (56 if la57 else 47)) - 4096
            if v != want:
                return (f"runtime constant USER_PTR_MAX: {v:#x}, not TASK_SIZE_MAX "
                        f"{want:#x} of {5 if la57 else 4}-level paging (every user-pointer "
                        "range check uses it)")
        var = self.named.get(name)
        if var is not None and self.read_va is not None:
            width = 8 if size == 8 else 4
            data = self.read(self.runtime(var), width)
            if data is None:
                return f"runtime constant {name}: its variable is unreadable"
            mv = int.from_bytes(data, "little")
            if mv != v:
                return (f"runtime constant {name}: {v:#x} in the code, {mv:#x} in the "
                        "variable (runtime_const_init copies the one into the other)")
        return ""

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

    def _normalize_copy(self, buf: bytearray, text_off: int, size: int) -> None:
        """Undo KASLR in a copy of .text[text_off:text_off+size] read from elsewhere."""
        r = self.relocs
        if r is None or self.slide == 0:
            return
        for arr, width, sign in ((r.r64, 8, -1), (r.r32, 4, -1), (r.r32_inv, 4, 1)):
            if arr.size == 0:
                continue
            lo = np.searchsorted(arr, text_off)
            hi = np.searchsorted(arr, text_off + size - width, side="right")
            mask = (1 << (8 * width)) - 1
            for o in arr[lo:hi].tolist():
                p = o - text_off
                v = int.from_bytes(buf[p:p + width], "little")
                buf[p:p + width] = ((v + sign * self.slide) & mask).to_bytes(width, "little")

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

    def half_state(self, key: str, live: bytes, what: str) -> str:
        """A text_poke_bp() half-state seen now: remembered for the next check; why it
        is not the kernel's if the same one was seen HALF_STATE_MAX seconds ago."""
        now = self.now
        if now is None:
            return ""
        hexb = live.hex()
        self.half_seen[key] = hexb
        old = self.memory.half.get(key)
        if old is not None and old[0] == hexb:
            self.half_first[key] = old[1]
            if now - old[1] >= HALF_STATE_MAX:
                return (f"{what}: text_poke_bp() half-state (int3) seen unchanged "
                        f"{now - old[1]:.1f} s apart (the kernel finishes one in "
                        "microseconds)")
        else:
            self.half_first[key] = now
        return ""

    # kprobes, optprobes ---------------------------------------------------------------
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

    def track_half_states(self) -> None:
        """text_poke_bp()'s half-states are transient and obey the kprobe blacklist
        (the kernel's int3 handler must be able to run there)."""
        for bt in self.batches:
            if not any(bt.in_progress):
                continue
            for o, ln, ip in zip(bt.off.tolist(), bt.length.tolist(), bt.in_progress,
                                 strict=True):
                if not ip:
                    continue
                va = self.base_s + o
                if self.blacklisted(va):
                    self.revoked.setdefault(o, (ln, f"{bt.mech}: text_poke_bp() half-state "
                                                    "(int3) in a function kprobes may not "
                                                    "touch (blacklist)"))
                    continue
                why = self.half_state(f"{_u64(va):#x}", bytes(self.lmem[o:o + ln]), bt.mech)
                if why:
                    self.revoked.setdefault(o, (ln, why))

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
        self.do_ftrace()
        self.do_jump_labels()
        self.do_static_calls()
        self.do_smp_locks()
        self.do_runtime_consts()
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
                        memory: PatchMemory | None = None) -> PatchVerdict:
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
    """
    v = _Verifier(baseline, live, link_base, slide, sites, read_va, relocs,
                  optprobe_template, limits or Limits(), facts, memory)
    return v.run()

"""What every patch verifier shares (pure): encodings, decoding helpers, `Limits`, and
`VerifierBase`, the state of one verification — the `.text` buffers, the profile's
sites, the batches verified so far, the reasons and failed sites, and what crosses
sites or checks (pinned boot-only sites, `PatchMemory` in and out).

Each mechanism is a mixin of `VerifierBase` in a module of its own (`ftrace`,
`jump_label`, ...); `scanner.check.patching.verifier` combines them and drives a check.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import capstone
import numpy as np
import numpy.typing as npt

from scanner.check.patch_state import PatchMemory, VmFacts
from scanner.image.patchsites import PatchSites
from scanner.image.relocs import RegionRelocs

#: Reads `size` bytes of guest memory at a run-time virtual address (None: unmapped).
ReadVA = Callable[[int, int], bytes | None]
#: The ftrace direct-call target the kernel's bookkeeping (`direct_functions`) names for
#: a function's run-time ip: (target, "") or (None, why not).
DirectLookup = Callable[[int], tuple[int | None, str]]

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



#: Bytes compared per step by `_changed_offsets`: its temporaries stay small enough to
#: be reused from the heap (kscan caps glibc's mmap threshold at 1 MiB: a whole-`.text`
#: temporary would be mapped and faulted in, 14.7 MB of it, on every check).
_CMP_STEP = 1 << 18


def _changed_offsets(base: U8, live: U8) -> I64:
    """The offsets where `base` and `live` (same length) differ, ascending."""
    parts = []
    for i in range(0, len(base), _CMP_STEP):
        d = np.flatnonzero(base[i:i + _CMP_STEP] != live[i:i + _CMP_STEP])
        if d.size:
            parts.append(d + i)
    return (np.concatenate(parts) if parts else np.zeros(0, np.intp)).astype(np.int64)


@dataclass(frozen=True)
class SiteTables:
    """What every verification of one kernel build derives from its `PatchSites`
    (sorted, signed link VAs; ~4 ms to make on Debian 6.1), made once per build.
    Shared by the checks of every VM of that build, so read-only throughout."""

    fs: I64                  # function starts
    fs_list: tuple[int, ...]
    ct: I64                  # call targets (function starts when the profile has none)
    sym: Mapping[str, int]   # ftrace trampolines: name → start
    bl: tuple[tuple[int, int], ...]   # kprobe blacklist [start, end), sorted
    bl_starts: tuple[int, ...]
    bl_maxend: tuple[int, ...]   # running maximum of the ends (ranges may nest)
    named: Mapping[str, int]
    thunks: I64              # the return thunks the kernel jumps to

    @classmethod
    def of(cls, sites: PatchSites) -> SiteTables:
        fs = _to_signed_sorted(sites.function_starts)
        ct = _to_signed_sorted(sites.call_targets)
        bl = tuple(sorted((_s64(a), _s64(b)) for a, b in sites.kprobe_blacklist))
        maxend, m = [], -(1 << 63)
        for _, e in bl:
            m = max(m, e)
            maxend.append(m)
        named = MappingProxyType({k: _s64(v) for k, v in sites.symbols.items()})
        thunks = np.array(sorted({named[n] for n in RETURN_THUNKS if n in named}),
                          dtype=np.int64)
        if not ct.size:
            ct = fs
        for arr in (fs, ct, thunks):
            arr.flags.writeable = False
        return cls(fs, tuple(fs.tolist()), ct,
                   MappingProxyType({k: _s64(v[0])
                                     for k, v in sites.ftrace_trampolines.items()}),
                   bl, tuple(a for a, _ in bl), tuple(maxend), named, thunks)


#: The site tables of the last few builds checked, by PatchSites identity (the entry
#: holds the PatchSites itself, so an id is never reused while its entry is here).
_TABLES: dict[int, tuple[PatchSites, SiteTables]] = {}
_TABLES_MAX = 4
_TABLES_LOCK = threading.Lock()


def site_tables(sites: PatchSites) -> SiteTables:
    """`SiteTables.of(sites)`, made once per kernel build's PatchSites."""
    with _TABLES_LOCK:
        hit = _TABLES.get(id(sites))
        if hit is not None and hit[0] is sites:
            return hit[1]
    tables = SiteTables.of(sites)
    with _TABLES_LOCK:
        while len(_TABLES) >= _TABLES_MAX:
            del _TABLES[next(iter(_TABLES))]   # the oldest goes
        _TABLES[id(sites)] = (sites, tables)
    return tables


class VerifierBase:
    """One verification of a `.text` against its baseline: the state the mechanisms
    share, and the small utilities and bulk site check they all use."""

    #: Where an ftrace site may call directly (None: direct calls are not verifiable).
    direct: DirectLookup | None = None

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
        self.idx: I64 = _changed_offsets(self.b, self.l)
        tables = site_tables(sites)
        self.fs: I64 = tables.fs
        self.fs_list: Sequence[int] = tables.fs_list
        self.batches: list[_Batch] = []
        self.reasons: dict[int, str] = {}
        #: ftrace sites whose out-of-text call is no direct call either: why not.
        self.direct_why: dict[int, str] = {}
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
        self.sym: Mapping[str, int] = tables.sym
        self.bl_starts = tables.bl_starts
        self.bl = tables.bl
        self.bl_maxend: Sequence[int] = tables.bl_maxend
        self.facts = facts or VmFacts()
        self.memory = memory or PatchMemory()
        self.now = self.facts.now
        # Branch targets the kernel writes: functions, not labels inside one.
        self.ct: I64 = tables.ct
        self.named: Mapping[str, int] = tables.named
        self.thunks: I64 = tables.thunks
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

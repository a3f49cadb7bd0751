"""Patch-site extraction: a synthetic image with every table, and the real Debian 6.1
and 6.12 images (sites checked against the file's own bytes and kallsyms)."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest

from scanner.errors import KernelImageError
from scanner.image.kallsyms import Kallsyms, recover_kallsyms
from scanner.image.patchsites import PatchSites, extract_patch_sites
from scanner.image.serialize import patch_sites_from_bytes, patch_sites_to_bytes
from scanner.image.vmlinux import KernelImage, Section
from tests.realkernels import real_image

TEXT = 0xFFFFFFFF81000000
RO = 0xFFFFFFFF82000000
DATA = 0xFFFFFFFF82800000
NOP5 = bytes.fromhex("0f1f440000")
ENDBR = bytes.fromhex("f30f1efa")


# --------------------------------------------------------------------------- synthetic


class Synth:
    """A tiny kernel: .text with functions and sites, .rodata with the tables."""

    def __init__(self) -> None:
        self.text = bytearray(b"\xcc" * 0x2000)
        self.ro = bytearray(0x2000)
        self.data = bytearray(0x1000)
        self.syms: list[tuple[int, str, str]] = [
            (TEXT, "T", "_stext"), (TEXT, "T", "_text"), (TEXT + 0x2000, "T", "_etext")]
        self.ro_used = 0

    def func(self, off: int, name: str, body: bytes) -> int:
        self.text[off:off + len(body)] = body
        self.syms.append((TEXT + off, "T", name))
        return TEXT + off

    def table(self, start: str, stop: str, data: bytes) -> int:
        at = (self.ro_used + 15) & ~15
        self.ro[at:at + len(data)] = data
        self.ro_used = at + len(data)
        self.syms += [(RO + at, "D", start), (RO + at + len(data), "D", stop)]
        return RO + at

    def next_addr(self) -> int:
        return RO + ((self.ro_used + 15) & ~15)

    def image(self) -> tuple[KernelImage, Kallsyms]:
        data = bytes(self.text) + bytes(self.ro) + bytes(self.data)
        secs = {".text": Section(".text", TEXT, len(self.text), 0),
                ".rodata": Section(".rodata", RO, len(self.ro), len(self.text)),
                ".data": Section(".data", DATA, len(self.data), len(self.text) + len(self.ro))}
        img = KernelImage(path=Path("<synthetic>"), build_id="00", version="Linux version x y z",
                          release="z", sections=secs, relocs=None, symbols=None, _data=data)
        syms = sorted(self.syms, key=lambda s: s[0])
        ks = Kallsyms(addresses=np.array([a for a, _, _ in syms], dtype=np.uint64),
                      names=tuple(n for _, _, n in syms), types="".join(t for _, t, _ in syms),
                      text=(TEXT, TEXT + len(self.text)))
        return img, ks


def build_synthetic() -> tuple[Synth, dict[str, object]]:
    s = Synth()
    f1 = s.func(0x100, "f1", NOP5 + b"\x66\x90" + b"\xc3")               # ftrace nop, 2-byte jl
    f2 = s.func(0x200, "f2", ENDBR + b"\xe8\0\0\0\0" + NOP5 + b"\xc3")   # IBT + ftrace call
    f3 = s.func(0x300, "f3", b"\xf0\x0f\xb1\x17" + b"\xe8\0\0\0\0\xc3")  # lock cmpxchg; call
    tramp = s.func(0x400, "__SCT__foo", b"\xe9\0\0\0\0\xcc\xcc\xcc")
    s.func(0x500, "ftrace_caller", b"\x90" * 0x20)
    s.func(0x510, "ftrace_call", b"\xe8\0\0\0\0")
    s.func(0x520, "ftrace_caller_end", b"\x90")
    s.func(0x540, "return_to_handler", b"\x90" * 16)
    bl = s.func(0x600, "nokprobe_fn", b"\x90" * 0x30)
    s.func(0x640, "after_nokprobe", b"\xc3")
    s.syms += [(TEXT + 0x700, "T", "__entry_text_start"), (TEXT + 0x780, "T", "__entry_text_end")]
    # Constant-site functions for runtime consts (movabs; shrl $12).
    rc_ptr = s.func(0x800, "uses_ptr", b"\x48\xb8" + (0x0123456789ABCDEF).to_bytes(8, "little"))
    rc_shift = s.func(0x820, "uses_shift", b"\xc1\xe8\x0c\xc3")
    key = DATA + 0x100
    s.syms += [(key, "D", "some_key"), (DATA + 0x200, "D", "__SCK__foo")]

    # __mcount_loc: absolute u64, one zero entry, one outside .text (dropped).
    s.table("__start_mcount_loc", "__stop_mcount_loc",
            struct.pack("<4Q", f2 + 4, 0, f1, DATA))
    # __jump_table: relative {s32 code, s32 target, s64 key|flags}.
    jt = s.next_addr()
    entries = [(f1 + 5, f1 + 7, key, 1 | 2), (f2 + 9, f2 + 14, key, 0)]
    raw = b"".join(struct.pack("<iiq", c - (jt + 16 * i), t - (jt + 16 * i + 4),
                               k - (jt + 16 * i + 8) + fl)
                   for i, (c, t, k, fl) in enumerate(entries))
    s.table("__start___jump_table", "__stop___jump_table", raw)
    # .static_call_sites: relative {s32 addr, s32 key|flags}; tail=1.
    sc = s.next_addr()
    sk = DATA + 0x200
    raw = struct.pack("<ii", (f3 + 4) - sc, sk - (sc + 4) + 1) + \
        struct.pack("<ii", (f2 + 4) - (sc + 8), sk - (sc + 12))
    s.table("__start_static_call_sites", "__stop_static_call_sites", raw)
    # .smp_locks: s32 relative; second entry is not a lock prefix (dropped).
    sl = s.next_addr()
    s.table("__smp_locks", "__smp_locks_end",
            struct.pack("<ii", f3 - sl, (f3 + 1) - (sl + 4)))
    # runtime constants: entry + value = first byte of the immediate.
    rp = s.next_addr()
    s.table("__start_runtime_ptr_foo_table", "__stop_runtime_ptr_foo_table",
            struct.pack("<i", (rc_ptr + 2) - rp))
    rs = s.next_addr()
    s.table("__start_runtime_shift_foo_shift", "__stop_runtime_shift_foo_shift",
            struct.pack("<i", (rc_shift + 2) - rs))
    # _kprobe_blacklist: u64 function addresses.
    s.table("__start_kprobe_blacklist", "__stop_kprobe_blacklist", struct.pack("<Q", bl))
    s.syms += [(RO + 0x1800, "r", "optprobe_template_entry"),
               (RO + 0x1864, "r", "optprobe_template_end")]
    return s, {"f1": f1, "f2": f2, "f3": f3, "tramp": tramp, "key": key, "sk": sk, "bl": bl,
               "rc_ptr": rc_ptr, "rc_shift": rc_shift}


def test_synthetic_all_mechanisms() -> None:
    s, v = build_synthetic()
    img, ks = s.image()
    rep: dict[str, object] = {}
    ps = extract_patch_sites(img, ks, report=rep)
    f1, f2, f3 = v["f1"], v["f2"], v["f3"]
    assert ps.ftrace.tolist() == [f1, f2 + 4]
    assert ps.jump_code.tolist() == [f1 + 5, f2 + 9]
    assert ps.jump_target.tolist() == [f1 + 7, f2 + 14]
    assert ps.jump_key.tolist() == [v["key"], v["key"]]           # flag bits masked
    assert ps.static_call_addr.tolist() == [f2 + 4, f3 + 4]
    assert ps.static_call_key.tolist() == [v["sk"], v["sk"]]
    assert ps.static_call_tail.tolist() == [False, True]
    assert ps.static_call_trampolines == {v["tramp"]: v["sk"]}
    assert ps.smp_locks.tolist() == [f3]
    assert [(c.addr, c.size, c.name) for c in ps.runtime_const] == [
        (v["rc_ptr"] + 2, 8, "foo_table"), (v["rc_shift"] + 2, 1, "foo_shift")]
    assert ps.kprobe_blacklist == ((v["bl"], v["bl"] + 0x40), (TEXT + 0x700, TEXT + 0x780))
    assert ps.ftrace_trampolines["ftrace_caller"] == (TEXT + 0x500, TEXT + 0x520)
    assert ps.ftrace_trampolines["ftrace_call"] == (TEXT + 0x510, TEXT + 0x520)
    assert ps.ftrace_trampolines["return_to_handler"] == (TEXT + 0x540, TEXT + 0x600)
    assert ps.optprobe_template == (RO + 0x1800, RO + 0x1864)
    assert f1 in ps.function_starts.tolist() and TEXT + 0x700 in ps.function_starts.tolist()
    assert rep["smp_lock"]["rejected"] == 1                        # type: ignore[index]
    assert rep["ftrace"]["outside_text"] == 1                      # type: ignore[index]
    assert rep["jump_label"]["init_flag"] == 1                     # type: ignore[index]
    back = patch_sites_from_bytes(patch_sites_to_bytes(ps))
    _assert_same(back, ps)


def _assert_same(a: PatchSites, b: PatchSites) -> None:
    for f in ("ftrace", "jump_code", "jump_target", "jump_key", "static_call_addr",
              "static_call_key", "static_call_tail", "smp_locks", "function_starts"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
        assert getattr(a, f).dtype == getattr(b, f).dtype, f
    for f in ("static_call_trampolines", "runtime_const", "kprobe_blacklist",
              "ftrace_trampolines", "optprobe_template"):
        assert getattr(a, f) == getattr(b, f), f


def test_missing_tables_are_empty() -> None:
    s = Synth()
    s.func(0x100, "f", b"\xc3")
    img, ks = s.image()
    ps = extract_patch_sites(img, ks)
    assert ps.ftrace.size == 0 and ps.jump_code.size == 0 and ps.runtime_const == ()
    assert ps.optprobe_template is None


def test_malformed_tables_raise_kernel_image_error() -> None:
    s, _ = build_synthetic()
    # A table that is not a whole number of entries.
    s.syms = [x for x in s.syms if "jump_table" not in x[2]]
    s.table("__start___jump_table", "__stop___jump_table", b"\0" * 20)
    img, ks = s.image()
    with pytest.raises(KernelImageError):
        extract_patch_sites(img, ks)
    # A table whose bounds leave the file.
    s, _ = build_synthetic()
    s.syms += [(RO + 0x100, "D", "__start_mcount_loc"), (RO + 0x100000, "D", "__stop_mcount_loc")]
    s.syms = [x for x in s.syms if x[2] not in ("__start_mcount_loc", "__stop_mcount_loc")
              or x[0] in (RO + 0x100, RO + 0x100000)]
    img, ks = s.image()
    with pytest.raises(KernelImageError):
        extract_patch_sites(img, ks)


def test_corrupt_blob() -> None:
    s, _ = build_synthetic()
    blob = bytearray(patch_sites_to_bytes(extract_patch_sites(*s.image())))
    with pytest.raises(KernelImageError):
        patch_sites_from_bytes(b"KSCNPS01" + b"\0" * 10)
    blob[-3] ^= 0x55
    with pytest.raises(KernelImageError):
        patch_sites_from_bytes(bytes(blob))


# --------------------------------------------------------------------------- real images


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_real_image_sites(which: str) -> None:
    img = real_image(which)
    ks = recover_kallsyms(img)
    rep: dict[str, dict[str, object]] = {}
    ps = extract_patch_sites(img, ks, report=rep)
    text = img.sections[".text"]
    tb = img.section_bytes(".text")

    def at(addr: int, n: int) -> bytes:
        return tb[addr - text.addr:addr - text.addr + n]

    # ftrace: every site is a function's first instruction (after ENDBR on IBT kernels),
    # a 5-byte NOP or a call in the file.
    assert ps.ftrace.size > 30_000
    assert rep["ftrace"]["rejected"] == 0
    fs = ps.function_starts
    i = np.searchsorted(fs, ps.ftrace, side="right") - 1
    starts = fs[i]
    delta = (ps.ftrace - starts).astype(np.int64)
    endbr = np.array([at(int(f), 4) == ENDBR for f in starts.tolist()])
    at_start = (delta == 0) | ((delta == 4) & endbr)
    unexplained = ps.ftrace[~at_start]
    for a in ps.ftrace.tolist()[::97]:
        assert at(a, 5) == NOP5 or at(a, 1) == b"\xe8"
    # Sites with no kallsyms symbol (Debian 6.1: ~1.6 %) must still be at a function's
    # start by code layout: the bytes before are padding (int3 / NOP) or a ret/jmp.
    assert unexplained.size <= 0.02 * ps.ftrace.size
    for a in unexplained.tolist():
        assert at(a - 1, 1) in (b"\xcc", b"\x90", b"\x00", b"\xc3") \
            or at(a - 3, 3) == b"\x0f\x1f\x00" \
            or at(a - 5, 1) in (b"\xe9", b"\xe8") or at(a - 2, 1) == b"\xeb", hex(a)
    # jump labels: in .text, a 2- or 5-byte NOP or a jmp.
    assert ps.jump_code.size > 5000
    for a in ps.jump_code.tolist():
        assert text.addr <= a < text.end
        b = at(a, 5)
        assert b == NOP5 or b[:2] == b"\x66\x90" or b[0] in (0xEB, 0xE9), (hex(a), b.hex())
    assert ps.jump_code.size == ps.jump_target.size == ps.jump_key.size
    # Keys are static_key structs (8-aligned) in the image's data.
    assert bool(np.all(ps.jump_key % np.uint64(8) == 0))
    # static calls: call/jmp/NOP at the site; every trampoline named __SCT__.
    assert ps.static_call_addr.size > 3000
    for a in ps.static_call_addr.tolist()[::13]:
        assert at(a, 1) in (b"\xe8", b"\xe9") or at(a, 5) == NOP5
    for tramp in list(ps.static_call_trampolines)[:50]:
        assert ks.symbolize(tramp).startswith("__SCT__")
    assert ps.smp_locks.size > 5000
    assert all(at(a, 1) == b"\xf0" for a in ps.smp_locks.tolist()[::7])
    assert {"ftrace_caller", "ftrace_regs_caller", "return_to_handler"} <= set(
        ps.ftrace_trampolines)
    assert ps.optprobe_template is not None
    entry = ks.lookup("__entry_text_start") or 0
    assert any(lo <= entry < hi for lo, hi in ps.kprobe_blacklist)
    assert rep["kprobe"]["symbols"] > 100
    assert all(a < b for a, b in ps.kprobe_blacklist)
    kb = ps.kprobe_blacklist
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(kb))
    if which == "6.12":
        names = {c.name for c in ps.runtime_const}
        assert {"d_hash_shift", "dentry_hashtable"} <= names
        for c in ps.runtime_const:
            if c.size == 8:
                assert at(c.addr, 8) == (0x0123456789ABCDEF).to_bytes(8, "little")
            else:
                assert at(c.addr, 1) == b"\x0c"
    else:
        assert ps.runtime_const == ()
    back = patch_sites_from_bytes(patch_sites_to_bytes(ps))
    _assert_same(back, ps)
    print(f"\n{which}: ftrace {ps.ftrace.size} (no symbol: {unexplained.size}), jump_label "
          f"{ps.jump_code.size}, static_call {ps.static_call_addr.size} "
          f"(trampolines {len(ps.static_call_trampolines)}), smp_locks {ps.smp_locks.size}, "
          f"runtime_const {len(ps.runtime_const)}, kprobe ranges {len(ps.kprobe_blacklist)}, "
          f"ftrace trampolines {len(ps.ftrace_trampolines)}, functions {ps.function_starts.size}, "
          f"blob {len(patch_sites_to_bytes(ps))} B")

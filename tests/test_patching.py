# ruff: noqa: E702
"""Verifiers of the kernel's own .text patching (scanner.check.patching), on a synthetic
.text assembled here byte by byte (x86-64 encodings; capstone decodes it)."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner.check.patching import (
    CLAC,
    NOP2,
    NOP3,
    NOP5,
    RETINSN,
    XOR5RAX,
    Limits,
    PatchVerdict,
    verify_text_changes,
)
from scanner.image.patchsites import PatchSites, RuntimeConst

BASE = 0xFFFFFFFF81000000
SLIDE = 0x1E000000
SIZE = 0x4000
TRAMP_VA = 0xFFFFFFFFC0001000      # run-time VAs outside .text (module area)
SLOT_VA = 0xFFFFFFFFC0005000
OPS = 0xFFFF888012345678
KEY1 = 0xFFFFFFFF82800000
KEY2 = 0xFFFFFFFF82800040
KEY3 = 0xFFFFFFFF82800080
OP_BASE = 0xFFFF888055550000        # struct optimized_kprobe of each probed label


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


@dataclass
class Asm:
    buf: bytearray = field(default_factory=lambda: bytearray(b"\xcc" * SIZE))
    pos: int = 0
    sym: dict[str, int] = field(default_factory=dict)
    funcs: list[int] = field(default_factory=list)

    def func(self, name: str) -> None:
        self.pos = (self.pos + 15) & ~15
        self.label(name)
        self.funcs.append(self.here())

    def label(self, name: str) -> None:
        self.sym[name] = self.here()

    def here(self) -> int:
        return BASE + self.pos

    def emit(self, hexstr: str | bytes) -> None:
        b = bytes.fromhex(hexstr) if isinstance(hexstr, str) else hexstr
        self.buf[self.pos:self.pos + len(b)] = b
        self.pos += len(b)

    def branch(self, opcode: str, target: str | int) -> None:
        """`opcode rel32` (opcode may be 2 bytes, e.g. 0f85)."""
        op = bytes.fromhex(opcode)
        t = self.sym[target] if isinstance(target, str) else target
        self.emit(op + i32(t - (self.here() + len(op) + 4)))


def build() -> tuple[bytes, dict[str, int], PatchSites]:
    a = Asm()
    a.func("ftrace_stub"); a.emit("c3")
    a.func("ftrace_ops_list_func"); a.emit("55 5d c3")
    a.func("callback_a"); a.emit("55 5d c3")
    a.func("optimized_callback"); a.emit("c3")
    a.func("__static_call_return0"); a.emit("31 c0 c3")
    a.func("x86_return_thunk"); a.emit("c3 cc")
    a.func("ftrace_caller")
    a.emit("55 48 89 e5")
    a.label("ftrace_caller_op_ptr"); a.branch("488b15", BASE + 0x3FF0)
    a.label("ftrace_call"); a.branch("e8", "ftrace_stub")
    a.emit("5d")
    a.label("ftrace_caller_end"); a.emit("c3")
    a.func("ftrace_regs_caller")
    a.emit("9c 55")
    a.label("ftrace_regs_caller_op_ptr"); a.branch("488b15", BASE + 0x3FF0)
    a.label("ftrace_regs_call"); a.branch("e8", "ftrace_stub")
    a.emit("48 85 c0")
    a.label("ftrace_regs_caller_jmp"); a.emit("75 03")
    a.emit("5d 9d")
    a.label("ftrace_regs_caller_end"); a.emit("c3")
    a.emit("5d 9d c3")
    a.func("target_fn"); a.emit("31 c0 c3")
    a.func("other_fn"); a.emit("31 c0 c3")
    a.func("__SCT__k1"); a.branch("e9", "target_fn"); a.emit("0f b9 cc")
    a.func("__SCT__k2"); a.branch("e9", "other_fn"); a.emit("0f b9 cc")
    a.func("traced_a")
    a.label("ftrace_a"); a.emit(NOP5)
    a.emit("55")
    a.label("mov_a"); a.emit("b8 78 56 34 12")
    a.label("jl5"); a.emit(NOP5)
    a.label("sc_call"); a.branch("e8", "target_fn")
    a.label("lock_a"); a.emit("f0 ff 00")
    a.emit("5d")
    a.label("jl5_target"); a.emit("c3")
    a.func("traced_b")
    a.label("ftrace_b"); a.emit(NOP5)
    a.label("jl2"); a.emit(NOP2)
    a.emit("31 c0")
    a.label("jl2_target")
    a.label("sc_tail"); a.branch("e9", "target_fn")
    a.func("sc_jcc_fn")
    a.emit("48 85 c0")
    a.label("sc_jcc"); a.branch("0f85", "target_fn")
    a.emit("c3")
    a.func("rc_fn")
    a.label("rc_ptr"); a.emit("48 b8 ef cd ab 89 67 45 23 01")
    a.label("rc_shift"); a.emit("c1 e8 0c")
    a.emit("c3")
    a.func("blk_fn"); a.emit("55 48 89 e5 5d c3")
    a.label("blk_end")
    a.func("probe_fn")
    a.label("probe_a"); a.branch("488b05", BASE + 0x3FF8)   # mov rax, [rip+X]
    a.label("probe_b"); a.emit("48 89 c2")
    a.label("probe_c"); a.emit("48 01 d0")
    a.emit("c3")
    a.func("jmpin_fn")
    a.label("jmpin_a"); a.emit("b8 01 00 00 00")
    a.emit("90")
    a.emit("eb f9")           # jmp back to jmpin_a+1 (inside the 4 bytes after it)
    a.emit("c3")
    a.func("relbr_fn")
    a.label("relbr_a"); a.branch("e8", "target_fn")
    a.emit("c3")
    a.func("optprobe_template_entry")
    a.emit("6a 18 54 9c"); a.emit(NOP3); a.emit("50 48 89 e6")
    a.emit(NOP5 * 3)
    a.emit("58 9d")
    a.label("optprobe_template_end")
    a.func("last_fn"); a.emit("c3")
    s = a.sym
    names = ("ftrace_caller", "ftrace_caller_end", "ftrace_caller_op_ptr", "ftrace_call",
             "ftrace_regs_caller", "ftrace_regs_caller_end", "ftrace_regs_caller_op_ptr",
             "ftrace_regs_call", "ftrace_regs_caller_jmp", "ftrace_stub")
    u64 = lambda xs: np.array(xs, dtype=np.uint64)  # noqa: E731
    sites = PatchSites(
        ftrace=u64([s["ftrace_a"], s["ftrace_b"]]),
        jump_code=u64([s["jl5"], s["jl2"]]),
        jump_target=u64([s["jl5_target"], s["jl2_target"]]),
        jump_key=u64([KEY1, KEY1]),
        static_call_addr=u64([s["sc_call"], s["sc_tail"], s["sc_jcc"]]),
        static_call_key=u64([KEY1, KEY3 | 1, KEY2 | 1]),
        static_call_tail=np.array([False, True, True]),
        static_call_trampolines={s["__SCT__k1"]: KEY1, s["__SCT__k2"]: KEY2},
        smp_locks=u64([s["lock_a"]]),
        runtime_const=(RuntimeConst(s["rc_ptr"] + 2, 8, "dentry_hashtable"),
                       RuntimeConst(s["rc_shift"] + 2, 1, "d_hash_shift")),
        kprobe_blacklist=((s["blk_fn"], s["blk_end"]),),
        ftrace_trampolines={n: (s[n], s[n]) for n in names},
        optprobe_template=(s["optprobe_template_entry"], s["optprobe_template_end"]),
        function_starts=u64(sorted(a.funcs)),
        symbols={n: s[n] for n in ("optimized_callback", "__static_call_return0")},
    )
    return bytes(a.buf), s, sites


TEXT, SYM, SITES = build()


class Mem:
    """Guest memory outside .text, at run-time VAs."""

    def __init__(self) -> None:
        self.regions: dict[int, bytes] = {}
        for label in PROBED:     # each probe's struct optimized_kprobe: kp.addr
            self.add(op_of(label) + 40, (SYM[label] + SLIDE).to_bytes(8, "little"))

    def add(self, va: int, data: bytes) -> None:
        self.regions[va] = bytes(data)

    def read(self, va: int, size: int) -> bytes | None:
        for start, data in self.regions.items():
            if start <= va and va + size <= start + len(data):
                return data[va - start:va - start + size]
        return None


PROBED = ("probe_a", "jmpin_a", "relbr_a")


def op_of(label: str) -> int:
    return OP_BASE + PROBED.index(label) * 0x100


def off(name: str) -> int:
    return SYM[name] - BASE


def patch(live: bytearray, at: int, data: bytes | str) -> None:
    b = bytes.fromhex(data) if isinstance(data, str) else data
    live[at - BASE:at - BASE + len(b)] = b


def rel_insn(opcode: bytes, at: int, target: int, runtime: bool = False) -> bytes:
    """`opcode rel32` at link VA `at` to `target` (a run-time VA when runtime=True)."""
    src = at + (SLIDE if runtime else 0) + len(opcode) + 4
    return opcode + i32(target - src)


def check(live: bytes | bytearray, mem: Mem | None = None, sites: PatchSites = SITES,
          **kw: object) -> PatchVerdict:
    return verify_text_changes(TEXT, bytes(live), BASE, SLIDE, sites,
                               mem.read if mem else None, **kw)  # type: ignore[arg-type]


def only(v: PatchVerdict, mech: str, n: int = 1) -> None:
    assert v.unverified == [], v.unverified
    assert [p.mechanism for p in v.verified] == [mech] * n, v.verified


def bad(v: PatchVerdict, start: int, end: int) -> str:
    assert [(u.start, u.end) for u in v.unverified] == [(start, end)], v.unverified
    return v.unverified[0].reason


# -- ftrace --------------------------------------------------------------------------

@pytest.mark.parametrize("caller", ["ftrace_caller", "ftrace_regs_caller"])
def test_ftrace_call_to_caller_and_back(caller: str) -> None:
    live = bytearray(TEXT)
    patch(live, SYM["ftrace_a"], rel_insn(b"\xe8", SYM["ftrace_a"], SYM[caller]))
    v = check(live)
    only(v, "ftrace")
    assert v.verified[0].form == f"call {caller}" and v.verified[0].target == SYM[caller]
    assert v.verified[0].before == NOP5
    # and the reverse: baseline has the call, live the NOP
    v2 = verify_text_changes(bytes(live), TEXT, BASE, SLIDE, SITES, None)
    only(v2, "ftrace")
    assert v2.verified[0].form == "nop"


def make_tramp(live: bytes, regs: bool, ret_size: int, rethunk: bool = False,
               func: str = "callback_a", va: int = TRAMP_VA) -> bytearray:
    """What create_trampoline() builds (arch/x86/kernel/ftrace.c)."""
    p = "ftrace_regs_caller" if regs else "ftrace_caller"
    start, end = SYM[p], SYM[p + "_end"]
    size = end - start
    buf = bytearray(live[start - BASE:end - BASE])
    if rethunk:
        assert ret_size == 5
        buf += rel_insn(b"\xe9", va + size - SLIDE, SYM["x86_return_thunk"])
    else:
        buf += (b"\xc3\xcc" + b"\x00\x00\x00")[:ret_size]
    if regs:
        j = SYM["ftrace_regs_caller_jmp"] - start
        buf[j:j + 2] = NOP2
    buf += OPS.to_bytes(8, "little")
    op = SYM[p + "_op_ptr"] - start
    buf[op + 3:op + 7] = i32(size + ret_size - (op + 7))
    c = SYM["ftrace_regs_call" if regs else "ftrace_call"] - start
    buf[c:c + 5] = b"\xe8" + i32(SYM[func] + SLIDE - (va + c + 5))
    return buf


@pytest.mark.parametrize(("regs", "ret_size", "rethunk"),
                         [(False, 1, False), (False, 2, False), (False, 5, False),
                          (True, 5, True), (True, 2, False)])
def test_ftrace_call_to_allocated_trampoline(regs: bool, ret_size: int, rethunk: bool) -> None:
    live = bytearray(TEXT)
    mem = Mem()
    mem.add(TRAMP_VA, make_tramp(TEXT, regs, ret_size, rethunk))
    for site in ("ftrace_a", "ftrace_b"):
        patch(live, SYM[site], rel_insn(b"\xe8", SYM[site], TRAMP_VA, runtime=True))
    v = check(live, mem)
    only(v, "ftrace", 2)
    assert {p.form for p in v.verified} == {"call allocated trampoline"}
    assert {p.target for p in v.verified} == {TRAMP_VA}


def test_ftrace_trampoline_with_one_unexpected_byte() -> None:
    site = SYM["ftrace_a"]
    for k in (0, 2, 16):       # push rbp, mov, pop rbp
        tr = make_tramp(TEXT, False, 2)
        tr[k] ^= 0x40
        mem = Mem()
        mem.add(TRAMP_VA, tr)
        live = bytearray(TEXT)
        patch(live, site, rel_insn(b"\xe8", site, TRAMP_VA, runtime=True))
        v = check(live, mem)
        assert v.verified == [] and v.unverified
        assert all(site <= u.start < u.end <= site + 5 for u in v.unverified)
        assert "trampoline differs" in v.unverified[0].reason
    # the ops pointer must be a kernel address; the jnz must be NOPed (regs variant)
    tr = make_tramp(TEXT, False, 2)
    tr[-8:] = (0x1234).to_bytes(8, "little")
    mem = Mem()
    mem.add(TRAMP_VA, tr)
    live = bytearray(TEXT)
    patch(live, site, rel_insn(b"\xe8", site, TRAMP_VA, runtime=True))
    assert not check(live, mem).clean
    tr = make_tramp(TEXT, True, 2)
    j = SYM["ftrace_regs_caller_jmp"] - SYM["ftrace_regs_caller"]
    tr[j:j + 2] = b"\x75\x03"
    mem.add(TRAMP_VA, tr)
    assert not check(live, mem).clean
    # the call inside must go to a function start in .text
    tr = make_tramp(TEXT, False, 2, func="callback_a")
    c = SYM["ftrace_call"] - SYM["ftrace_caller"]
    tr[c + 1:c + 5] = i32(SYM["callback_a"] + 1 + SLIDE - (TRAMP_VA + c + 5))
    mem.add(TRAMP_VA, tr)
    assert not check(live, mem).clean


def test_ftrace_call_to_non_trampoline() -> None:
    site = SYM["ftrace_a"]
    live = bytearray(TEXT)
    patch(live, site, rel_insn(b"\xe8", site, SYM["other_fn"]))   # a function in .text
    assert "ftrace site" in bad(check(live), site, site + 5)
    mem = Mem()
    mem.add(TRAMP_VA, bytes.fromhex("55 48 89 e5 e8 00 00 00 00 5d c3") + bytes(64))
    live = bytearray(TEXT)
    patch(live, site, rel_insn(b"\xe8", site, TRAMP_VA, runtime=True))
    bad(check(live, mem), site, site + 5)
    bad(check(live, None), site, site + 5)                      # no reader
    short = Mem()
    short.add(TRAMP_VA, make_tramp(TEXT, False, 2)[:10])
    bad(check(live, short), site, site + 5)                     # short read
    raising = Mem()
    raising.read = lambda va, size: (_ for _ in ()).throw(OSError("boom"))  # type: ignore
    bad(check(live, raising), site, site + 5)
    live = bytearray(TEXT)
    patch(live, site, "e9" + i32(0x100).hex())                   # jmp, not call
    bad(check(live), site, site + 5)
    live = bytearray(TEXT)
    patch(live, site, b"\xe8" + i32(0x7FFFFFFF))                # garbage target
    bad(check(live, Mem()), site, site + 5)


def test_ftrace_call_label_and_in_progress() -> None:
    live = bytearray(TEXT)
    at = SYM["ftrace_call"]
    patch(live, at, rel_insn(b"\xe8", at, SYM["ftrace_ops_list_func"]))
    only(check(live), "ftrace")
    patch(live, at, rel_insn(b"\xe8", at, SYM["ftrace_ops_list_func"] + 1))
    assert "function start" in bad(check(live), at, at + 5)
    # text_poke_bp half-way: int3 + baseline tail, int3 + new tail
    live = bytearray(TEXT)
    patch(live, SYM["ftrace_a"], "cc")
    v = check(live)
    only(v, "ftrace")
    assert v.verified[0].in_progress
    live = bytearray(TEXT)
    call = rel_insn(b"\xe8", SYM["ftrace_a"], SYM["ftrace_caller"])
    patch(live, SYM["ftrace_a"], b"\xcc" + call[1:])
    v = check(live)
    only(v, "ftrace")
    assert v.verified[0].in_progress and v.verified[0].form == "call ftrace_caller"
    live = bytearray(TEXT)
    patch(live, SYM["ftrace_a"], "cc 00 00 00 00")       # int3 + neither tail
    assert not check(live).clean


# -- jump labels -----------------------------------------------------------------------

def test_jump_label_forms() -> None:
    live = bytearray(TEXT)
    patch(live, SYM["jl5"], rel_insn(b"\xe9", SYM["jl5"], SYM["jl5_target"]))
    rel8 = SYM["jl2_target"] - (SYM["jl2"] + 2)
    patch(live, SYM["jl2"], bytes([0xEB, rel8]))
    v = check(live)
    only(v, "jump_label", 2)
    assert v.summary()["jump_label"].count == 2
    assert {p.target for p in v.verified} == {SYM["jl5_target"], SYM["jl2_target"]}
    back = verify_text_changes(bytes(live), TEXT, BASE, SLIDE, SITES, None)
    only(back, "jump_label", 2)


def test_jump_label_wrong_target_or_size() -> None:
    live = bytearray(TEXT)
    patch(live, SYM["jl5"], rel_insn(b"\xe9", SYM["jl5"], SYM["jl5_target"] - 1))
    assert "jump label" in bad(check(live), SYM["jl5"], SYM["jl5"] + 5)
    live = bytearray(TEXT)
    patch(live, SYM["jl2"], bytes([0xEB, 0x10]))
    bad(check(live), SYM["jl2"], SYM["jl2"] + 2)
    live = bytearray(TEXT)          # a 5-byte jmp at a 2-byte site
    patch(live, SYM["jl2"], rel_insn(b"\xe9", SYM["jl2"], SYM["jl2_target"]))
    assert not check(live).clean
    live = bytearray(TEXT)          # in progress
    patch(live, SYM["jl5"], b"\xcc" + rel_insn(b"\xe9", SYM["jl5"], SYM["jl5_target"])[1:])
    v = check(live)
    only(v, "jump_label")
    assert v.verified[0].in_progress


# -- static calls -------------------------------------------------------------------------

def test_static_call_site_forms() -> None:
    at, tr = SYM["sc_call"], SYM["__SCT__k1"]
    # (site, its trampoline): __static_call_update() writes both, to one function
    for code, tcode in ((rel_insn(b"\xe8", at, SYM["other_fn"]),
                         rel_insn(b"\xe9", tr, SYM["other_fn"])),
                        (NOP5, RETINSN),
                        (XOR5RAX, rel_insn(b"\xe9", tr, SYM["__static_call_return0"]))):
        live = bytearray(TEXT)
        patch(live, at, code)
        patch(live, tr, tcode)
        only(check(live), "static_call", 2)
    live = bytearray(TEXT)                              # the site calls its trampoline
    patch(live, at, rel_insn(b"\xe8", at, SYM["__SCT__k1"]))
    only(check(live), "static_call")
    at = SYM["sc_tail"]
    for code in (rel_insn(b"\xe9", at, SYM["other_fn"]), RETINSN,
                 rel_insn(b"\xe9", at, SYM["x86_return_thunk"])):
        live = bytearray(TEXT)
        patch(live, at, code)
        only(check(live), "static_call")
    at = SYM["sc_jcc"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\x0f\x85", at, SYM["other_fn"]))
    only(check(live), "static_call")


def test_static_call_rejects() -> None:
    at = SYM["sc_call"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe8", at, SYM["__SCT__k2"]))   # another key's trampoline
    bad(check(live), at, at + 5)
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe8", at, SYM["other_fn"] + 2))  # not a function start
    bad(check(live), at, at + 5)
    live = bytearray(TEXT)
    patch(live, at, RETINSN)                                    # ret at a non-tail site
    assert not check(live).clean
    live = bytearray(TEXT)
    patch(live, SYM["sc_tail"], NOP5)                           # NOP at a tail site
    assert not check(live).clean
    at = SYM["sc_jcc"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\x0f\x84", at, SYM["other_fn"]))  # condition changed
    assert not check(live).clean


def test_static_call_trampoline() -> None:
    at = SYM["__SCT__k1"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe9", at, SYM["other_fn"]))
    patch(live, SYM["sc_call"], rel_insn(b"\xe8", SYM["sc_call"], SYM["other_fn"]))
    only(check(live), "static_call", 2)
    live = bytearray(TEXT)
    patch(live, at, RETINSN)
    patch(live, SYM["sc_call"], NOP5)
    only(check(live), "static_call", 2)
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe9", at, SYM["other_fn"] + 1))
    assert not check(live).clean
    live = bytearray(TEXT)
    patch(live, at + 5, "90")                                   # the ud1 signature
    assert not check(live).clean


# -- smp locks, runtime constants ------------------------------------------------------------

def test_smp_lock_and_runtime_const() -> None:
    live = bytearray(TEXT)
    patch(live, SYM["lock_a"], "3e")
    patch(live, SYM["rc_ptr"] + 2, (0xFFFF888000123000).to_bytes(8, "little"))
    patch(live, SYM["rc_shift"] + 2, "0e")
    v = check(live)
    assert v.clean and v.summary()["runtime_const"].count == 2
    assert v.summary()["smp_lock"].count == 1
    live = bytearray(TEXT)
    patch(live, SYM["lock_a"], "90")
    bad(check(live), SYM["lock_a"], SYM["lock_a"] + 1)
    live = bytearray(TEXT)                                      # the opcode, not the imm
    patch(live, SYM["rc_ptr"] + 1, "b9")
    bad(check(live), SYM["rc_ptr"] + 1, SYM["rc_ptr"] + 2)


def test_extra_byte_next_to_verified_site() -> None:
    live = bytearray(TEXT)
    patch(live, SYM["ftrace_a"], rel_insn(b"\xe8", SYM["ftrace_a"], SYM["ftrace_caller"]))
    patch(live, SYM["ftrace_a"] + 5, "c3")                      # the push rbp after it
    v = check(live)
    assert [p.mechanism for p in v.verified] == ["ftrace"]
    bad(v, SYM["ftrace_a"] + 5, SYM["ftrace_a"] + 6)
    live = bytearray(TEXT)
    patch(live, SYM["lock_a"], "3e 90")
    v = check(live)
    assert [p.mechanism for p in v.verified] == ["smp_lock"]
    bad(v, SYM["lock_a"] + 1, SYM["lock_a"] + 2)


# -- kprobes, optprobes --------------------------------------------------------------------

def test_kprobe_int3() -> None:
    for name in ("mov_a", "probe_b", "probe_c", "lock_a"):
        live = bytearray(TEXT)
        patch(live, SYM[name], "cc")
        only(check(live), "kprobe")
    live = bytearray(TEXT)
    patch(live, SYM["mov_a"] + 1, "cc")                         # mid-instruction
    assert "boundary" in bad(check(live), SYM["mov_a"] + 1, SYM["mov_a"] + 2)
    live = bytearray(TEXT)
    patch(live, SYM["blk_fn"] + 1, "cc")                        # blacklisted function
    assert "blacklist" in bad(check(live), SYM["blk_fn"] + 1, SYM["blk_fn"] + 2)
    live = bytearray(TEXT)
    patch(live, SYM["probe_b"], "cc")
    patch(live, SYM["mov_a"] + 2, "cc")
    v = check(live)
    assert [p.mechanism for p in v.verified] == ["kprobe"]
    bad(v, SYM["mov_a"] + 2, SYM["mov_a"] + 3)
    sites = replace(SITES, function_starts=np.zeros(0, dtype=np.uint64))
    live = bytearray(TEXT)
    patch(live, SYM["probe_b"], "cc")
    assert not check(live, sites=sites).clean


def make_slot(at: str = "probe_a", after: str = "probe_b", va: int = SLOT_VA) -> bytearray:
    """What arch_prepare_optimized_kprobe() builds (arch/x86/kernel/kprobes/opt.c)."""
    tmpl = TEXT[off("optprobe_template_entry"):off("optprobe_template_end")]
    slot = bytearray(tmpl)
    clac, val = tmpl.find(NOP3), tmpl.find(NOP5 * 3)
    slot[clac:clac + 3] = CLAC
    slot[val:val + 10] = b"\x48\xbf" + op_of(at).to_bytes(8, "little")
    c = val + 10
    slot[c:c + 5] = b"\xe8" + i32(SYM["optimized_callback"] + SLIDE - (va + c + 5))
    src = bytearray(TEXT[off(at):off(after)])
    if src[:3] == bytes.fromhex("488b05"):        # rip-relative: re-base the disp32
        d = struct.unpack("<i", src[3:7])[0]
        src[3:7] = i32(d + (SYM[at] + SLIDE) - (va + len(tmpl)))
    slot += src
    back_src = va + len(slot) + 5
    slot += b"\xe9" + i32(SYM[after] + SLIDE - back_src)
    return slot


def test_optprobe() -> None:
    mem = Mem()
    mem.add(SLOT_VA, make_slot())
    at = SYM["probe_a"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe9", at, SLOT_VA, runtime=True))
    v = check(live, mem)
    only(v, "optprobe")
    assert v.verified[0].target == SLOT_VA
    # in progress: int3 + the jmp's tail
    live2 = bytearray(live)
    patch(live2, at, "cc")
    v = check(live2, mem)
    only(v, "optprobe")
    assert v.verified[0].in_progress


def test_optprobe_rejects() -> None:
    at = SYM["probe_a"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe9", at, SLOT_VA, runtime=True))
    assert "unreadable" in bad(check(live, Mem()), at, at + 5)
    for k in (0, 5, 20, -3):
        slot = make_slot()
        slot[k] ^= 1
        mem = Mem()
        mem.add(SLOT_VA, slot)
        bad(check(live, mem), at, at + 5)
    slot = make_slot()                  # copied insn not re-based
    tl = off("optprobe_template_end") - off("optprobe_template_entry")
    slot[tl:tl + 7] = TEXT[off("probe_a"):off("probe_a") + 7]
    mem = Mem()
    mem.add(SLOT_VA, slot)
    bad(check(live, mem), at, at + 5)
    live = bytearray(TEXT)              # jmp into .text: an inline hook
    patch(live, at, rel_insn(b"\xe9", at, SYM["other_fn"]))
    assert "inline hook" in bad(check(live), at, at + 5)
    live = bytearray(TEXT)              # not at an instruction boundary
    patch(live, SYM["mov_a"] + 1, rel_insn(b"\xe9", SYM["mov_a"] + 1, SLOT_VA, runtime=True))
    assert not check(live, mem).clean
    live = bytearray(TEXT)              # a jump in the function lands inside the jmp
    at = SYM["jmpin_a"]
    mem = Mem()
    mem.add(SLOT_VA, make_slot("jmpin_a", "jmpin_a"))
    patch(live, at, rel_insn(b"\xe9", at, SLOT_VA, runtime=True))
    assert "lands inside" in bad(check(live, mem), at, at + 5)
    live = bytearray(TEXT)              # a relative call is never copied
    at = SYM["relbr_a"]
    mem = Mem()
    slot = make_slot("relbr_a", "relbr_a")
    slot[-5:-5] = TEXT[off("relbr_a"):off("relbr_a") + 5]
    slot[-4:] = i32(SYM["relbr_a"] + 5 + SLIDE - (SLOT_VA + len(slot)))
    mem.add(SLOT_VA, slot)
    patch(live, at, rel_insn(b"\xe9", at, SLOT_VA, runtime=True))
    assert "relative branch" in bad(check(live, mem), at, at + 5)


# -- robustness ----------------------------------------------------------------------------

def test_no_change_and_length_mismatch() -> None:
    v = check(TEXT)
    assert v.clean and v.verified == [] and v.changed_bytes == 0 and v.summary() == {}
    with pytest.raises(ValueError):
        verify_text_changes(TEXT, TEXT[:-1], BASE, SLIDE, SITES, None)


def test_summary_groups() -> None:
    live = bytearray(TEXT)
    patch(live, SYM["ftrace_a"], rel_insn(b"\xe8", SYM["ftrace_a"], SYM["ftrace_caller"]))
    patch(live, SYM["ftrace_b"], rel_insn(b"\xe8", SYM["ftrace_b"], SYM["ftrace_regs_caller"]))
    patch(live, SYM["probe_b"], "cc")
    s = check(live).summary()
    assert list(s) == ["ftrace", "kprobe"]
    assert s["ftrace"].sites == (SYM["ftrace_a"], SYM["ftrace_b"]) and s["ftrace"].count == 2


def test_hostile_amounts_are_bounded() -> None:
    for fill in (0xCC, 0xE9, 0x00):
        live = bytes([fill]) * SIZE
        t0 = time.perf_counter()
        v = check(live, Mem(), limits=Limits(max_candidates=64, max_ranges=10))
        assert time.perf_counter() - t0 < 5
        assert not v.clean and len(v.unverified) <= 10
    rng = np.random.default_rng(1)
    live = bytearray(TEXT)
    pos = rng.choice(SIZE, 3000, replace=False)
    arr = np.frombuffer(live, np.uint8).copy()
    arr[pos] = rng.integers(0, 256, pos.size, dtype=np.uint8)
    v = check(arr.tobytes(), Mem())
    covered = sum(p.end - p.start for p in v.verified)
    unver = sum(u.end - u.start for u in v.unverified)
    assert covered + unver >= v.changed_bytes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, SIZE - 1), st.binary(min_size=1, max_size=8)),
                max_size=12))
def test_fuzz_random_changes_never_raise(changes: list[tuple[int, bytes]]) -> None:
    live = bytearray(TEXT)
    for at, data in changes:
        live[at:at + len(data)] = data
    live = live[:SIZE]
    mem = Mem()
    mem.add(TRAMP_VA, make_tramp(TEXT, False, 2))
    mem.add(SLOT_VA, make_slot())
    v = check(live, mem)
    changed = {i for i in range(SIZE) if live[i] != TEXT[i]}
    in_unver = {i for u in v.unverified for i in range(u.start - BASE, u.end - BASE)}
    in_ver = {i for p in v.verified for i in range(p.start - BASE, p.end - BASE)}
    assert changed <= in_unver | in_ver
    assert not (in_unver & in_ver)


def test_trampoline_copy_is_normalized_with_relocs() -> None:
    """A copy read from guest memory carries the slide at relocation sites."""
    from scanner.image.relocs import RegionRelocs

    r32 = np.array([off("ftrace_caller")], dtype=np.int64)      # pretend a 32-bit site
    relocs = RegionRelocs(np.zeros(0, np.int64), r32, np.zeros(0, np.int64))
    tr = make_tramp(TEXT, False, 2)
    v = int.from_bytes(tr[0:4], "little")
    tr[0:4] = ((v + SLIDE) & 0xFFFFFFFF).to_bytes(4, "little")
    mem = Mem()
    mem.add(TRAMP_VA, tr)
    live = bytearray(TEXT)
    patch(live, SYM["ftrace_a"], rel_insn(b"\xe8", SYM["ftrace_a"], TRAMP_VA, runtime=True))
    only(check(live, mem, relocs=relocs), "ftrace")
    assert not check(live, mem).clean


def test_optprobe_template_outside_text() -> None:
    """6.x keeps the template in .rodata: its bytes are passed in."""
    tmpl = TEXT[off("optprobe_template_entry"):off("optprobe_template_end")]
    sites = replace(SITES, optprobe_template=None)
    mem = Mem()
    mem.add(SLOT_VA, make_slot())
    live = bytearray(TEXT)
    patch(live, SYM["probe_a"], rel_insn(b"\xe9", SYM["probe_a"], SLOT_VA, runtime=True))
    only(check(live, mem, sites=sites, optprobe_template=tmpl), "optprobe")
    assert "template unknown" in bad(check(live, mem, sites=sites), SYM["probe_a"],
                                     SYM["probe_a"] + 5)

"""scanner.check.classify: byte ranges of a changed page (merging, splitting, caps) and the kind
of each change site. Pages are built by hand around a filler that matches no pattern."""

from __future__ import annotations

import pytest

from scanner.check.classify import (
    MAX_RANGES,
    MAX_SHOWN,
    MERGE_GAP,
    ByteRange,
    classify_range,
    diff_ranges,
)

FILL = 0x41  # `inc ecx`-ish filler: not a NOP, call, jmp or int3
PAGE = 4096


def page(fill: int = FILL) -> bytearray:
    return bytearray([fill]) * PAGE


def changed(before: bytes | bytearray, at: int, new: bytes) -> bytearray:
    after = bytearray(before)
    after[at:at + len(new)] = new
    return after


def put(buf: bytearray, at: int, data: bytes) -> bytearray:
    buf[at:at + len(data)] = data
    return buf


def one_range(before: bytes | bytearray, after: bytes | bytearray, region: str = ".text"
              ) -> ByteRange:
    rs = diff_ranges(bytes(before), bytes(after), region)
    assert len(rs) == 1, rs
    return rs[0]


# -- diff_ranges -------------------------------------------------------------------------

def test_no_change_no_ranges() -> None:
    assert diff_ranges(bytes(page()), bytes(page()), ".text") == []


def test_merge_gap_boundaries() -> None:
    assert MERGE_GAP == 4
    b = bytes(page())
    # changes at 100 and 104: index gap 4 → one range [100, 105)
    a = bytearray(b)
    a[100] ^= 0xFF
    a[104] ^= 0xFF
    r = one_range(b, a)
    assert (r.start, r.end) == (100, 105)
    assert r.before == b[100:105].hex() and r.after == bytes(a[100:105]).hex()
    # changes at 100 and 105: gap 5 → two ranges
    a = bytearray(b)
    a[100] ^= 0xFF
    a[105] ^= 0xFF
    rs = diff_ranges(b, bytes(a), ".rodata")
    assert [(r.start, r.end) for r in rs] == [(100, 101), (105, 106)]


def test_ranges_chain_and_split() -> None:
    b = bytes(page())
    a = bytearray(b)
    for i in (0, 3, 7, 11, 30, 31, 4000, 4095):  # 0..11 chain (gaps ≤ 4); 30-31; 4000; 4095
        a[i] ^= 0x5A
    rs = diff_ranges(b, bytes(a), ".rodata")
    assert [(r.start, r.end) for r in rs] == [(0, 12), (30, 32), (4000, 4001), (4095, 4096)]
    assert all(r.kind == "read-only data changed" for r in rs)


def test_ranges_capped_and_bytes_shown_capped() -> None:
    b = bytes(page())
    a = bytearray(b)
    for i in range(0, PAGE, 10):  # 410 separate changes
        a[i] = 0x00
    rs = diff_ranges(b, bytes(a), ".rodata")
    assert len(rs) == MAX_RANGES == 64
    assert [r.start for r in rs] == list(range(0, 640, 10))
    # one long range: shown bytes are capped, end is not
    a = bytearray(b)
    a[200:300] = bytes(range(100))
    r = one_range(b, a, ".rodata")
    assert (r.start, r.end) == (200, 300)
    assert len(bytes.fromhex(r.before)) == MAX_SHOWN == 32
    assert r.after == bytes(range(32)).hex()
    assert r.to_json() == {"start": 200, "end": 300, "before": r.before, "after": r.after,
                           "kind": "read-only data changed", "code": "rodata_changed"}


def test_different_lengths_compare_common_prefix() -> None:
    b = bytes(page())
    a = bytes(page())[:100] + b"\x00" + bytes(page())[101:2000]
    rs = diff_ranges(b, a, ".rodata")
    assert [(r.start, r.end) for r in rs] == [(100, 101)]
    assert diff_ranges(b"", b"abc", ".text") == []


# -- classify: data regions --------------------------------------------------------------

@pytest.mark.parametrize(("s", "e", "want"), [
    (0, 1, "IDT gate 0 changed (handler/selector/attributes)"),
    (16, 32, "IDT gate 1 changed (handler/selector/attributes)"),
    (31, 33, "IDT gates 1-2 changed (handler/selector/attributes)"),
    (14 * 16 + 6, 14 * 16 + 8, "IDT gate 14 changed (handler/selector/attributes)"),
    (4080, 4096, "IDT gate 255 changed (handler/selector/attributes)"),
    (0, 4096, "IDT gates 0-255 changed (handler/selector/attributes)"),
])
def test_idt_gate_numbers(s: int, e: int, want: str) -> None:
    b = bytes(page())
    a = bytes(page(0))
    assert classify_range(b, a, s, e, "idt") == want


def test_idt_gate_size_parameter_and_diff() -> None:
    b = bytes(page())
    a = bytearray(b)
    a[0x80 * 16 + 4] = 0  # gate 128's selector/attributes area
    a[3 * 16] = 0         # gate 3's handler low bytes
    rs = diff_ranges(b, bytes(a), "idt")
    assert [r.kind for r in rs] == ["IDT gate 3 changed (handler/selector/attributes)",
                                    "IDT gate 128 changed (handler/selector/attributes)"]
    # 32-bit style 8-byte gates
    assert classify_range(b, bytes(a), 16, 17, "idt", gate_size=8).startswith("IDT gate 2 ")


def test_ex_table_and_rodata_labels() -> None:
    b = bytes(page())
    a = changed(b, 40, b"\x00\x00\x00\x00")
    assert one_range(b, a, "__ex_table").kind == \
        "exception table entry changed (fixup redirected?)"
    # .rodata: even bytes that look like code patches are data
    a = changed(b, 40, b"\xcc")
    assert one_range(b, a, ".rodata").kind == "read-only data changed"


# -- classify: code ----------------------------------------------------------------------

NOP5 = bytes.fromhex("0f1f440000")
CALL = bytes.fromhex("e8f0a1b2ff")    # call rel32 (negative: to __fentry__ far below)
JMP = bytes.fromhex("e9f0a1b2ff")
AT = 0x400


def kind(before: bytes | bytearray, after: bytes | bytearray) -> str:
    return one_range(before, after).kind


def test_int3_planted_and_removed() -> None:
    b = page()
    put(b, AT, bytes.fromhex("554889e5"))  # push rbp; mov rbp, rsp
    a = changed(b, AT, b"\xcc")
    assert kind(b, a) == "int3 planted (kprobe or breakpoint)"
    assert kind(a, b) == "int3 removed (kprobe or breakpoint)"
    # int3 on the first byte of an ftrace NOP (a kprobe on a traced function)
    b = put(page(), AT, NOP5)
    assert kind(b, changed(b, AT, b"\xcc")) == "int3 planted (kprobe or breakpoint)"


@pytest.mark.parametrize("nop", ["0f1f440000", "6666906690", "3e8d742600"])
def test_ftrace_nop_to_call_and_back(nop: str) -> None:
    b = put(page(), AT, bytes.fromhex(nop))
    a = changed(b, AT, CALL)
    assert kind(b, a) == "ftrace: NOP → call (function tracing enabled)"
    assert kind(a, b) == "ftrace: call → NOP (function tracing disabled)"


def test_jump_label_nop5_jmp_both_ways() -> None:
    b = put(page(), AT, NOP5)
    a = changed(b, AT, JMP)
    assert kind(b, a) == "jump label / static key toggled (NOP ↔ jmp)"
    assert kind(a, b) == "jump label / static key toggled (NOP ↔ jmp)"
    # a short forward jmp: the rel32's zero high bytes equal the NOP's: 3 bytes change
    a = changed(b, AT, bytes.fromhex("e925000000"))
    r = one_range(b, a)
    assert (r.start, r.end) == (AT, AT + 3)
    assert r.kind == "jump label / static key toggled (NOP ↔ jmp)"


def test_jump_label_nop2_short_jmp_both_ways() -> None:
    for nop in ("6690", "9090"):
        b = put(page(), AT, bytes.fromhex(nop))
        a = changed(b, AT, bytes.fromhex("eb10"))
        assert kind(b, a) == "jump label / static key toggled (NOP ↔ short jmp)"
        assert kind(a, b) == "jump label / static key toggled (NOP ↔ short jmp)"


def test_call_and_jmp_target_change() -> None:
    for insn in (CALL, JMP):
        b = put(page(), AT, insn)
        a = changed(b, AT + 1, bytes.fromhex("11223344"))  # whole rel32
        assert kind(b, a) == "call/jmp target changed (static call, or a hook)"
        a = changed(b, AT + 3, bytes.fromhex("0000"))      # only the high bytes
        r = one_range(b, a)
        assert r.start == AT + 3
        assert r.kind == "call/jmp target changed (static call, or a hook)"


def test_code_overwritten_with_jmp() -> None:
    b = put(page(), AT, bytes.fromhex("554889e54157"))  # push rbp; mov rbp,rsp; push r15
    a = changed(b, AT, JMP)
    assert kind(b, a) == "code overwritten with a jmp (inline hook?)"


@pytest.mark.parametrize(("old", "new"), [
    ("4889e5", "4831c0"),                  # mov rbp,rsp → xor rax,rax
    ("554889e5", "c3909090"),              # ret + padding
    ("0f1f440000", "4831c04831"),          # a NOP overwritten with other code
    ("e8f0a1b2ff", "4831c04831"),          # a call overwritten with other code
])
def test_generic_code_change(old: str, new: str) -> None:
    b = put(page(), AT, bytes.fromhex(old))
    a = changed(b, AT, bytes.fromhex(new))
    assert kind(b, a) == "code bytes changed"


def test_sites_at_page_edges_do_not_crash() -> None:
    b = put(page(), PAGE - 2, bytes.fromhex("6690"))
    a = changed(b, PAGE - 2, bytes.fromhex("eb10"))
    assert kind(b, a) == "jump label / static key toggled (NOP ↔ short jmp)"
    b = put(page(), 0, NOP5)
    assert kind(b, changed(b, 0, CALL)) == "ftrace: NOP → call (function tracing enabled)"
    b = page()
    a = changed(b, PAGE - 1, b"\xe9")  # a jmp opcode with no room for its rel32
    assert kind(b, a) == "code bytes changed"


def test_jump_label_after_e8_byte() -> None:
    b = put(page(), AT - 2, bytes.fromhex("b0e8") + NOP5)  # mov al, 0xe8; nop5
    a = changed(b, AT, bytes.fromhex("e925000000"))
    assert kind(b, a) == "jump label / static key toggled (NOP ↔ jmp)"

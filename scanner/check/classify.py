"""Localize a changed page to byte ranges and say what kind of site changed.

Legitimate runtime patching changes `.text` too: ftrace turns 5-byte NOPs at function
entries into calls, static keys/jump labels flip NOPs and jumps, kprobes plant `int3`,
static calls retarget `call`/`jmp`. A rootkit's inline hook usually looks different
(a `jmp` where code was, bytes rewritten mid-function). Naming the shape of each change
lets an operator tell a tracer from a rootkit; it does not make any change acceptable —
every change is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KIND_CODES", "ByteRange", "classify_range", "diff_ranges", "kind_code"]

NOP5 = bytes.fromhex("0f1f440000")
NOP5_ALT = (NOP5, bytes.fromhex("6666906690"), bytes.fromhex("3e8d742600"))
NOP2 = (bytes.fromhex("6690"), bytes.fromhex("9090"))
#: Report at most this many ranges per page, and this many bytes of each.
MAX_RANGES = 64
MAX_SHOWN = 32
#: Changes closer than this many bytes are reported as one range.
MERGE_GAP = 4


@dataclass(frozen=True)
class ByteRange:
    start: int  # offset within the page
    end: int
    before: str  # hex, at most MAX_SHOWN bytes
    after: str
    kind: str

    @property
    def code(self) -> str:
        """The stable code of `kind` (`kind_code`): what a SIEM rule matches on."""
        return kind_code(self.kind)

    def to_json(self) -> dict[str, object]:
        return {"start": self.start, "end": self.end, "before": self.before,
                "after": self.after, "kind": self.kind, "code": self.code}


#: A changed byte range's `kind` (prose, for people; it may be reworded) → a stable
#: code (for rules), by the prose's beginning, first match wins. Covers the shapes
#: `classify_range` names and the reasons the patch verifiers (`scanner.check.patching`)
#: give for changes they could not verify; anything else is `other`.
KIND_CODES: tuple[tuple[str, str], ...] = (
    ("IDT gate", "idt_gate_changed"),
    ("exception table entry", "ex_table_changed"),
    ("read-only data", "rodata_changed"),
    ("int3 planted", "int3_planted"),
    ("int3 removed", "int3_removed"),
    ("ftrace: NOP → call", "ftrace_enabled"),
    ("ftrace: call → NOP", "ftrace_disabled"),
    ("jump label / static key toggled", "jump_label_toggled"),
    ("call/jmp target changed", "branch_retargeted"),
    ("code overwritten with a jmp", "inline_hook"),
    ("code bytes changed", "code_changed"),
    # Reasons of the patch verifiers: a site of the kernel's own patching mechanisms
    # holding a form or target the mechanism does not produce.
    ("ftrace site calls outside text", "bad_ftrace_trampoline"),
    ("ftrace trampoline", "bad_ftrace_trampoline"),
    ("trampoline", "bad_ftrace_trampoline"),
    ("baseline ftrace_caller", "bad_ftrace_trampoline"),
    ("ftrace site", "bad_ftrace_site"),
    ("ftrace_call", "bad_ftrace_call"),
    ("ftrace_graph_call", "bad_ftrace_call"),
    ("jump label", "bad_jump_label"),
    ("static call site", "bad_static_call"),
    ("static call trampoline", "bad_static_call"),
    ("static call", "bad_static_call"),
    ("runtime constant", "bad_runtime_const"),
    ("smp lock site", "bad_smp_lock"),
    ("int3", "bad_kprobe"),
    ("jmp", "bad_optprobe"),
    ("optprobe", "bad_optprobe"),
    ("copied", "bad_optprobe"),
    ("a jump in the function", "bad_optprobe"),
    ("too many", "limit_reached"),
    ("decode budget", "limit_reached"),
    ("function could not be decoded", "undecodable"),
    ("not a known patch site", "unexplained_change"),
)


def kind_code(kind: str) -> str:
    """The stable code of a byte range's kind (see `KIND_CODES`)."""
    for prefix, code in KIND_CODES:
        if kind.startswith(prefix):
            return code
    return "other"


def diff_ranges(before: bytes, after: bytes, region: str, gate_size: int = 16) -> list[ByteRange]:
    """The changed byte ranges between two versions of one page."""
    n = min(len(before), len(after))
    a = np.frombuffer(before, np.uint8, n)
    b = np.frombuffer(after, np.uint8, n)
    idx = np.flatnonzero(a != b)
    out: list[ByteRange] = []
    if idx.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(idx) > MERGE_GAP)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
    for s, e in zip(starts.tolist()[:MAX_RANGES], ends.tolist()[:MAX_RANGES], strict=True):
        out.append(ByteRange(s, e, before[s:min(e, s + MAX_SHOWN)].hex(),
                             after[s:min(e, s + MAX_SHOWN)].hex(),
                             classify_range(before, after, s, e, region, gate_size)))
    return out


def classify_range(before: bytes, after: bytes, s: int, e: int, region: str,
                   gate_size: int = 16) -> str:
    if region == "idt":
        first, last = s // gate_size, (e - 1) // gate_size
        gates = f"gate {first}" if first == last else f"gates {first}-{last}"
        return f"IDT {gates} changed (handler/selector/attributes)"
    if region == "__ex_table":
        return "exception table entry changed (fixup redirected?)"
    if region == ".rodata":
        return "read-only data changed"
    return _classify_code(before, after, s, e)


def _classify_code(before: bytes, after: bytes, s: int, e: int) -> str:
    if e - s == 1 and after[s] == 0xCC and before[s] != 0xCC:
        return "int3 planted (kprobe or breakpoint)"
    if e - s == 1 and before[s] == 0xCC and after[s] != 0xCC:
        return "int3 removed (kprobe or breakpoint)"
    # 5-byte sites starting up to 4 bytes before the change and covering all of it.
    sites = [(before[p:p + 5], after[p:p + 5]) for p in range(max(0, s - 4), s + 1)
             if p + 5 >= e and p + 5 <= len(before)]
    # NOP-based patterns first: an unchanged E8/E9 byte just before a site (an
    # immediate operand) must not pass for a call being retargeted.
    for old, new in sites:
        if old in NOP5_ALT and new[0] == 0xE8:
            return "ftrace: NOP → call (function tracing enabled)"
        if new in NOP5_ALT and old[0] == 0xE8:
            return "ftrace: call → NOP (function tracing disabled)"
        if (old in NOP5_ALT and new[0] in (0xE9, 0xEB)) or \
                (new in NOP5_ALT and old[0] in (0xE9, 0xEB)):
            return "jump label / static key toggled (NOP ↔ jmp)"
    for p in range(max(0, s - 1), s + 1):
        if p + 2 < e or p + 2 > len(before):
            continue
        old, new = before[p:p + 2], after[p:p + 2]
        if (old in NOP2 and new[0] == 0xEB) or (new in NOP2 and old[0] == 0xEB):
            return "jump label / static key toggled (NOP ↔ short jmp)"
    for old, new in sites:
        if old[0] == new[0] and old[0] in (0xE8, 0xE9):
            return "call/jmp target changed (static call, or a hook)"
        if new[0] == 0xE9 and old[0] not in (0xE8, 0xE9) and old not in NOP5_ALT:
            return "code overwritten with a jmp (inline hook?)"
    return "code bytes changed"

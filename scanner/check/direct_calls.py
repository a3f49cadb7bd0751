"""ftrace direct calls: where the kernel says a site may call, and what a BPF trampoline runs.

A function with an fentry/fexit BPF program attached (or a module's
`register_ftrace_direct*` trampoline) has its ftrace site `call` a *direct* target
instead of ftrace_caller: the kernel's own record of it is the `direct_functions` hash
(kernel/trace/ftrace.c, 6.1 and 6.12: `ftrace_func_entry {hlist; ip; direct}`), read by
`scanner.check.kernel_lists.read_direct_calls`. `direct_lookup` gives the patch verifier
that record (read once per check, only when a site needs it); a site whose call does
not match its entry stays unverified.

`trampoline_calls` decodes a BPF trampoline image (arch/x86/net/bpf_jit_comp.c,
arch_prepare_bpf_trampoline: `call __bpf_prog_enter*`, `call <prog->bpf_func>`,
`call __bpf_prog_exit*` per program, optionally `call <traced function>+5`, then
`ret` / `jmp __x86_return_thunk`) linearly from its start to its first return, and
lists every direct `call rel32` target; the attribution turns those into owners (a BPF
program's JIT image, kernel text, a module, nobody). Hostile-safe: at most
`MAX_TRAMPOLINE` bytes and `MAX_INSNS` instructions, no jump is followed (a loop costs
nothing), an indirect branch, undecodable bytes or no return inside the image is a
problem, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone

from scanner.check.kernel_lists import (
    DirectCalls,
    KernelReader,
    direct_off,
    read_direct_calls,
)
from scanner.check.patching import DirectLookup, ReadVA
from scanner.image.kernel_profile import KernelProfile

__all__ = ["MAX_TRAMPOLINE", "TRAMPOLINE_PREFIX", "Decoded", "direct_lookup",
           "trampoline_calls"]

#: Bytes of a trampoline image decoded at most (6.1: one page; 6.12: sized to its
#: programs, BPF_MAX_TRAMP_LINKS of them).
MAX_TRAMPOLINE = 1 << 16
MAX_INSNS = 16384
#: The ksym name prefix of BPF trampoline images (kernel/bpf/trampoline.c).
TRAMPOLINE_PREFIX = "bpf_trampoline_"
#: Read budget of one direct_functions reading.
BUDGET = 4 << 20
_PAGE = 4096

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def direct_lookup(profile: KernelProfile, slide: int, read_va: ReadVA) -> DirectLookup | None:
    """A lookup of `direct_functions` for the patch verifier (None: this kernel's BTF or
    kallsyms cannot say, so direct calls stay unverified). Read on first use."""
    layouts = profile.layouts
    var = profile.data_symbol("direct_functions")
    if layouts is None or var is None or direct_off(layouts) is not None:
        return None
    got: list[DirectCalls] = []

    def lookup(ip: int) -> tuple[int | None, str]:
        if not got:
            assert layouts is not None and var is not None
            got.append(read_direct_calls(KernelReader(read_va, BUDGET), layouts,
                                         var + slide))
        return got[0].lookup(ip)

    return lookup


@dataclass(frozen=True)
class Decoded:
    """The `call rel32` targets of a trampoline, in order; `problem` says why the
    decode is not to be trusted ("" when it reached the trampoline's return)."""

    calls: tuple[int, ...]
    problem: str = ""
    size: int = 0


def _read_image(read: ReadVA, start: int, size: int) -> bytes:
    """As much of [start, start+size) as is readable from the start, page by page."""
    out = bytearray()
    at = start
    while at < start + size:
        n = min(_PAGE - (at % _PAGE), start + size - at)
        try:
            chunk = read(at, n)
        except Exception:     # a reader failing on hostile addresses is "unreadable"
            chunk = None
        if chunk is None or len(chunk) != n:
            break
        out += chunk
        at += n
    return bytes(out)


def trampoline_calls(read: ReadVA, start: int, end: int) -> Decoded:
    """Decode the trampoline image [start, end) (run-time addresses, from its ksym)."""
    if not 0 < end - start <= MAX_TRAMPOLINE:
        return Decoded((), f"trampoline image size {end - start:#x} out of range")
    code = _read_image(read, start, end - start)
    if not code:
        return Decoded((), "trampoline image unreadable")
    calls: list[int] = []
    pos = 0
    for n, (addr, size, mnem, ops) in enumerate(_md.disasm_lite(code, start)):
        if n >= MAX_INSNS:
            return Decoded(tuple(calls), f"more than {MAX_INSNS} instructions", pos)
        pos = addr + size - start
        if mnem in ("ret", "retq"):
            return Decoded(tuple(calls), "", pos)
        if mnem in ("call", "jmp") or mnem.startswith(("call", "jmp")):
            if not ops.startswith("0x"):
                return Decoded(tuple(calls), f"indirect {mnem} {ops} at +{addr - start:#x}",
                               pos)
            target = int(ops, 16)
            if mnem.startswith("call"):
                calls.append(target)
            elif not start <= target < end:
                # The return: `jmp __x86_return_thunk` (emit_return under RETHUNK).
                calls.append(target)
                return Decoded(tuple(calls), "", pos)
    if len(code) < end - start:
        return Decoded(tuple(calls), "trampoline unreadable before its return", pos)
    if pos < len(code):
        return Decoded(tuple(calls), f"undecodable bytes at +{pos:#x}", pos)
    return Decoded(tuple(calls), "no return inside the trampoline image", pos)

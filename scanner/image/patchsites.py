"""The kernel's self-patching sites, read from the kernel image (no debug package).

Linux rewrites parts of its own `.text` while it runs. Every such site is listed in a
table the kernel image carries; kscan reads those tables at `profile add` time so that a
changed byte in a running guest can be verified as the kernel's own patching (or not).

All addresses are link-time virtual addresses (KASLR undone), like everything else in a
profile. Mechanism names are the ones used in reports and events:
`ftrace`, `jump_label`, `static_call`, `kprobe`, `optprobe`, `smp_lock`, `runtime_const`.

(Interface fixed first so that the extractor and the verifiers can be built in parallel;
the extractor fills it from the image, `scanner.check.patching` consumes it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["MECHANISMS", "PatchSites", "RuntimeConst"]

MECHANISMS = ("ftrace", "jump_label", "static_call", "kprobe", "optprobe", "smp_lock",
              "runtime_const")

U64 = npt.NDArray[np.uint64]


def _empty() -> U64:
    return np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class RuntimeConst:
    """A runtime-constant site (6.11+): the immediate of one instruction, patched at boot.

    `addr` is the address of the immediate's first byte, `size` its width in bytes (8 for
    `runtime_ptr_*`, 1 for `runtime_shift_*`), `name` the variable (`d_hash_shift`...)."""

    addr: int
    size: int
    name: str


@dataclass(frozen=True)
class PatchSites:
    """Every self-patching site of one kernel build, as sorted link-time addresses."""

    #: ftrace call sites (`__mcount_loc`): the 5-byte NOP / `call` at each function entry.
    ftrace: U64 = field(default_factory=_empty)
    #: `__jump_table` entries: code address, target address, key address (same order).
    jump_code: U64 = field(default_factory=_empty)
    jump_target: U64 = field(default_factory=_empty)
    jump_key: U64 = field(default_factory=_empty)
    #: `.static_call_sites`: site address, key address, tail-call flag (same order).
    static_call_addr: U64 = field(default_factory=_empty)
    static_call_key: U64 = field(default_factory=_empty)
    static_call_tail: npt.NDArray[np.bool_] = field(
        default_factory=lambda: np.zeros(0, dtype=np.bool_))
    #: Static-call trampolines (`__SCT__*`): address → key address they belong to.
    static_call_trampolines: dict[int, int] = field(default_factory=dict)
    #: `.smp_locks`: addresses of `lock` prefixes (0xf0 ↔ 0x3e on UP/SMP switches).
    smp_locks: U64 = field(default_factory=_empty)
    #: Runtime-constant immediates (none before 6.11).
    runtime_const: tuple[RuntimeConst, ...] = ()
    #: [start, end) ranges where kprobes may not be placed (`_kprobe_blacklist`,
    #: `.kprobes.text`, `.noinstr.text`, entry text), sorted by start.
    kprobe_blacklist: tuple[tuple[int, int], ...] = ()
    #: ftrace's own code in `.text`: name → [start, end) (ftrace_caller,
    #: ftrace_regs_caller, ftrace_stub, return_to_handler, ...).
    ftrace_trampolines: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: The optprobe template in `.text` ([start, end) of optprobe_template_entry..end).
    optprobe_template: tuple[int, int] | None = None
    #: Start addresses of all functions in `.text` (from kallsyms), sorted: a static
    #: call may target any of them; an `int3` must sit on an instruction boundary
    #: decoded from the function start.
    function_starts: U64 = field(default_factory=_empty)

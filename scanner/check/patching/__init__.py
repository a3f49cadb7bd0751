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
  ftrace_graph_caller or ftrace_stub. A site may also `call` an ftrace *direct*
  target (a BPF trampoline, a module's direct trampoline) when the kernel's
  `direct_functions` names exactly that target for the site's function
  (ftrace_get_addr_new → ftrace_find_rec_direct); `verify_text_changes(direct=...)`.
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

The package: one module per mechanism (`ftrace`, `jump_label`, `static_call`, `kprobe`,
`optprobe`, `smp_lock`, `runtime_const`; `text_poke` for the half-states), each a
mixin of `common.VerifierBase` (the shared state and helpers); `registry` lists them
(name, sites in the image, verifier pass, boot-time, owner) and is the one list of
mechanism names; `verifier` drives a check; `verdict` is what it returns.
"""

from __future__ import annotations

from scanner.check.patch_state import PatchMemory, VmFacts
from scanner.check.patching.common import (
    CALL,
    CLAC,
    INT3,
    JMP8,
    JMP32,
    KERNEL_HALF,
    KPROBE_ADDR_OFF,
    NOP2,
    NOP3,
    NOP5,
    RET,
    RETINSN,
    RETURN_THUNKS,
    XOR5RAX,
    DirectLookup,
    Limits,
    ReadVA,
)
from scanner.check.patching.registry import BOOT_TIME, MECHANISMS, REGISTRY, Mechanism
from scanner.check.patching.verdict import (
    MechanismSummary,
    PatchVerdict,
    UnverifiedRange,
    VerifiedPatch,
)
from scanner.check.patching.verifier import _Verifier, verify_text_changes

__all__ = ["BOOT_TIME", "CALL", "CLAC", "INT3", "JMP8", "JMP32", "KERNEL_HALF",
           "KPROBE_ADDR_OFF", "MECHANISMS", "NOP2", "NOP3", "NOP5", "REGISTRY", "RET",
           "RETINSN", "RETURN_THUNKS", "XOR5RAX", "DirectLookup", "Limits", "Mechanism",
           "MechanismSummary", "PatchMemory", "PatchVerdict", "ReadVA", "UnverifiedRange",
           "VerifiedPatch", "VmFacts", "_Verifier", "verify_text_changes"]

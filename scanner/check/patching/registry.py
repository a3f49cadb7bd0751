"""The patching mechanisms kscan verifies, in one place (pure).

Each `Mechanism` names one way the kernel rewrites its own `.text`: where its sites
are in a kernel build (`sites`), the verifier pass over them (`verify`), whether it
follows how the VM booted rather than run-time tracing (`boot_time`: listed, never
a `kernel_patched` or --strict matter), and who made a verified site's bytes
(`owner`, not attributed yet). The order of `REGISTRY` is the order the verifiers
run in and the order mechanisms are listed in (verdict summaries, reports, events,
the CLI); `MECHANISMS` is the names, which contrib/events.schema.json enumerates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scanner.check.patching.ftrace import FtraceVerifier
from scanner.check.patching.jump_label import JumpLabelVerifier
from scanner.check.patching.runtime_const import RuntimeConstVerifier
from scanner.check.patching.smp_lock import SmpLockVerifier
from scanner.check.patching.static_call import StaticCallVerifier
from scanner.image.patchsites import PatchSites

__all__ = ["BOOT_TIME", "MECHANISMS", "REGISTRY", "Mechanism", "by_name"]

U64 = npt.NDArray[np.uint64]
#: The verifier pass over a mechanism's fixed sites: an unbound `do_*` method of its
#: mixin, called with the combined verifier (`scanner.check.patching.verifier`).
Verify = Callable[[Any], None]
#: Who made a verified site's live bytes (the seam for owner attribution): takes the
#: verified site and what the attribution needs, gives the owner's name or None.
Owner = Callable[..., str | None]


@dataclass(frozen=True)
class Mechanism:
    """One way the kernel rewrites its own `.text`, as kscan verifies it."""

    name: str
    description: str
    #: Link-time VAs of its fixed sites in a kernel build (empty: kprobes and
    #: optprobes may sit at any instruction boundary outside the blacklist).
    sites: Callable[[PatchSites], U64]
    #: Its pass over the fixed sites; None: found among the changed bytes outside them
    #: (`_Verifier.probes`: kprobe, optprobe).
    verify: Verify | None
    #: Follows how the VM booted (not run-time tracing): never --strict tampering.
    boot_time: bool = False
    owner: Owner | None = None


def _sorted_u64(vals: list[int]) -> U64:
    return np.array(sorted(v & ((1 << 64) - 1) for v in vals), dtype=np.uint64)


def _ftrace_sites(ps: PatchSites) -> U64:
    inner = [ps.ftrace_trampolines[k][0] for k in
             ("ftrace_call", "ftrace_regs_call", "ftrace_graph_call")
             if k in ps.ftrace_trampolines]
    return np.union1d(np.asarray(ps.ftrace, dtype=np.uint64), _sorted_u64(inner))


def _static_call_sites(ps: PatchSites) -> U64:
    return np.union1d(np.asarray(ps.static_call_addr, dtype=np.uint64),
                      _sorted_u64(list(ps.static_call_trampolines)))


def _none(ps: PatchSites) -> U64:
    return np.zeros(0, dtype=np.uint64)


REGISTRY: tuple[Mechanism, ...] = (
    Mechanism("ftrace", "function tracer: __mcount_loc call sites, ftrace_caller's calls, "
              "allocated trampolines", _ftrace_sites, FtraceVerifier.do_ftrace),
    Mechanism("jump_label", "static keys: __jump_table NOP/jmp sites",
              lambda ps: np.unique(np.asarray(ps.jump_code, dtype=np.uint64)),
              JumpLabelVerifier.do_jump_labels),
    Mechanism("static_call", "static calls: .static_call_sites and __SCT__ trampolines",
              _static_call_sites, StaticCallVerifier.do_static_calls),
    Mechanism("kprobe", "kprobes: int3 at an instruction boundary", _none, None),
    Mechanism("optprobe", "optimized kprobes: jmp to a slot outside .text", _none, None),
    Mechanism("smp_lock", "lock prefixes patched for the VM's CPU count (.smp_locks)",
              lambda ps: np.unique(np.asarray(ps.smp_locks, dtype=np.uint64)),
              SmpLockVerifier.do_smp_locks, boot_time=True),
    Mechanism("runtime_const", "runtime constants: immediates written once, at boot (6.11+)",
              lambda ps: _sorted_u64([rc.addr for rc in ps.runtime_const]),
              RuntimeConstVerifier.do_runtime_consts, boot_time=True),
)

MECHANISMS: tuple[str, ...] = tuple(m.name for m in REGISTRY)
BOOT_TIME: frozenset[str] = frozenset(m.name for m in REGISTRY if m.boot_time)


def by_name(name: str) -> Mechanism:
    """The mechanism called `name` (KeyError: none)."""
    for m in REGISTRY:
        if m.name == name:
            return m
    raise KeyError(name)

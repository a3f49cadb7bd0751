"""Check an examined VM against its baselines and record its per-VM state."""

from __future__ import annotations

import dataclasses

from scanner.check.execmem import ExecScan, exec_findings, scan_exec
from scanner.check.kernel_lists import walker_reader
from scanner.check.patching import ReadVA
from scanner.check.reached import Recorder
from scanner.check.state import VmState
from scanner.check.verify import CheckReport, Finding, Verification, verify
from scanner.examine.baselines import GoldenSet, golden_for
from scanner.examine.reading import Examined, RunSync, inline
from store import Store
from translate import GuestMemory, TranslationError

__all__ = ["check_examined", "guest_reader", "plain_reader", "verify_and_record",
           "verify_examined", "with_execmem"]

#: The largest read a verifier may make through guest memory (a trampoline, a slot).
_MAX_READ = 1 << 16


def guest_reader(mem: GuestMemory, ex: Examined) -> Recorder:
    """Reads guest-virtual memory through the kernel page table the check used: how the
    patch verifiers look at code outside `.text` (allocated trampolines, optprobe
    slots). None for anything unmapped, too big, or outside RAM. It records what it
    read (bounded), which becomes part of the VM's checked state."""
    walker = ex.space.walker(mem)

    def read(va: int, size: int) -> tuple[bytes, tuple[tuple[int, int], ...],
                                          tuple[tuple[int, int], ...]] | None:
        if not 0 < size <= _MAX_READ:
            return None
        try:
            t = walker.translate_range(va, size)
            runs = t.gpa_runs()
            return b"".join(bytes(mem.view(g, n)) for g, n in runs), runs, t.entries
        except (TranslationError, OverflowError, ValueError):
            return None

    return Recorder(read)


def plain_reader(mem: GuestMemory, ex: Examined) -> ReadVA:
    """A `ReadVA` through the same page table as `guest_reader`, recording nothing."""
    walker = ex.space.walker(mem)

    def read(va: int, size: int) -> bytes | None:
        if not 0 < size <= _MAX_READ:
            return None
        try:
            t = walker.translate_range(va, size)
            return b"".join(bytes(mem.view(g, n)) for g, n in t.gpa_runs())
        except (TranslationError, OverflowError, ValueError):
            return None

    return read


async def verify_examined(st: Store, ex: Examined, vm_id: str, golden: GoldenSet | None = None,
                          run_sync: RunSync[Verification] = inline, *,
                          mem: GuestMemory | None = None, strict: bool = False,
                          trusted_modules: frozenset[str] = frozenset()) -> Verification:
    """Verify against the stored baselines (fetched unless given); records nothing.
    `mem` (the VM's memory) lets patch verifiers follow code outside `.text`."""
    gs = golden if golden is not None else await golden_for(st, ex)
    state = VmState.from_plain(await st.get_vm_state(vm_id))
    read_va = guest_reader(mem, ex) if mem is not None else None
    # Owner lookups (module list, BPF, ftrace ops...) read kernel data, not code the
    # patching reached: through readers that record nothing (their counters change all
    # the time: the fast path would never pass). `plain` for the executable-memory
    # accounting and pointer names, a page-caching one for the patch owners.
    plain = plain_reader(mem, ex) if mem is not None else None
    read_data = walker_reader(ex.space.walker(mem)) if mem is not None else None

    def go() -> Verification:
        v = verify(ex.vm, ex.lk, ex.vcpus, ex.boot, ex.normalized, gs.regions,
                   gs.contents.get, state, read_va=read_va, strict=strict,
                   plain_va=plain, read_data=read_data, trusted_modules=trusted_modules)
        if mem is None or plain is None:
            return v
        return with_execmem(v, scan_exec(mem, ex.vcpus, ex.lk, plain))

    v = await run_sync(go)
    return v if read_va is None else dataclasses.replace(v, reached=read_va.ranges())


def with_execmem(v: Verification, scan: ExecScan) -> Verification:
    """The verification with executable kernel memory accounted for: its findings (an
    unowned range is tampering, always) added to the report."""
    found = tuple(Finding(kind, msg, detail) for kind, msg, detail in exec_findings(scan))
    report = dataclasses.replace(v.report, findings=v.report.findings + found,
                                 execmem=scan)
    return dataclasses.replace(v, report=report)


async def check_examined(st: Store, ex: Examined, vm_id: str, golden: GoldenSet | None = None,
                         run_sync: RunSync[Verification] = inline, *,
                         mem: GuestMemory | None = None, strict: bool = False,
                         trusted_modules: frozenset[str] = frozenset()) -> CheckReport:
    """Verify, and store the VM's per-VM state when this check took it."""
    v = await verify_and_record(st, ex, vm_id, golden, run_sync, mem=mem, strict=strict,
                                trusted_modules=trusted_modules)
    return v.report


async def verify_and_record(st: Store, ex: Examined, vm_id: str,
                            golden: GoldenSet | None = None,
                            run_sync: RunSync[Verification] = inline, *,
                            mem: GuestMemory | None = None,
                            strict: bool = False,
                            trusted_modules: frozenset[str] = frozenset()) -> Verification:
    """`check_examined`, returning the per-VM state the check used as well."""
    v = await verify_examined(st, ex, vm_id, golden, run_sync, mem=mem, strict=strict,
                              trusted_modules=trusted_modules)
    if v.report.per_vm_baseline_taken or v.changed:
        await st.put_vm_state(vm_id, v.state.to_plain())
    return v

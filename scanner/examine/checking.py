"""Check an examined VM against its baselines and record its per-VM state."""

from __future__ import annotations

import dataclasses

from scanner.check.kernel_lists import walker_reader
from scanner.check.reached import Recorder
from scanner.check.state import VmState
from scanner.check.verify import CheckReport, Verification, verify
from scanner.examine.baselines import GoldenSet, golden_for
from scanner.examine.reading import Examined, RunSync, inline
from store import Store
from translate import GuestMemory, TranslationError

__all__ = ["check_examined", "guest_reader", "verify_and_record", "verify_examined"]

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


async def verify_examined(st: Store, ex: Examined, vm_id: str, golden: GoldenSet | None = None,
                          run_sync: RunSync[Verification] = inline, *,
                          mem: GuestMemory | None = None, strict: bool = False,
                          trusted_modules: frozenset[str] = frozenset()) -> Verification:
    """Verify against the stored baselines (fetched unless given); records nothing.
    `mem` (the VM's memory) lets patch verifiers follow code outside `.text`."""
    gs = golden if golden is not None else await golden_for(st, ex)
    state = VmState.from_plain(await st.get_vm_state(vm_id))
    read_va = guest_reader(mem, ex) if mem is not None else None
    # The lists patch owners are looked up in are read, not recorded: they are not
    # verified byte for byte, and their counters change all the time (the fast path
    # would never pass). One page-caching reader per check.
    read_data = walker_reader(ex.space.walker(mem)) if mem is not None else None
    v = await run_sync(lambda: verify(ex.vm, ex.lk, ex.vcpus, ex.boot, ex.normalized,
                                      gs.regions, gs.contents.get, state,
                                      read_va=read_va, strict=strict,
                                      read_data=read_data,
                                      trusted_modules=trusted_modules))
    return v if read_va is None else dataclasses.replace(v, reached=read_va.ranges())


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

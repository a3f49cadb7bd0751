"""Check an examined VM against its baselines and record its per-VM state."""

from __future__ import annotations

from scanner.check.state import VmState
from scanner.check.verify import CheckReport, Verification, verify
from scanner.examine.baselines import GoldenSet, golden_for
from scanner.examine.reading import Examined, RunSync, inline
from store import Store

__all__ = ["check_examined", "verify_examined"]


async def verify_examined(st: Store, ex: Examined, vm_id: str, golden: GoldenSet | None = None,
                          run_sync: RunSync[Verification] = inline) -> Verification:
    """Verify against the stored baselines (fetched unless given); records nothing."""
    gs = golden if golden is not None else await golden_for(st, ex)
    state = VmState.from_plain(await st.get_vm_state(vm_id))
    return await run_sync(lambda: verify(ex.vm, ex.lk, ex.vcpus, ex.boot, ex.normalized,
                                         gs.regions, gs.contents.get, state))


async def check_examined(st: Store, ex: Examined, vm_id: str, golden: GoldenSet | None = None,
                         run_sync: RunSync[Verification] = inline) -> CheckReport:
    """Verify, and store the VM's per-VM state when this check took it."""
    v = await verify_examined(st, ex, vm_id, golden, run_sync)
    if v.report.per_vm_baseline_taken:
        await st.put_vm_state(vm_id, v.state.to_plain())
    return v.report

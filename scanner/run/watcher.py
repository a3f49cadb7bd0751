"""One VM's life under `kscan run`: attach, wait for boot, check, then watch.

    attach ──► booting ──► identified ──► first check ──► watching ◄──┐
                 ▲  (retry: not booted, no profile,      │  fast scan │ slow path on
                 │   no baseline)                         └────────────┘ any change
                 └──────────── kernel gone (reboot) ◄────────┘

Fast scans (`scanner.check.fastpath`) run on the event loop. Any difference takes the slow
path in the engine's worker threads: when only region bytes changed, re-read just those
regions through the translations already proven; otherwise re-locate the kernel
(translations included); then normalize and verify page by page (`scanner.check.verify`).
A tampering is reported once per distinct set of changes; when the VM matches its
baselines again, `tamper_cleared` says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kscan.addresses import hex_addr
from kscan.errors import KscanError
from scanner.check.fastpath import (
    FastOutcome,
    Reference,
    check_memory,
    check_registers,
    make_reference,
)
from scanner.check.locate import REGIONS
from scanner.check.patch_state import HALF_STATE_MAX, HALF_STATE_MOST
from scanner.check.resume import Saved, resume_check
from scanner.check.state import BootIdentity, VmState
from scanner.check.verify import CheckReport
from scanner.errors import BaselineMissing, ProfileError, QmpError, VmStateError
from scanner.examine import (
    Examined,
    GoldenSet,
    Snapshot,
    examine,
    golden_digest,
    golden_regions,
    reexamine,
    snapshot,
    verify_and_record,
)
from scanner.image.kernel_profile import KernelProfile
from scanner.run.actions import (
    EXEC_TIMEOUT,
    ActionKind,
    ForensicCopy,
    collect_forensics,
    run_exec,
    tamper_fields,
    write_forensics,
)
from scanner.run.context import WatchContext
from scanner.run.modwatch import ModuleWatch
from scanner.run.scheduler import SLOW_SHARE
from scanner.vm import VmHandle, pti_active
from scanner.vm.progress import Sample, progressed, wait_for_progress
from store import StoreError
from translate import BackendError, PageWalker, TranslationError, kernel_space
from translate.vcpu import VcpuState

__all__ = ["VmWatcher", "WatchState"]

T = TypeVar("T")

log = logging.getLogger("kscan.watch")

BOOT_POLL = 2.0
RETRY_MISSING = 30.0  # no profile / no baseline: look again this often
#: A tampering seen while the kernel is patching itself is looked at again this much
#: later before it is reported (see `_full_check`).
CONFIRM_DELAY = 0.3
#: ... and, where the host can tell, not before the guest has run since (a starved vCPU
#: finishes nothing), but no later than this.
CONFIRM_MOST = 5.0
#: While watching, ask QEMU for the run state at most this often (a VM that shuts down
#: or panics under -no-shutdown keeps its QMP socket and its memory: scans alone would
#: never notice it is gone).
STATE_EVERY = 5.0


class VmGone(Exception):
    """The VM (or its QMP connection) went away."""


class WatchState(enum.StrEnum):
    ATTACHED = "attached"  # attached, nothing read yet
    BOOTING = "booting"  # waiting until the kernel is checkable (booted, known, baselined)
    WATCHING = "watching"  # checked in full once; fast scans at its interval


class VmWatcher:
    def __init__(self, ctx: WatchContext, vm: VmHandle, source: str,
                 key: str | None = None) -> None:
        self.ctx = ctx
        self.vm = vm
        self.name = vm.name  # what events show; a QEMU can report any name
        self.source = source
        #: What its per-VM state and resume record are stored under
        #: (`scanner.vm.identity.state_key`; the name where none is given).
        self.key = key if key is not None else vm.name
        self.ref: Reference | None = None
        self.slide: int | None = None  # of the kernel last checked (a change: reboot)
        self.reported: frozenset[Any] | None = None  # the change set last reported
        self.scans = 0
        self.verified_at: float | None = None  # Unix time of the last verdict (metrics)
        self.state = WatchState.ATTACHED
        self.seen_at: float | None = None  # when the fast path last saw a difference
        self.last: Examined | None = None  # the last check, without its region copies
        self.last_report: CheckReport | None = None
        self._state_at = 0.0  # monotonic time of the last run-state query
        self.patched_set: int | None = None  # the verified patching last reported
        self.checked_at = 0.0  # when the last full check read the VM
        #: The vCPUs' run times when that check saw text_poke_bp() half-way.
        self._checked_run: Sample | None = None
        self._resets = vm.resets()  # QEMU RESET events already accounted for
        self._acting: set[asyncio.Task[None]] = set()  # actions and forensics under way
        self._act_lock = asyncio.Lock()
        self.resumed = False  # given its first verdict from the persisted state
        self._resume_tried = False
        self.modwatch = ModuleWatch()  # the guest's module list (module_loaded/unloaded)
        self._resumed_kernel: tuple[str, int] | None = None  # (build id, slide) resumed
        ctx.scheduler.expect(self.name)  # the start-up burst waits for its first verdict

    # -- helpers ---------------------------------------------------------------------
    async def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        return await self.ctx.emit(event, self.name, **fields)

    def _drop_reference(self) -> None:
        if self.ref is not None:
            self.ref.release()
            self.ref = None
        self.last = self.last_report = None

    # -- lifecycle -------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        except VmGone as gone:
            await self.emit("vm_lost", reason=str(gone))
        except QmpError as err:
            await self.emit("vm_lost", reason=str(err))
        except BackendError as err:
            await self.emit("vm_lost", reason=str(err))
        finally:
            self.ctx.scheduler.remove(self.name)
            self._drop_reference()
            try:
                await self._finish_actions()
            finally:
                for t in self._acting:
                    t.cancel()
                try:
                    await self.vm.close()
                except Exception as err:  # closing must not mask why we stopped
                    log.debug("closing %s: %s", self.name, err)

    async def _run(self) -> None:
        self.ctx.scheduler.add(self.name)
        while True:
            await self._until_checked()
            while self.ref is not None:
                # The pacer releases due VMs in batches, oldest first, with the pass's
                # expected cost already reserved from the budget.
                await self._scan(await self.ctx.scheduler.turn(self.name))

    async def _until_checked(self) -> None:
        """Wait until the kernel has booted, is identified, and has a baseline; then
        check it in full once."""
        said: set[str] = set()
        self.state = WatchState.BOOTING
        if not self._resume_tried:  # once per watch: kscan (or this watch) just started
            self._resume_tried = True
            if await self._resume():
                self.ctx.scheduler.verdict(self.name)
                return
        while True:
            wait = BOOT_POLL
            await self._share("the check of its kernel")
            try:
                # QMP first, without a slow-path slot: a peer that answers slowly must
                # not hold one of the few slots every VM's slow path needs.
                prep = await self._prepare()
            except Exception as err:
                found = await self._not_checkable(err, said)
                if found is None:
                    raise
                wait = found
                self.ctx.scheduler.verdict(self.name)  # not checkable yet
                await asyncio.sleep(wait)
                continue
            async with self.ctx.slow_slot():
                try:
                    ex = await self._slow(functools.partial(self._examine, prep))
                    golden = await self.ctx.golden(ex)  # BaselineMissing if there is none
                except Exception as err:
                    found = await self._not_checkable(err, said)
                    if found is None:
                        raise
                    wait = found
                    self.ctx.scheduler.verdict(self.name)  # not checkable yet
                else:
                    if self.slide is not None and ex.lk.slide != self.slide:
                        # A reboot seen through its boot window (the kernel went away,
                        # then came back at another slide).
                        await self.emit("vm_rebooted", slide=hex_addr(ex.lk.slide))
                    # A new verification cycle: what it finds is reported afresh, even
                    # the change reported before (a rootkit that reinstalls at boot).
                    self.reported = None
                    await self._full_check(ex, golden, first=True)
                    self.ctx.scheduler.verdict(self.name)
                    return
            await asyncio.sleep(wait)

    async def _resume(self) -> bool:
        """Resume from the persisted state of the last clean full check: one fast pass
        proves the VM is exactly what was verified (`scanner.check.resume`), and its
        verdict is given without a slow path. False: take the full path."""
        st, name = self.ctx.store, self.name
        try:
            blob = await st.get_resume(self.key)
            if blob is None:
                return False
            saved = Saved.from_bytes(blob)
            state = VmState.from_plain(await st.get_vm_state(self.key)) if saved else None
        except StoreError as err:  # an unreadable row: the full path rewrites both
            log.info("%s: persisted state unreadable (%s): full check", name, err)
            return False
        why = None
        if saved is None:
            why = "persisted fast-pass state unreadable"
        elif state is None or state.boot != BootIdentity(saved.build_id, saved.slide):
            why = "no per-VM state of that boot"
        elif state.digest() != saved.state:
            why = "per-VM state changed since"
        if why is not None or saved is None:
            log.info("%s: not resumed (%s): full check", name, why)
            return False
        # The stored profile's row, not the decoded profile: at start every VM resumes
        # at once, and decoding (~12 ms) in each would be most of a resume's cost.
        profile = next((p for p in await st.list_profiles()
                        if p.build_id == saved.build_id), None)
        if profile is None or profile.size != saved.profile_size:
            log.info("%s: not resumed (kernel profile gone or replaced): full check", name)
            return False
        run = await self.vm.run_state()
        if run.status.gone:
            raise VmGone(f"VM is {run.status}")
        boot = await self.vm.boot_profile()
        sched = self.ctx.scheduler
        expected = sched.cost(name)
        await sched.acquire(expected)
        vcpus = await self.vm.refresh_vcpus()
        self._check_backing()  # no await from here to the reads below
        t0 = time.thread_time()
        try:
            ks = kernel_space(self.vm.mem, vcpus[0])
            boot = dataclasses.replace(boot, pti=pti_active(self.vm.mem, ks.pgd, ks.top_shift))
        except TranslationError as err:
            why = f"kernel page table unreadable: {err}"
        cpu = time.thread_time() - t0
        golden = await golden_regions(st, saved.build_id, boot) if why is None else None
        ref = None
        if why is not None:
            pass
        elif golden is None or golden_digest(golden) != saved.golden:
            why = "golden baseline changed since"
        else:
            self._check_backing()  # no await from here to the reads below
            t0 = time.thread_time()
            ref, why = resume_check(saved, self.vm.mem, vcpus, boot.key)
            cpu += time.thread_time() - t0
            sched.record(name, cpu, keyed=True)  # a keyed fast pass
            self.scans += 1
            self.ctx.count_scan(keyed=True, cpu_seconds=cpu)
        sched.settle(expected, cpu)
        if ref is None:
            log.info("%s: not resumed (%s): full check", name, why)
            return False
        self._drop_reference()
        self.ref, self.slide, self.reported = ref, saved.slide, frozenset()
        self.resumed = True
        self._resumed_kernel = (saved.build_id, saved.slide)
        self.state = WatchState.WATCHING
        await self.emit("vm_identified", build_id=saved.build_id, release=profile.release,
                        slide=hex_addr(saved.slide), boot_profile=saved.boot_key,
                        per_vm_baseline_taken=False, resumed=True)
        await self.emit("vm_clean", per_vm_baseline_taken=False,
                        regions=saved.summary.get("regions", {}), resumed=True)
        return True

    async def _persist(self, ex: Examined, golden: GoldenSet, report: CheckReport,
                       state: VmState) -> None:
        """Keep what a restarted kscan resumes this VM from: after a clean check (not
        tampered, no run-time patching: a resume reports neither), with the reference
        now held. Never needed for correctness: failing to write it only costs the
        next start a full check."""
        if self.ref is None or report.tampered or report.patched:
            return
        st = self.ctx.store
        try:
            size = await st.profile_size(ex.lk.profile.build_id)
            if size is None:
                return
            saved = Saved.of(self.ref, ex.lk.profile.build_id, ex.lk.slide, ex.boot.key,
                             golden_digest(golden.regions), state.digest(), size,
                             {"regions": _summary(report)["regions"]})
            await st.put_resume(self.key, saved.to_bytes())
        except StoreError as err:
            log.warning("%s: could not persist the resume state: %s", self.name, err)

    async def _not_checkable(self, err: BaseException, said: set[str]) -> float | None:
        """Say (once) why the VM cannot be checked yet; how long to wait before trying
        again, or None if this error is not one to wait out."""
        if isinstance(err, ProfileError):
            await self._say_once(said, "profile_missing", err, version=err.version,
                                 hint=err.hint)
            return RETRY_MISSING
        if isinstance(err, BaselineMissing):
            await self._say_once(said, "baseline_missing", err, hint=err.hint)
            return RETRY_MISSING
        if isinstance(err, VmStateError | TranslationError):
            await self._say_once(said, "vm_booting", err)
            return BOOT_POLL
        return None

    async def _say_once(self, said: set[str], event: str, err: KscanError,
                        **fields: Any) -> None:
        if event not in said:
            said.add(event)
            await self.emit(event, message=err.message, **fields)

    async def _prepare(self) -> Snapshot:
        """What a full examination asks QEMU for (run state, registers, boot profile)."""
        state = await self.vm.run_state()
        if state.status.gone:
            raise VmGone(f"VM is {state.status}")
        return await snapshot(self.vm)

    async def _examine(self, snap: Snapshot) -> Examined:
        profiles = await self.ctx.profiles()
        self._check_backing()
        return await examine(self.vm, profiles, self._in_worker, snap)

    def _check_backing(self) -> None:
        """A memory file that shrank would fault the next read with SIGBUS and kill
        kscan: give the VM up instead (the engine re-attaches it, which maps the file
        as it is now). A truncation after this check still faults (README: SIGBUS)."""
        why = self.vm.mem.shrunk()
        if why is not None:
            raise VmGone(f"guest memory file shrank: {why}; re-attaching")

    async def _in_worker(self, fn: Callable[[], T]) -> T:
        """CPU-bound work in the engine's workers, charged to the budget and to this
        VM's share of slow-path CPU."""
        return await self.ctx.timed_in_worker(fn, self.name)

    async def _share(self, pending: str) -> bool:
        """Wait, if this VM's slow paths have spent their allowance, for its share of
        the budget (`Scheduler.slow_wait`), said first in a `slow_paced` event
        (`pending`: what waits for the check). True if it waited: the slow path then
        queues behind other work instead of skipping ahead. Called before taking a
        slow-path slot, so a waiting VM holds none."""
        sched = self.ctx.scheduler
        wait = sched.slow_wait(self.name)
        if wait <= 0:
            return False
        await self.emit("slow_paced", wait_s=round(wait, 1),
                        level_cpu_s=round(sched.slow_level(self.name), 3),
                        allowance_cpu_s=round(sched.slow_allowance(), 3), share=SLOW_SHARE,
                        pending=pending,
                        message=f"this VM's checks used more than their share of the CPU "
                                f"budget: {pending} waits {wait:.0f}s, so the other VMs "
                                "keep their scans")
        return await sched.slow_turn(self.name)

    async def _slow(self, work: Callable[[], Awaitable[T]], urgent: bool = False) -> T:
        """Slow-path work waits for the budget like scans do: it reserves the usual
        slow-path cost, is charged what it really uses, then the reservation is
        returned — so a fleet attaching at once does not break the CPU budget."""
        sched = self.ctx.scheduler
        expected = sched.slow_cost
        await sched.acquire(expected, urgent=urgent)
        before = sched.charged
        try:
            return await work()
        finally:
            sched.record_slow(sched.charged - before)
            sched.settle(expected, 0.0)

    # -- checks ----------------------------------------------------------------------
    async def _full_check(self, ex: Examined, golden: GoldenSet, first: bool,
                          confirm: bool = True) -> CheckReport:
        """Verify an examined VM (holding a slow-path slot), then report and act."""
        checked = await verify_and_record(self.ctx.store, ex, self.key, golden,
                                          self._in_worker, mem=self.vm.mem,
                                          strict=self.ctx.strict,
                                          trusted_modules=self.ctx.trusted_modules)
        report = checked.report
        if (confirm and report.tampered and report.patches is not None
                and _change_set(report) != self.reported):
            # The kernel is patching itself right now (its own patching verified in the
            # same pages): a scan can catch text_poke or an ftrace trampoline being
            # replaced half-way. Look once more, in full, before reporting; a change
            # that is still there is reported from that second look. What the first
            # look saw is never only a log line: unless the second look reports the
            # very same changes, it is a `tamper_transient` (an attacker can undo a
            # change within the delay as easily as the kernel finishes a patch).
            await self._before_second_look()
            try:
                again = await self._slow(functools.partial(
                    self._examine, Snapshot(ex.vcpus, ex.boot)), urgent=True)
            except (VmStateError, TranslationError, ProfileError):
                pass  # the kernel moved meanwhile: report what was seen
            else:
                second: CheckReport | None = None
                try:
                    second = await self._full_check(again, golden, first, confirm=False)
                finally:
                    if second is None or _change_set(second) != _change_set(report):
                        await self._transient(report, second)
                return second
        partial = len(ex.normalized) < len(REGIONS)
        if partial and self.ref is not None and self.last_report is not None:
            # Only some regions were re-read (their translations proven unchanged): the
            # others keep their verdicts, and only their reference digests move.
            verdicts = {r.name: r for r in self.last_report.regions}
            verdicts.update((r.name, r) for r in report.regions)
            report = dataclasses.replace(
                report, regions=tuple(verdicts[n] for n in REGIONS), per_vm_baseline_taken=False,
                patches=(report.patches if ".text" in ex.normalized
                         else self.last_report.patches))
            self.ref.set_digests(ex.raw_digests)
            if ".text" in ex.normalized:  # what its patching reached was read again
                self.ref.set_reached(self.vm.mem, checked.reached, ex.space.pgd,
                                     ex.space.top_shift)
        else:
            self._drop_reference()
            self.ref = make_reference(self.vm.mem, ex.lk, ex.vcpus, ex.space.pgd,
                                      ex.space.top_shift, ex.raw_digests, checked.reached)
        if self.ref is not None and report.execmem is not None:
            self.ref.exec_tables = report.execmem.fingerprint
        self.slide = ex.lk.slide
        # Keep what a partial re-check needs — not the region copies (~19 MB) and not
        # the decoded IDT gates.
        self.last = ex.without_copies()
        self.last_report = report
        self.checked_at = time.time()
        self._checked_run = (await self.vm.progress() if report.patches is not None and any(
            v.in_progress for v in report.patches.verified) else None)
        self.state = WatchState.WATCHING
        self.verified_at = time.time()
        await self._persist(ex, golden, report, checked.state)
        if first:
            self.ctx.scheduler.mark_hot(self.name)
            await self.emit("vm_identified", build_id=ex.lk.profile.build_id,
                            release=ex.lk.profile.release, slide=hex_addr(ex.lk.slide),
                            boot_profile=ex.boot.key,
                            per_vm_baseline_taken=report.per_vm_baseline_taken)
        changes = _change_set(report)
        if report.tampered:
            if changes != self.reported:
                self.reported = changes
                await self._on_tamper(ex, golden, report)
        else:
            if self.reported:
                await self.emit("tamper_cleared", message="VM matches its baselines again")
            elif first:
                await self.emit("vm_clean", **_summary(report))
            self.reported = frozenset()
            await self._on_patched(report)
        await self._read_modules(ex.lk.profile, ex.lk.slide, ex.space.walker(self.vm.mem))
        return report

    async def _read_modules(self, profile: KernelProfile, slide: int,
                            walker: PageWalker) -> None:
        """Read the guest's module list off the event loop; report what came and went
        (scanner.run.modwatch). Said once per VM when the kernel's list cannot be read."""
        was_off = self.modwatch.off
        events = await self._in_worker(
            lambda: self.modwatch.read(profile, slide, walker))
        if self.modwatch.off is not None and was_off is None:
            log.info("%s: %s", self.name, self.modwatch.off)
        for ev in events:
            await self.emit(ev.event, **ev.fields)

    async def _modules_again(self, vcpus: list[VcpuState]) -> None:
        """Between full checks: the module list, through the kernel page table now."""
        if self.last is not None:
            profile, slide = self.last.lk.profile, self.last.lk.slide
        elif self._resumed_kernel is not None:
            build_id, slide = self._resumed_kernel
            found = next((p for p in await self.ctx.profiles() if p.build_id == build_id),
                         None)
            if found is None:
                return
            profile = found
        else:
            return
        try:
            walker = kernel_space(self.vm.mem, vcpus[0]).walker(self.vm.mem)
        except TranslationError:
            return
        await self._read_modules(profile, slide, walker)

    async def _before_second_look(self) -> None:
        """The pause before a second look (tests interpose here)."""
        await wait_for_progress(self.vm.progress, CONFIRM_DELAY, CONFIRM_MOST)

    async def _transient(self, seen: CheckReport, second: CheckReport | None) -> None:
        """A tampering seen once and not (or not as it was) on the second look: said
        as a critical event with what was seen. Not acted on: the VM no longer shows
        it (what the second look found, if anything, was reported on its own)."""
        look = "unknown" if second is None else "tampered" if second.tampered else "clean"
        log.info("%s: a change seen while the kernel patched itself was not there as such "
                 "on a second look (%s): tamper_transient", self.name, look)
        await self.emit(
            "tamper_transient", seen_at=self.seen_at, confirm_delay=CONFIRM_DELAY,
            build_id=seen.build_id, slide=hex_addr(seen.slide), second_look=look,
            message="a change seen while the kernel patched itself was not there as "
                    "such on a second look: a patch caught half-way, or a tampering "
                    "undone at once",
            **tamper_fields(seen),
            patched=seen.patches.to_json() if seen.patches else None)

    async def _on_patched(self, report: CheckReport) -> None:
        """Verified run-time patching is not tampering: said once per distinct set of
        patches (`kernel_patched`), never acted on."""
        fp = report.patches.fingerprint() if report.patched and report.patches else None
        if fp is not None and fp != self.patched_set:
            assert report.patches is not None
            await self.emit("kernel_patched", build_id=report.build_id,
                            slide=hex_addr(report.slide),
                            **report.patches.to_json())
        self.patched_set = fp

    async def _scan(self, expected: float) -> None:
        """One routine fast pass; `expected` CPU seconds were reserved for it."""
        assert self.ref is not None
        sched = self.ctx.scheduler
        now = time.monotonic()
        if now - self._state_at >= STATE_EVERY:
            self._state_at = now
            state = await self.vm.run_state()
            if state.status.gone:
                raise VmGone(f"VM is {state.status}")
        if self.vm.resets() != self._resets:
            # QEMU reset the VM: a reboot, even if the kernel comes back at the same
            # slide. Its per-boot pages are this boot's again: take them afresh.
            self._resets = self.vm.resets()
            await self.ctx.store.delete_vm_state(self.key)
            self._drop_reference()
            self.modwatch.reset()
            await self.emit("vm_booting", message="QEMU reset the VM (a reboot)")
            return
        vcpus = await self.vm.refresh_vcpus()
        # The fast path runs right here on the event loop: ~1-2 ms of hashing (with
        # the GIL released) per VM. Handing it to a worker thread cost more CPU in
        # futures and wake-ups than it saved; under a CPU budget below one core the
        # parallelism buys nothing. Slow paths (tens of ms) do go to the workers.
        self._check_backing()  # no await from here to the reads below
        t0 = time.thread_time()
        res = check_registers(self.ref, self.vm.mem, vcpus)
        if res.ok:
            res = check_memory(self.ref, self.vm.mem, every=sched.keyed_every())
        cost = time.thread_time() - t0
        sched.record(self.name, cost, keyed=res.keyed)
        sched.settle(expected, cost)
        self.scans += 1
        self.ctx.count_scan(res.keyed, cost)
        due = res.ok and self._half_state_due()
        if due and not await self._guest_ran_since_check():
            due = False  # the guest has not run since: its half-state proves nothing yet
        if res.ok and not due:
            self.verified_at = time.time()
            if self.modwatch.due(self.vm.mem):
                await self._modules_again(vcpus)
            return
        log.info("%s: %s %s: slow path", self.name, res.reason, ",".join(res.changed))
        self.seen_at = time.time()
        sched.mark_hot(self.name)
        last = self.last
        # Past its allowance, the VM waits for its share of the budget (no slot held).
        waited = await self._share("the check of a change it made ("
                                   + (", ".join(res.changed) or res.reason) + ")")
        # Translations and registers proven unchanged: re-read just what changed, with
        # the registers this scan read. (An IDT change takes the full path: its gates
        # must be decoded again; so does a change that waited, its proof gone stale.)
        # Otherwise ask QEMU first, before taking a slot.
        partial = (res.outcome is FastOutcome.BYTES_CHANGED and last is not None
                   and "idt" not in res.changed and not waited)
        try:
            prep = None if partial else await self._prepare()
        except VmStateError as err:
            await self._kernel_gone(err)
            return
        async with self.ctx.slow_slot():
            try:
                if prep is None:
                    assert last is not None

                    async def reread() -> Examined:
                        self._check_backing()
                        return await reexamine(self.vm, last, res.changed,
                                               self._in_worker, tuple(vcpus))

                    ex = await self._slow(reread, urgent=True)
                else:
                    ex = await self._slow(lambda: self._examine(prep), urgent=not waited)
                golden = await self.ctx.golden(ex)
            except (VmStateError, TranslationError, ProfileError) as err:
                await self._kernel_gone(err)
                return
            rebooted = self.slide is not None and ex.lk.slide != self.slide
            if rebooted:
                await self.emit("vm_rebooted", slide=hex_addr(ex.lk.slide))
                self.reported = None
            # A new boot is identified and its first check reported like the first one.
            await self._full_check(ex, golden, first=rebooted)

    def _half_state_due(self) -> bool:
        """The last full check saw text_poke_bp() half-way (an int3 over a site): the
        same bytes still there a second later are not the kernel's, but the fast path
        would only see "unchanged" — look in full again."""
        r = self.last_report
        return (r is not None and r.patches is not None
                and any(v.in_progress for v in r.patches.verified)
                and time.time() - self.checked_at >= HALF_STATE_MAX)

    async def _guest_ran_since_check(self) -> bool:
        """Every vCPU ran (or went idle) since the last full check, as the host sees
        it; True where the host cannot tell, and HALF_STATE_MOST seconds after the
        check whatever it says."""
        if self._checked_run is None or time.time() - self.checked_at >= HALF_STATE_MOST:
            return True
        now = await self.vm.progress()
        return now is None or progressed(self._checked_run, now)

    async def _kernel_gone(self, err: KscanError) -> None:
        """The kernel is not where it was: a reboot, or its mappings were torn down."""
        self._drop_reference()
        await self.emit("vm_booting", message=f"kernel no longer found: {err.message}")

    async def _on_tamper(self, ex: Examined, golden: GoldenSet, report: CheckReport) -> None:
        """Report first (the event is in the database before anything else happens),
        then act, then write the forensic copy — the last two in a task of this
        watcher's, so neither holds the slow-path slot this runs under, and a failing
        disk can neither suppress the event nor delay the pause."""
        action = self.ctx.action
        try:
            copy: ForensicCopy | Exception = collect_forensics(
                self.ctx.forensics_dir, self.name, report, self.vm.mem, ex.normalized,
                golden.regions)
        except Exception as err:  # the copy is evidence, the event is the detection
            copy = err
        ev = await self.emit(
            "tamper", action=action.describe(),
            forensics=str(copy.dir) if isinstance(copy, ForensicCopy) else None,
            build_id=report.build_id, slide=hex_addr(report.slide), seen_at=self.seen_at,
            hint=report.hint, **tamper_fields(report),
            patched=report.patches.to_json() if report.patches else None,
        )
        task = asyncio.get_running_loop().create_task(
            self._act(ev, copy), name=f"act:{self.name}")
        self._acting.add(task)
        task.add_done_callback(self._acting.discard)

    async def _act(self, ev: dict[str, Any], copy: ForensicCopy | Exception) -> None:
        async with self._act_lock:  # one VM's detections are acted on in order
            action = self.ctx.action
            if action.kind is ActionKind.PAUSE:
                try:
                    await self.vm.pause()
                    state = await self.vm.run_state()
                    await self.emit("action", action="pause", ok=state.status == "paused",
                                    run_state=state.status)
                except Exception as err:
                    await self.emit("action", action="pause", ok=False,
                                    error=_describe(err))
            elif action.kind is ActionKind.EXEC:
                try:
                    result = await run_exec(action.argv, ev)
                except Exception as err:  # never lose the action event nor the copy
                    result = {"ok": False, "error": _describe(err)}
                await self.emit("action", action=action.describe(), **result)
            try:
                if isinstance(copy, Exception):
                    raise copy
                await asyncio.to_thread(write_forensics, copy)
            except Exception as err:
                await self.emit("forensics_failed", forensics=ev.get("forensics"),
                                message=_describe(err),
                                hint="the detection stands (see the tamper event); fix "
                                     "--forensics-dir (writable, space left)")

    async def _finish_actions(self) -> None:
        """Let this VM's actions finish (bounded by the hook timeout) when it goes."""
        if self._acting:
            _, pending = await asyncio.wait(set(self._acting), timeout=EXEC_TIMEOUT + 5)
            for t in pending:
                t.cancel()


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, KscanError) else f"{type(err).__name__}: {err}"


def _change_set(report: CheckReport) -> frozenset[Any]:
    """What a tampering is, for reporting each distinct one once: every changed page
    with the bytes it now holds (its keyed hash: a second, different change in an
    already reported page is a new tampering, even past the bytes the ranges show),
    every finding, and under --strict the verified patching."""
    out: list[Any] = [(m.region, m.page, m.basis, m.content,
                       tuple((r.start, r.end, r.after) for r in m.ranges))
                      for m in report.mismatches]
    out += [(f.kind, f.message) for f in report.findings]
    if report.strict and report.patches is not None:
        out.append(("patched", report.patches.fingerprint()))
    return frozenset(out)


def _summary(report: CheckReport) -> dict[str, Any]:
    return {
        "per_vm_baseline_taken": report.per_vm_baseline_taken,
        "regions": {r.name: {"pages": r.pages, "golden_checked": r.golden_pages,
                             "per_boot_checked": len(r.per_boot_pages),
                             "accepted": len(r.accepted_pages)} for r in report.regions},
    }

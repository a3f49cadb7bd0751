"""One VM's life under `kscan run`: attach, wait for boot, check, then watch.

    attach ──► booting ──► identified ──► first check ──► watching ◄──┐
                 ▲  (retry: not booted, no profile,      │  fast scan │ slow path on
                 │   no baseline)                         └────────────┘ any change
                 └──────────── kernel gone (reboot) ◄────────┘

Fast scans (`scanner.fastpath`) run on the event loop. Any difference takes the slow
path in the engine's worker threads: when only region bytes changed, re-read just those
regions through the translations already proven; otherwise re-locate the kernel
(translations included); then normalize and verify page by page (`scanner.verify`).
A tampering is reported once per distinct set of changes; when the VM matches its
baselines again, `tamper_cleared` says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from kscan.errors import KscanError
from scanner.actions import run_exec, save_forensics
from scanner.errors import BaselineMissing, ProfileError, QmpError, VmStateError
from scanner.fastpath import (
    Reference,
    check_memory,
    check_registers,
    make_reference,
)
from scanner.kernel import REGIONS
from scanner.oneshot import Examined, check_examined, examine, reexamine
from scanner.verify import CheckReport
from scanner.vm import VmHandle
from translate import BackendError, TranslationError

if TYPE_CHECKING:
    from scanner.engine import Engine

__all__ = ["VmWatcher"]

T = TypeVar("T")

log = logging.getLogger("kscan.watch")

BOOT_POLL = 2.0
RETRY_MISSING = 30.0  # no profile / no baseline: look again this often


class VmGone(Exception):
    """The VM (or its QMP connection) went away."""


class VmWatcher:
    def __init__(self, engine: Engine, vm: VmHandle, source: str) -> None:
        self.engine = engine
        self.vm = vm
        self.name = vm.name
        self.source = source
        self.ref: Reference | None = None
        self.slide: int | None = None  # of the kernel last checked (a change: reboot)
        self.reported: frozenset[Any] | None = None  # the change set last reported
        self.scans = 0
        self.state = "attached"
        self.seen_at: float | None = None  # when the fast path last saw a difference
        self.last: Examined | None = None  # the last check, without its region copies
        self.last_report: CheckReport | None = None

    # -- helpers ---------------------------------------------------------------------
    async def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        return await self.engine.sink.emit(event, self.name, **fields)

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
            self.engine.scheduler.remove(self.name)
            self._drop_reference()
            try:
                await self.vm.close()
            except Exception as err:  # closing must not mask why we stopped
                log.debug("closing %s: %s", self.name, err)

    async def _run(self) -> None:
        self.engine.scheduler.add(self.name)
        while True:
            ex = await self._until_checkable()
            await self._checked(ex, first=True)
            del ex  # ~19 MB of region copies
            while self.ref is not None:
                await asyncio.sleep(self.engine.scheduler.interval(self.name))
                await self._scan()

    async def _until_checkable(self) -> Examined:
        """Wait until the kernel has booted, is identified, and has a baseline. The
        returned Examined holds a slow-path slot until its full check is done."""
        said: set[str] = set()
        self.state = "booting"
        while True:
            await self.engine.slow_slots.acquire()
            try:
                ex = await self._slow(self._examine)
                await self.engine.golden(ex)  # BaselineMissing if there is none
                return ex
            except BaseException as err:
                self.engine.slow_slots.release()
                wait = await self._not_checkable(err, said)
                if wait is None:
                    raise
            await asyncio.sleep(wait)

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

    async def _examine(self) -> Examined:
        state = await self.vm.run_state()
        if state.status in ("shutdown", "internal-error", "guest-panicked"):
            raise VmGone(f"VM is {state.status}")
        profiles = await self.engine.profiles()
        return await examine(self.vm, profiles, self.engine.timed_in_worker)

    async def _slow(self, work: Callable[[], Awaitable[T]], urgent: bool = False) -> T:
        """Slow-path work waits for the budget like scans do: it reserves the usual
        slow-path cost, is charged what it really uses, then the reservation is
        returned — so a fleet attaching at once does not break the CPU budget."""
        sched = self.engine.scheduler
        expected = sched.slow_cost
        await sched.acquire(expected, urgent=urgent)
        before = sched.charged
        try:
            return await work()
        finally:
            sched.record_slow(sched.charged - before)
            sched.settle(expected, 0.0)

    async def _checked(self, ex: Examined, first: bool) -> CheckReport:
        try:
            return await self._full_check(ex, first)
        finally:
            self.engine.slow_slots.release()

    # -- checks ----------------------------------------------------------------------
    async def _full_check(self, ex: Examined, first: bool) -> CheckReport:
        report = await check_examined(self.engine.store, ex, self.name,
                                      await self.engine.golden(ex), self.engine.timed_in_worker)
        partial = len(ex.normalized) < len(REGIONS)
        if partial and self.ref is not None and self.last_report is not None:
            # Only some regions were re-read (their translations proven unchanged): the
            # others keep their verdicts, and only their reference digests move.
            verdicts = {r.name: r for r in self.last_report.regions}
            verdicts.update((r.name, r) for r in report.regions)
            report = dataclasses.replace(report, regions=tuple(verdicts[n] for n in REGIONS),
                                         per_vm_baseline_taken=False)
            self.ref.digests.update(ex.raw_digests)
        else:
            self._drop_reference()
            self.ref = make_reference(self.vm.mem, ex.lk, ex.vcpus, ex.space.pgd,
                                      ex.space.top_shift, ex.raw_digests)
        self.slide = ex.lk.slide
        # Keep what a partial re-check needs — not the region copies (~19 MB) and not
        # the decoded IDT gates.
        self.last = dataclasses.replace(ex, lk=dataclasses.replace(ex.lk, gates=()),
                                        normalized={}, raw_digests={})
        self.last_report = report
        self.state = "watching"
        if first:
            self.engine.scheduler.mark_hot(self.name)
            await self.emit("vm_identified", build_id=ex.lk.profile.build_id,
                            release=ex.lk.profile.release, slide=ex.lk.slide,
                            boot_profile=ex.boot.key,
                            per_vm_baseline_taken=report.per_vm_baseline_taken)
        changes = frozenset(
            [(m.region, m.page, m.basis) for m in report.mismatches]
            + [(f.kind, f.message) for f in report.findings])
        if report.tampered:
            if changes != self.reported:
                self.reported = changes
                await self._on_tamper(ex, report)
        else:
            if self.reported:
                await self.emit("tamper_cleared", message="VM matches its baselines again")
            elif first:
                await self.emit("vm_clean", **_summary(report))
            self.reported = frozenset()
        return report

    async def _scan(self) -> None:
        assert self.ref is not None
        expected = self.engine.scheduler.cost(self.name)
        await self.engine.scheduler.acquire(expected)
        vcpus = await self.vm.refresh_vcpus()
        # The fast path runs right here on the event loop: ~1-2 ms of hashing (with
        # the GIL released) per VM. Handing it to a worker thread cost more CPU in
        # futures and wake-ups than it saved; under a CPU budget below one core the
        # parallelism buys nothing. Slow paths (tens of ms) do go to the workers.
        t0 = time.thread_time()
        res = check_registers(self.ref, self.vm.mem, vcpus)
        if res.ok:
            res = check_memory(self.ref, self.vm.mem)
        cost = time.thread_time() - t0
        self.engine.scheduler.record(self.name, cost)
        self.engine.scheduler.settle(expected, cost)
        self.scans += 1
        self.engine.scans += 1
        if res.ok:
            return
        log.info("%s: %s %s: slow path", self.name, res.reason, ",".join(res.changed))
        self.seen_at = time.time()
        self.engine.scheduler.mark_hot(self.name)
        await self.engine.slow_slots.acquire()
        last = self.last
        try:
            if res.reason == "region bytes changed" and last is not None \
                    and "idt" not in res.changed:
                # Translations and registers proven unchanged: re-read just what changed.
                # (An IDT change takes the full path: its gates must be decoded again.)
                ex = await self._slow(lambda: reexamine(
                    self.vm, last, res.changed, self.engine.timed_in_worker), urgent=True)
            else:
                ex = await self._slow(self._examine, urgent=True)
        except (VmStateError, TranslationError, ProfileError) as err:
            self.engine.slow_slots.release()
            # The kernel is not where it was: a reboot, or its mappings were torn down.
            self._drop_reference()
            await self.emit("vm_booting", message=f"kernel no longer found: {err.message}")
            return
        except BaseException:
            self.engine.slow_slots.release()
            raise
        if self.slide is not None and ex.lk.slide != self.slide:
            await self.emit("vm_rebooted", slide=ex.lk.slide)
            self.reported = None
        await self._checked(ex, first=False)

    async def _on_tamper(self, ex: Examined, report: CheckReport) -> None:
        eng = self.engine
        golden, _ = await eng.golden(ex)
        forensics = save_forensics(eng.forensics_dir, self.name, report, ex.lk, self.vm.mem,
                                   ex.normalized, golden)
        action = eng.action
        ev = await self.emit(
            "tamper", action=action.describe(), forensics=str(forensics),
            build_id=report.build_id, slide=report.slide, seen_at=self.seen_at,
            hint=report.hint,
            mismatches=[m.to_json() for m in report.mismatches],
            findings=[f.to_json() for f in report.findings],
        )
        if action.kind == "pause":
            try:
                await self.vm.pause()
                state = await self.vm.run_state()
                await self.emit("action", action="pause", ok=state.status == "paused",
                                run_state=state.status)
            except KscanError as err:
                await self.emit("action", action="pause", ok=False, error=str(err))
        elif action.kind == "exec":
            result = await run_exec(action.argv, ev)
            await self.emit("action", action=action.describe(), **result)


def _summary(report: CheckReport) -> dict[str, Any]:
    return {
        "per_vm_baseline_taken": report.per_vm_baseline_taken,
        "regions": {r.name: {"pages": r.pages, "golden_checked": r.golden_pages,
                             "per_boot_checked": len(r.per_boot_pages),
                             "accepted": len(r.accepted_pages)} for r in report.regions},
    }

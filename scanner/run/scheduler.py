"""When to scan each VM: fixed or adaptive intervals under a CPU budget.

`--interval SECONDS`: every VM is scanned every SECONDS.

`--interval auto` (the default) adapts per VM:

* each VM's scan cost c_i is an EWMA of the CPU seconds its fast-path scans take;
* the budget B (`--cpu-budget PERCENT` of one core, default 10 %) gives the shortest
  period P the whole fleet can afford: P = Σ (c_i / w_i) / B, so that scanning every
  VM every P·w_i seconds costs at most B;
* a VM's weight w_i is 0.5 while it is "hot" — attached, rebooted or changed in the
  last `HOT_SECONDS` — so it is rescanned twice as often, and 1 otherwise;
* the interval P·w_i is clamped to [--min-interval, --max-interval].

On top, a token bucket is the hard cap: every scan reserves its expected cost from a
bucket that refills at B CPU-seconds per second (at most `BURST_SECONDS` of credit),
and waits when the bucket is in debt. Routine fast passes get their turns from the
pacer (`scanner.run.pacer`): VMs due at about the same time are released together, oldest
first, while the bucket has credit — a few wake-ups per second for the whole fleet, not
one per VM. Slow-path work (first checks, changes) is charged to the same bucket (and
waits in `acquire`), so bursts of it delay routine scans instead of breaking the budget.
Once a second the whole process's CPU time is reconciled with what was charged: the
rest (event loop, database thread, event writer) is charged too, and a feedback factor
on P steers the process's measured CPU rate to the budget — so the budget holds for the
whole process, and is used, not left idle. One exception: the CPU of the metrics
server's threads (`exempt`), bounded by its own pacing and cache, is not charged — a
client scraping in a loop must not be able to delay scans.

**Start-up.** At start the bucket refills at `--startup-budget` (default one core)
instead, until every VM attached by then has had its first verdict (or turned out not
checkable yet): first checks of a whole fleet are done in a burst, not at 10 % of a
core. VMs that appear later (a host booting its fleet, a migration wave) open such a
burst again, until each of them has its first verdict too. P is computed from
`--cpu-budget` all along (routine scans keep their steady rhythm meanwhile); the
feedback factor and the CPU-rate EWMA are frozen during a burst — after the first one
they start afresh, after a later one they go on from where they stood — so nothing
first checks cost leaks into the steady state. The cost EWMA c_i learns from fast
passes only.

**One VM's slow paths have a share.** A guest's root can make its kernel change in
a loop: flip bytes, or switch the function tracer on and off (every switch is a `.text`
re-check of ~35,000 ftrace sites). Each change is a slow path charged to the one
bucket, so without a limit one guest could spend the budget of the whole fleet and
stretch every other VM's period without bound. So the worker CPU each VM's watcher
causes (examine, verify, module-list reads: `charge_vm`) fills a per-VM level that
drains at `SLOW_SHARE` of the budget. Up to an allowance of `SLOW_ALLOWANCE_S` seconds of
that share, a VM's slow paths run as before (a change is localized at once, ahead of
routine scans). Beyond it, its next slow path waits until the level is back at the
allowance (`slow_wait`), and then queues like routine work instead of skipping ahead.
So in the long run, one VM's re-checks use at most `SLOW_SHARE` of the budget, and the
rest of the fleet keeps its period. The waiting VM's change is not hidden: the watcher
reports it (`slow_paced`) before it waits.

**The measured period.** P is a target; what the fleet gets can be longer (the bucket
in debt, slow paths queued ahead, an event loop behind). Each fast pass of a VM (the
`record` of its cost) also times the interval since that VM's previous one; a VM's
measured interval is an EWMA of those (weight `MEASURED_EWMA`), and never less than the
time since its last pass (a VM that stopped being scanned shows it). `measured_period()`
is the fleet median of the per-VM figures — the period a typical VM is really scanned
at (a hot VM counts once, at its P/2) — and `target()` is P (`--interval` when fixed).
`stats.period_s` / `kscan_period_seconds` report the first, `period_target_s` /
`kscan_period_target_seconds` the second.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from dataclasses import dataclass

from scanner.check.fastpath import KEYED_EVERY_S
from scanner.run.pacer import Pacer

__all__ = ["Policy", "Scheduler"]

HOT_SECONDS = 300.0
PERIOD_REFRESH = 0.5
RATE_EWMA = 0.1
OVERHEAD_MIN, OVERHEAD_MAX = 0.5, 20.0
BURST_SECONDS = 2.0
EWMA = 0.2
#: Cost assumed for a VM not yet measured (CPU seconds per fast scan).
INITIAL_COST = 0.005
#: A keyed pass's cost over a plain one's (AES-GMAC vs seeded xxh3 over guest memory:
#: 4.8-5.7 measured here): how a VM's first estimate is guessed from a keyed pass.
KEYED_COST_RATIO = 5.0
#: With room in the budget, a VM's keyed pass comes at least every this many of its
#: periods, sooner than `Policy.keyed_every` (see `Scheduler.keyed_every`).
KEYED_PASSES = 16
#: The budget has room for keyed passes every KEYED_PASSES periods when the fleet's fast
#: passes, keyed ones included, would fit it with this much to spare.
KEYED_ROOM_MARGIN = 1.25
#: Weight of the newest interval in a VM's measured scan interval (EWMA).
MEASURED_EWMA = 0.3
#: In the long run, one VM's slow paths (the worker CPU its watcher causes) may use this
#: share of the budget once they have spent their allowance...
SLOW_SHARE = 0.25
#: ... which is this many seconds of that share, spent at once (at a 10 % budget,
#: 0.75 CPU-s: ~10 tamper cycles, or a check of a kernel with the function tracer on).
SLOW_ALLOWANCE_S = 30.0


@dataclass(frozen=True)
class Policy:
    auto: bool = True
    fixed: float = 10.0  # seconds, when not auto
    budget: float | None = 0.10  # fraction of one core; None: no cap
    min_interval: float = 1.0
    max_interval: float = 300.0
    #: Fraction of one core until every VM has its first verdict (None: no burst;
    #: `kscan run --startup-budget`, default 100 %).
    startup_budget: float | None = None
    #: Seconds between two keyed comparisons of a VM (`kscan run --keyed-every`;
    #: `scanner.check.fastpath.keyed_due`).
    keyed_every: float = KEYED_EVERY_S

    def describe(self) -> str:
        iv = "auto" if self.auto else f"{self.fixed:g}s"
        b = f"{self.budget * 100:g}% of one core" if self.budget else "no CPU cap"
        if self.budget and self.startup_budget and self.startup_budget > self.budget:
            b += f" ({self.startup_budget * 100:g}% while a VM awaits its first verdict)"
        return (f"interval {iv}, {b}, bounds {self.min_interval:g}-{self.max_interval:g}s, "
                f"keyed every {self.keyed_every:g}s")


class Scheduler:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._costs: dict[str, float] = {}
        self._measured: set[str] = set()
        self._hot_until: dict[str, float] = {}
        self._tokens = (policy.budget or 0.0) * BURST_SECONDS
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()
        self._queued = 0  # waiters in `acquire` (`try_acquire` does not overtake them)
        self.charged = 0.0  # CPU seconds charged in total
        #: EWMA of what one slow path (examine + verify) costs, to reserve before one.
        self.slow_cost = 0.05
        #: Feedback factor on the period, so the whole process (event loop, database,
        #: events, slow paths included) runs at its budget (see `reconcile`).
        self.overhead = 1.0
        self._period, self._period_at = policy.min_interval, -1e9
        self._total_cost = 0.0  # the fleet's fast passes per period, at the last refresh
        self._proc_mark = time.process_time()
        self._charged_mark = 0.0
        #: CPU seconds spent outside the scan work and never charged to the budget
        #: (the metrics server's threads: `exempt`); added to from other threads.
        self.exempted = 0.0
        self._exempt_mark = 0.0
        self._exempt_lock = threading.Lock()
        self._wall_mark = time.monotonic()
        #: The process's CPU use, CPU seconds per second (EWMA, ~10 s).
        self.rate = policy.budget or 0.0
        #: Whether this policy has start-up bursts at all.
        self._bursts = bool(policy.budget and policy.startup_budget
                            and policy.startup_budget > policy.budget)
        #: A start-up burst: on until every VM expected has had its first verdict.
        self.starting = self._bursts
        #: Start-up bursts so far (the first at start, one more per later wave of VMs).
        self.bursts = 1 if self.starting else 0
        self._pending: set[str] = set()
        self._expected_any = False
        #: Per VM: monotonic time of its last fast pass, and its measured interval.
        self._last_pass: dict[str, float] = {}
        self._intervals: dict[str, float] = {}
        #: Per VM: (level, monotonic time) of its slow paths' CPU, draining at
        #: SLOW_SHARE of the budget (see the module docstring).
        self._slow_levels: dict[str, tuple[float, float]] = {}
        #: Slow paths that waited for their VM's share, in total.
        self.slow_paced = 0
        #: Releases routine fast passes in batches (`scanner.run.pacer`).
        self.pacer = Pacer(self)
        if self.starting:
            self._tokens = self._budget() * BURST_SECONDS

    def _budget(self) -> float:
        """The bucket's refill rate now: the start-up budget during the burst."""
        b = self.policy.budget or 0.0
        if self.starting and self.policy.startup_budget:
            return max(b, self.policy.startup_budget)
        return b

    # -- the start-up burst -------------------------------------------------------------
    def expect(self, vm: str) -> None:
        """A VM was attached: it is waited for (its first verdict) under the start-up
        budget — in the burst under way, or in a new one if the last has ended."""
        if not self._bursts:
            return
        if not self.starting:
            self._refill()  # what accrued so far accrued at the steady rate
            self.starting = True
            self.bursts += 1
        self._pending.add(vm)
        self._expected_any = True

    def verdict(self, vm: str) -> None:
        """`vm` had its first verdict, or cannot be checked yet (booting, no profile or
        baseline): the burst no longer waits for it."""
        self._pending.discard(vm)
        if self._expected_any and not self._pending:
            self.end_startup()

    def pending(self) -> int:
        return len(self._pending)

    def end_startup(self) -> None:
        """Settle to `--cpu-budget`: the bucket keeps any debt but no credit beyond the
        steady burst, and the CPU-rate EWMA and its feedback go on from here — afresh
        after the first burst, from where they stood (frozen) after a later one."""
        if not self.starting:
            return
        self._refill()
        self.starting = False
        self._pending.clear()
        b = self.policy.budget or 0.0
        self._tokens = min(b * BURST_SECONDS, self._tokens)
        if self.bursts <= 1:
            self.rate = b
        self._proc_mark, self._charged_mark = time.process_time(), self.charged
        self._exempt_mark = self.exempted
        self._wall_mark = time.monotonic()
        self._stale()

    # -- bookkeeping -----------------------------------------------------------------
    def add(self, vm: str) -> None:
        self._costs.setdefault(vm, INITIAL_COST)
        self.mark_hot(vm)

    def _stale(self) -> None:
        self._period_at = -1e9

    def remove(self, vm: str) -> None:
        self._costs.pop(vm, None)
        self._measured.discard(vm)
        self._hot_until.pop(vm, None)
        self._last_pass.pop(vm, None)
        self._intervals.pop(vm, None)
        self._stale()
        if vm in self._pending:
            self.verdict(vm)

    def mark_hot(self, vm: str) -> None:
        self._hot_until[vm] = time.monotonic() + HOT_SECONDS
        self._stale()

    def record(self, vm: str, cpu_seconds: float, keyed: bool = False) -> None:
        """A fast-path scan of `vm` took `cpu_seconds` (the first one replaces the
        initial guess outright). Also times the interval since its previous pass.

        A keyed pass (one every `keyed_every` seconds, and the resume pass after a restart) costs
        4-6x a plain one: it does not teach the estimate, which prices the plain
        passes the pacer reserves for (the keyed extra is a share of the process's CPU
        like any overhead, which `reconcile` steers P by). Taught, the resume pass made
        every VM's first estimate 5x too high, and a warm restart used half its budget
        for minutes. With no estimate yet it gives one, as a plain pass would cost."""
        now = time.monotonic()
        last = self._last_pass.get(vm)
        self._last_pass[vm] = now
        if last is not None:
            old_iv = self._intervals.get(vm)
            self._intervals[vm] = now - last if old_iv is None else (
                (1 - MEASURED_EWMA) * old_iv + MEASURED_EWMA * (now - last))
        if keyed:
            if vm not in self._measured:  # a guess until its first plain pass
                self._costs[vm] = cpu_seconds / KEYED_COST_RATIO
            return
        if vm not in self._measured:
            self._measured.add(vm)
            self._costs[vm] = cpu_seconds
            return
        old = self._costs.get(vm, cpu_seconds)
        self._costs[vm] = (1 - EWMA) * old + EWMA * cpu_seconds

    def record_slow(self, cpu_seconds: float) -> None:
        self.slow_cost = (1 - EWMA) * self.slow_cost + EWMA * cpu_seconds

    # -- one VM's share of slow-path CPU ---------------------------------------------
    def _slow_rate(self) -> float:
        """CPU seconds per second one VM's slow-path level drains at."""
        return SLOW_SHARE * self._budget()

    def slow_allowance(self) -> float:
        """CPU seconds of slow paths a VM may spend at once before they are paced."""
        return SLOW_SHARE * (self.policy.budget or 0.0) * SLOW_ALLOWANCE_S

    def slow_level(self, vm: str, now: float | None = None) -> float:
        """The VM's slow-path CPU not yet drained (CPU seconds)."""
        got = self._slow_levels.get(vm)
        if got is None:
            return 0.0
        now = time.monotonic() if now is None else now
        level, at = got
        return max(0.0, level - self._slow_rate() * max(0.0, now - at))

    def charge_vm(self, vm: str, cpu_seconds: float) -> None:
        """Worker CPU `vm`'s watcher caused (already charged to the bucket): it fills
        the VM's slow-path level."""
        if cpu_seconds > 0 and self.policy.budget:
            now = time.monotonic()
            self._slow_levels[vm] = (self.slow_level(vm, now) + cpu_seconds, now)

    def slow_wait(self, vm: str) -> float:
        """Seconds `vm`'s next slow path must wait for its level to drain back to the
        allowance (0: within it; always 0 without a budget)."""
        if not self.policy.budget:
            return 0.0
        over = self.slow_level(vm) - self.slow_allowance()
        return over / self._slow_rate() if over > 0 else 0.0

    async def slow_turn(self, vm: str) -> bool:
        """Wait until `vm` may start a slow path; True if it had to wait (it is over its
        allowance: its slow path then queues instead of skipping ahead)."""
        wait = self.slow_wait(vm)
        if wait <= 0:
            return False
        self.slow_paced += 1
        while wait > 0:  # the budget (so the drain rate) may change meanwhile
            await asyncio.sleep(wait)
            wait = self.slow_wait(vm)
        return True

    def _prune_slow(self, now: float) -> None:
        """Forget the levels that have drained (VMs that come and go stay bounded)."""
        for vm in [v for v in self._slow_levels if self.slow_level(v, now) <= 0]:
            del self._slow_levels[vm]

    def cost(self, vm: str) -> float:
        return self._costs.get(vm, INITIAL_COST)

    # -- intervals -------------------------------------------------------------------
    def _weight(self, vm: str, now: float) -> float:
        return 0.5 if self._hot_until.get(vm, 0.0) > now else 1.0

    def period(self) -> float:
        """P: the period at which the fleet's fast scans fit the budget (recomputed at
        most every `PERIOD_REFRESH` seconds: it is a sum over the whole fleet)."""
        p = self.policy
        if not p.budget:
            return p.min_interval
        now = time.monotonic()
        if now - self._period_at > PERIOD_REFRESH:
            total = sum(c / self._weight(vm, now) for vm, c in self._costs.items())
            self._period = max(p.min_interval, total * self.overhead / p.budget)
            self._period_at, self._total_cost = now, total
        return self._period

    def keyed_every(self) -> float:
        """Seconds between two keyed passes of a VM: `Policy.keyed_every`, or every
        KEYED_PASSES periods if that is sooner and the budget has room for it — the
        period is then held by `--min-interval` or a fixed `--interval`, not by the
        budget, and keying one pass in KEYED_PASSES (KEYED_COST_RATIO times a plain one)
        would not lengthen it. So a small fleet keeps a bound of seconds that costs it
        nothing, and a fleet the budget binds keeps the bound in time, at a share of
        P / keyed_every of its passes (docs/design.md, Keyed comparison)."""
        p = self.policy
        base = p.min_interval if p.auto else p.fixed
        sooner = KEYED_PASSES * base
        if sooner >= p.keyed_every:
            return p.keyed_every
        if p.budget:
            self.period()  # refreshes the fleet's cost
            load = self._total_cost * max(1.0, self.overhead) * KEYED_ROOM_MARGIN * (
                1 + (KEYED_COST_RATIO - 1) / KEYED_PASSES)
            if load / p.budget > base:
                return p.keyed_every
        return sooner

    def target(self) -> float:
        """The period the scheduler aims at: P, or the fixed `--interval`."""
        return self.period() if self.policy.auto else self.policy.fixed

    def measured_period(self) -> float | None:
        """The period VMs are really scanned at: the fleet median of each VM's measured
        interval (at least the time since its last pass); None before any VM had two
        fast passes."""
        if not self._intervals:
            return None
        now = time.monotonic()
        last = self._last_pass
        return float(statistics.median(
            max(iv, now - last.get(vm, now)) for vm, iv in self._intervals.items()))

    def measured_or_target(self) -> float:
        """`measured_period`, or the target until there is a measurement."""
        m = self.measured_period()
        return self.target() if m is None else m

    def interval(self, vm: str) -> float:
        return self.turn_interval(self.is_hot(vm, time.monotonic()))

    def is_hot(self, vm: str, now: float) -> bool:
        return self._hot_until.get(vm, 0.0) > now

    def turn_interval(self, hot: bool) -> float:
        """The interval of a hot or cool VM: P·w clamped to the bounds, or the fixed
        `--interval`."""
        p = self.policy
        if not p.auto:
            return p.fixed
        iv = self.period() * (0.5 if hot else 1.0)
        return min(p.max_interval, max(p.min_interval, iv))

    # -- the hard cap ----------------------------------------------------------------
    def _refill(self) -> None:
        b = self._budget()
        now = time.monotonic()
        if b:
            self._tokens = min(b * BURST_SECONDS, self._tokens + (now - self._stamp) * b)
        self._stamp = now

    def reserve(self, expected: float) -> bool:
        """Reserve `expected` CPU seconds unless the bucket is in debt (then nothing is
        reserved and False returned): the pacer's synchronous take for a routine pass."""
        if not self.policy.budget:
            return True
        self._refill()
        if self._tokens < 0:
            return False
        self._tokens -= expected
        return True

    def debt_seconds(self) -> float:
        """Seconds until the bucket is out of debt at the refill rate now (0: it is not)."""
        b = self._budget()
        if not b:
            return 0.0
        self._refill()
        return max(0.0, -self._tokens) / b

    def turn(self, vm: str) -> asyncio.Future[float]:
        """`vm`'s next routine fast pass: a future set, once the VM is due and the bucket
        has credit, to the CPU seconds reserved for it (`scanner.run.pacer`)."""
        return self.pacer.turn(vm)

    async def acquire(self, expected: float, *, urgent: bool = False) -> None:
        """Wait while the bucket is in debt, then reserve `expected` CPU seconds.
        Waiters queue on a lock, so they go one by one (FIFO), not as a herd. `urgent`
        work — localizing a change the fast path just saw — skips the queue (it still
        waits for the debt to be repaid, so the budget holds on average)."""
        if not self.policy.budget:
            return
        if urgent:
            self._refill()
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self._budget())
                self._refill()
            self._tokens -= expected
            return
        self._queued += 1
        try:
            async with self._lock:
                self._refill()
                if self._tokens < 0:
                    await asyncio.sleep(-self._tokens / self._budget())
                    self._refill()
                self._tokens -= expected
        finally:
            self._queued -= 1

    def exempt(self, cpu_seconds: float) -> None:
        """CPU another thread used on something the budget must not pay for (answering
        metrics scrapes: paced and cached, so bounded, but charged it would let a
        client scraping in a loop delay scans). Thread-safe."""
        if cpu_seconds > 0:
            with self._exempt_lock:
                self.exempted += cpu_seconds

    def reconcile(self) -> None:
        """Once a second: charge the CPU the process used beyond what was charged
        (event loop, database thread, event writer) to the bucket, and steer the
        period so the whole process uses its budget — no more, and not much less.

        `overhead` is a feedback factor on P: the process's measured CPU rate (an EWMA
        over ~10 s) is compared with the budget, and the factor moves towards making
        them equal. A model of the overhead (used ÷ counted) was tried first; it
        stayed skewed by warm-up work and left a third of the budget unused."""
        now, proc, charged = time.monotonic(), time.process_time(), self.charged
        exempted = self.exempted
        dt = max(1e-3, now - self._wall_mark)
        used = max(0.0, proc - self._proc_mark - (exempted - self._exempt_mark))
        counted = charged - self._charged_mark
        self._proc_mark, self._charged_mark, self._wall_mark = proc, charged, now
        self._exempt_mark = exempted
        b = self.policy.budget
        if not b:
            return
        self._prune_slow(now)
        uncounted = used - counted
        if uncounted > 0:
            self._refill()
            self._tokens -= uncounted
        if self.starting:
            return  # the burst steers nothing: the steady state starts afresh after it
        self.rate = (1 - RATE_EWMA) * self.rate + RATE_EWMA * used / dt
        # Multiplicative, damped, bounded: a long P when over budget, shorter when under.
        ratio = max(0.25, min(4.0, self.rate / b))
        self.overhead = max(OVERHEAD_MIN, min(OVERHEAD_MAX, self.overhead * ratio ** 0.2))
        self._stale()

    def settle(self, expected: float, actual: float) -> None:
        """Correct a reservation with what the work really cost."""
        self.charged += actual
        if self.policy.budget:
            self._refill()
            self._tokens = min(self._budget() * BURST_SECONDS,
                               self._tokens - (actual - expected))

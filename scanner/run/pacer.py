"""Turns for routine fast passes: due VMs released in batches, oldest first, under the budget.

Each VM's watcher asks for its next turn right after a fast pass (`Pacer.turn`); the
turn comes once the VM is due — its interval (`Scheduler.interval`: P, or P/2 while hot,
or the fixed `--interval`) after it asked — and the token bucket has credit, with the
pass's expected cost already reserved.

Why one pacer and not a timer per VM: on these hosts a process that wakes from idle pays
~0.15 ms of CPU per wake-up beyond its work (measured with a bare uvloop program: one
wake-up per 2 MB hash cost 0.25 ms per hash, batches of 25 cost 0.06), and kscan paid
~0.4 ms per fast pass outside the pass itself — as much as half the hashing. The pacer
wakes once for every VM due within `SLACK` of the first (up to `BATCH_CPU` of work at a
time), so the fleet's passes run back to back, a few wake-ups per second whatever the
fleet's size.

Order and fairness: entries wait in two heaps (hot and cool VMs) ordered by when they
asked, so the VM that has waited longest past its due time goes first. When the bucket
is in debt nothing is released; the pacer sleeps until the debt is repaid plus `TICK` of
credit, and then releases that credit's worth, oldest first — so under a budget that
cannot keep the target period every VM is still scanned in turn (the measured period
grows evenly instead of some VMs waiting whole periods). Slow paths keep their own
queue (`Scheduler.acquire`); they are not paced here.

The pacer is a task of the running loop, started by the first `turn` and ended when no
turn is awaited any more. A watcher cancelled while waiting leaves a cancelled future
behind, skipped when it comes to the top.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol

__all__ = ["BATCH_CPU", "SLACK", "TICK", "Pacer", "Schedule"]

#: Longest wait for the bucket's credit to build up to a batch (seconds).
TICK = 0.25
#: A turn due within this much of the first due one is released with it (seconds; at
#: most a tenth of the VM's interval, so short intervals stay short).
SLACK = 0.25
#: Expected CPU released at one time before the loop gets a turn (seconds).
BATCH_CPU = 0.05
#: Longest sleep of the pacer while turns are awaited: it re-reads P (which moves with the
#: fleet and the budget feedback) at least this often.
LONGEST_SLEEP = 1.0

_Entry = tuple[float, int, str, "asyncio.Future[float]"]


class Schedule(Protocol):
    """What the pacer needs of `scanner.run.scheduler.Scheduler`."""

    def is_hot(self, vm: str, now: float) -> bool: ...

    def turn_interval(self, hot: bool) -> float: ...

    def cost(self, vm: str) -> float: ...

    def reserve(self, expected: float) -> bool: ...

    def debt_seconds(self) -> float: ...


class Pacer:
    def __init__(self, sched: Schedule) -> None:
        self.sched = sched
        #: Waiting turns: hot VMs (interval P/2) and cool ones, by when they asked.
        self._heaps: dict[bool, list[_Entry]] = {True: [], False: []}
        self._seq = itertools.count()
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._wake_at = float("inf")
        #: Wake-ups of the pacer and turns released (for tests and the curious).
        self.wakeups = 0
        self.released = 0

    def waiting(self) -> int:
        """Turns awaited (a cancelled one counts until it comes to the top)."""
        return self._waiting

    def turn(self, vm: str) -> asyncio.Future[float]:
        """A future set to the CPU seconds reserved for `vm`'s next fast pass once it is
        due and the budget allows it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
        now = time.monotonic()
        hot = self.sched.is_hot(vm, now)
        heapq.heappush(self._heaps[hot], (now, next(self._seq), vm, fut))
        # Counted down when the turn leaves its heap (released, or a cancelled one
        # skipped at the top), not by a done-callback: that was one more loop callback
        # per fast pass.
        self._waiting += 1
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="pacer")
        elif now + self.sched.turn_interval(hot) < self._wake_at:
            self._poke()
        return fut

    def _poke(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def _head(self, hot: bool) -> _Entry | None:
        heap = self._heaps[hot]
        while heap and heap[0][3].done():  # cancelled while waiting
            heapq.heappop(heap)
            self._waiting -= 1
        return heap[0] if heap else None

    def _next(self, intervals: tuple[float, float] | None = None
              ) -> tuple[float, bool] | None:
        """(due time, hot) of the turn due first. `intervals`: the (cool, hot) turn
        intervals, if the caller has them already."""
        best: tuple[float, bool] | None = None
        for hot in (True, False):
            e = self._head(hot)
            if e is not None:
                due = e[0] + (intervals[hot] if intervals is not None
                              else self.sched.turn_interval(hot))
                if best is None or due < best[0]:
                    best = (due, hot)
        return best

    def release(self, now: float) -> bool:
        """Release the turns due by `now` (and within the slack), oldest first, while the
        bucket has credit — at most `BATCH_CPU` of expected work. True: more could go
        right away."""
        budget = 0.0
        # The intervals cannot change within one release: asked once, not per turn.
        intervals = (self.sched.turn_interval(False), self.sched.turn_interval(True))
        while True:
            nxt = self._next(intervals)
            if nxt is None:
                return False
            due, hot = nxt
            if due > now + min(SLACK, 0.1 * intervals[hot]):
                return False
            vm = self._heaps[hot][0][2]
            cost = self.sched.cost(vm)
            if not self.sched.reserve(cost):
                return False
            _, _, _, fut = heapq.heappop(self._heaps[hot])
            self._waiting -= 1
            fut.set_result(cost)
            self.released += 1
            budget += cost
            if budget >= BATCH_CPU:
                return True

    def _delay(self, now: float) -> float:
        nxt = self._next()
        if nxt is None:
            return LONGEST_SLEEP
        debt = self.sched.debt_seconds()
        if debt > 0 and nxt[0] <= now + SLACK:
            return min(LONGEST_SLEEP, debt + TICK)
        return min(LONGEST_SLEEP, max(0.0, nxt[0] - now))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting > 0:
            now = time.monotonic()
            self.wakeups += 1
            if self.release(now):
                await asyncio.sleep(0)  # let the released passes run, then go on
                continue
            delay = self._delay(now)
            self._wake_at = now + delay
            self._wakeup = loop.create_future()
            timer = loop.call_later(delay, self._poke)
            try:
                await self._wakeup
            finally:
                timer.cancel()
                self._wakeup = None
                self._wake_at = float("inf")

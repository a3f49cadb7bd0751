"""scanner.run.pacer: routine fast passes released in batches (few wake-ups for many VMs),
oldest first, only with the bucket's credit, with cancelled waiters skipped.

Release order and budget are checked with a fake clock (`release` called by hand);
batching and waking are checked on a real event loop with short intervals."""

from __future__ import annotations

import asyncio
import math
import time
from types import SimpleNamespace

import pytest

import scanner.run.pacer as pacer_mod
import scanner.run.scheduler as sched_mod
from scanner.run.pacer import BATCH_CPU, SLACK, TICK
from scanner.run.scheduler import Policy, Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def process_time(self) -> float:
        return 0.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    fake = SimpleNamespace(monotonic=c.monotonic, process_time=c.process_time)
    monkeypatch.setattr(sched_mod, "time", fake)
    monkeypatch.setattr(pacer_mod, "time", fake)
    return c


def scheduler(budget: float | None, costs: dict[str, float], *, hot: bool = False,
              fixed: float | None = None, min_interval: float = 0.01) -> Scheduler:
    s = Scheduler(Policy(auto=fixed is None, fixed=fixed or 0.0, budget=budget,
                         min_interval=min_interval))
    for vm, c in costs.items():
        s.add(vm)
        s.record(vm, c)
        if not hot:
            s._hot_until[vm] = 0.0
    s._stale()
    return s


def test_due_turns_go_oldest_first_and_only_with_credit(clock: FakeClock) -> None:
    """Ten VMs of 1/16 CPU-s at a 12.5 % budget: P = 5 s. Each asks in turn, 0.1 s
    apart; once due they are released in the order they asked, each with its cost
    reserved, and only while the bucket is not in debt."""
    costs = {f"vm{i}": 0.0625 for i in range(10)}
    s = scheduler(0.125, costs)
    assert s.period() == pytest.approx(5.0)

    async def go() -> list[str]:
        futs = {}
        for vm in costs:
            futs[vm] = s.turn(vm)
            clock.t += 0.1
        p = s.pacer
        clock.t += 5.0  # every one of them due
        # The bucket holds 0.25 CPU-s (2 s of credit): four passes take it to 0 (not in
        # debt), the fifth to -0.0625, and then nothing more goes (in batches of
        # BATCH_CPU: release says when more could go at once).
        while p.release(clock.t):
            pass
        done = [vm for vm, f in futs.items() if f.done()]
        assert done == [f"vm{i}" for i in range(5)]
        assert all(futs[vm].result() == 0.0625 for vm in done)
        assert s._tokens == pytest.approx(-0.0625)
        assert s.debt_seconds() == pytest.approx(0.5)
        clock.t += 0.5 + TICK  # the debt repaid, plus a tick of credit (0.03125)
        while p.release(clock.t):
            pass
        done2 = [vm for vm, f in futs.items() if f.done() and vm not in done]
        assert done2 == ["vm5"]  # one pass on that credit, then in debt again
        for f in futs.values():
            f.cancel()
        return done + done2

    assert asyncio.run(go()) == [f"vm{i}" for i in range(6)]


def test_nothing_is_released_before_it_is_due_but_the_slack_joins_a_batch(
        clock: FakeClock) -> None:
    s = scheduler(None, {"a": 0.001, "b": 0.001, "c": 0.001}, fixed=10.0)

    async def go() -> None:
        t0 = clock.t
        fa = s.turn("a")
        clock.t = t0 + SLACK / 2
        fb = s.turn("b")
        clock.t = t0 + SLACK * 2.5
        fc = s.turn("c")
        p = s.pacer
        p.release(t0 + 10.0 - SLACK - 0.01)  # a is not due within the slack yet
        assert not fa.done()
        p.release(t0 + 10.0)  # a is due; b (half a slack later) joins it, c does not
        assert fa.done() and fb.done() and not fc.done()
        fc.cancel()

    asyncio.run(go())


def test_a_hot_vm_due_earlier_goes_before_a_cool_one_that_asked_first(
        clock: FakeClock) -> None:
    s = scheduler(None, {"cool": 0.01, "hot": 0.01})
    s.policy = Policy(budget=1.0, min_interval=0.01)  # P from the costs: 0.01/1 + 0.02/1
    s.mark_hot("hot")
    s._stale()
    p_cool, p_hot = s.turn_interval(False), s.turn_interval(True)
    assert p_hot == pytest.approx(p_cool / 2)

    async def go() -> None:
        fc = s.turn("cool")
        clock.t += p_cool * 0.3
        fh = s.turn("hot")  # due at 0.8 P, the cool one at P
        clock.t += p_hot + 1e-6
        s.pacer.release(clock.t)
        assert fh.done() and not fc.done()
        fc.cancel()

    asyncio.run(go())


def test_a_batch_stops_at_batch_cpu_and_says_more_can_go(clock: FakeClock) -> None:
    cost = 1 / 64
    n = math.ceil(BATCH_CPU / cost) + 2
    s = scheduler(None, {f"v{i}": cost for i in range(n)}, fixed=1.0)

    async def go() -> None:
        futs = [s.turn(f"v{i}") for i in range(n)]
        clock.t += 1.0
        assert s.pacer.release(clock.t) is True
        assert sum(f.done() for f in futs) == math.ceil(BATCH_CPU / cost)
        assert s.pacer.release(clock.t) is False
        assert all(f.done() for f in futs)

    asyncio.run(go())


def test_cancelled_waiters_are_skipped_and_the_pacer_ends_without_waiters() -> None:
    s = scheduler(None, {"a": 0.001, "b": 0.001}, fixed=0.05)

    async def go() -> None:
        fa, fb = s.turn("a"), s.turn("b")
        fa.cancel()
        assert await asyncio.wait_for(fb, 2.0) == pytest.approx(0.001)
        await asyncio.sleep(0)
        assert s.pacer.waiting() == 0
        task = s.pacer._task
        assert task is not None
        await asyncio.wait_for(task, 2.0)  # nothing awaited: the pacer ends
        assert task.done() and task.exception() is None
        f = s.turn("a")  # and a new turn starts it again
        assert await asyncio.wait_for(f, 2.0) == pytest.approx(0.001)

    asyncio.run(go())


def test_a_turn_cancelled_behind_others_is_counted_down_and_the_pacer_still_ends() -> None:
    """Turns are counted down when they leave the heap (no done-callback per turn): one
    cancelled behind others leaves when it comes to the top, and the pacer ends."""
    s = scheduler(None, {"a": 0.001, "b": 0.001, "c": 0.001}, fixed=0.05)

    async def go() -> None:
        fa, fb, fc = s.turn("a"), s.turn("b"), s.turn("c")
        assert s.pacer.waiting() == 3
        fb.cancel()
        await asyncio.wait_for(asyncio.gather(fa, fc), 2.0)
        assert s.pacer.waiting() == 0 and s.pacer.released == 2
        task = s.pacer._task
        assert task is not None
        await asyncio.wait_for(task, 3.0)
        assert task.exception() is None

    asyncio.run(go())


def test_a_fleet_due_together_is_released_in_a_few_wake_ups_not_one_each() -> None:
    """200 VMs asking for turns within a few ms, on a real loop: one wake-up (plus the
    hops between batches of BATCH_CPU) releases them all, once due — not before."""
    n = 200
    s = scheduler(None, {f"v{i}": 0.001 for i in range(n)}, fixed=0.3)

    async def go() -> tuple[float, int]:
        t0 = time.monotonic()
        futs = [s.turn(f"v{i}") for i in range(n)]
        await asyncio.wait_for(asyncio.gather(*futs), 5.0)
        return time.monotonic() - t0, s.pacer.wakeups

    took, wakeups = asyncio.run(go())
    assert took >= 0.3 - 0.1 * 0.3 - 0.01  # released within the slack of being due
    batches = -(-n * 0.001 // BATCH_CPU)
    assert wakeups <= batches + 3, wakeups


def test_a_later_turn_due_first_wakes_a_sleeping_pacer() -> None:
    """The pacer sleeps until the first due turn (a cool VM, ~0.8 s away); a hot VM's
    turn due much sooner must not wait for that."""
    s = scheduler(1.0, {"cool": 0.4, "hot": 0.2})
    s.mark_hot("hot")
    s._stale()
    assert s.turn_interval(False) == pytest.approx(0.8)  # 0.4 + 0.2/0.5

    async def go() -> float:
        fc = s.turn("cool")
        await asyncio.sleep(0.05)  # the pacer is asleep until the cool turn is due
        t0 = time.monotonic()
        await asyncio.wait_for(s.turn("hot"), 2.0)  # due 0.4 s from now
        took = time.monotonic() - t0
        fc.cancel()
        return took

    took = asyncio.run(go())
    assert 0.4 - 0.05 <= took < 0.7, took

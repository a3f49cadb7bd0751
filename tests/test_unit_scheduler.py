"""scanner.run.scheduler: adaptive period under a CPU budget, hot VMs, fixed intervals, the
token bucket (real delays measured on the event loop's clock, exact delays with a fake
clock) and the cost EWMA. Expected values are computed by hand from the rules in
docs/operating.md."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

import scanner.run.scheduler as sched
from scanner.run.scheduler import BURST_SECONDS, EWMA, HOT_SECONDS, INITIAL_COST, Policy, Scheduler


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.cpu = 0.0  # process CPU seconds, advanced by tests that reconcile

    def monotonic(self) -> float:
        return self.t

    def process_time(self) -> float:
        return self.cpu


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replace the scheduler's view of time (not the global time module: asyncio uses it)."""
    c = FakeClock()
    monkeypatch.setattr(sched, "time", SimpleNamespace(monotonic=c.monotonic,
                                                       process_time=c.process_time))
    return c


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> list[float]:
    """Record the scheduler's asyncio.sleep calls; each advances the fake clock instead
    of sleeping."""
    got: list[float] = []

    async def fake_sleep(delay: float) -> None:
        got.append(delay)
        clock.t += delay

    monkeypatch.setattr(sched, "asyncio", SimpleNamespace(sleep=fake_sleep, Lock=asyncio.Lock))
    return got


def cool(s: Scheduler, clock: FakeClock) -> None:
    """Let every VM's hot window pass."""
    clock.t += HOT_SECONDS + 1


# -- period and intervals ----------------------------------------------------------------

def test_period_is_sum_of_costs_over_budget(clock: FakeClock) -> None:
    s = Scheduler(Policy(budget=0.10, min_interval=1.0, max_interval=300.0))
    for vm in ("a", "b", "c"):
        s.add(vm)
    cool(s, clock)
    # add() seeds INITIAL_COST; set known costs directly (the EWMA is tested below).
    s._costs.update({"a": 0.2, "b": 0.3, "c": 0.5})
    # P = (0.2 + 0.3 + 0.5) / 0.1 = 10 s; cold VMs: interval = P.
    assert s.period() == pytest.approx(10.0)
    for vm in ("a", "b", "c"):
        assert s.interval(vm) == pytest.approx(10.0)


def test_hot_vm_counts_double_and_gets_half_interval(clock: FakeClock) -> None:
    s = Scheduler(Policy(budget=0.10, min_interval=1.0, max_interval=300.0))
    s.add("cold")
    cool(s, clock)
    s.add("hot")  # added now: hot for HOT_SECONDS
    s._costs.update({"cold": 0.5, "hot": 0.5})
    # P = (0.5/1 + 0.5/0.5) / 0.1 = 15 s
    assert s.period() == pytest.approx(15.0)
    assert s.interval("cold") == pytest.approx(15.0)
    assert s.interval("hot") == pytest.approx(7.5)
    # Fleet cost rate at these intervals is exactly the budget.
    assert 0.5 / s.interval("cold") + 0.5 / s.interval("hot") == pytest.approx(0.10)
    # The hot window ends after HOT_SECONDS.
    clock.t += HOT_SECONDS - 1
    assert s.interval("hot") == pytest.approx(7.5)
    clock.t += 2
    assert s.period() == pytest.approx(10.0)
    assert s.interval("hot") == pytest.approx(10.0)
    # mark_hot (a reboot or a change) makes it hot again.
    s.mark_hot("cold")
    assert s.interval("cold") == pytest.approx(7.5)


def test_intervals_clamped_to_bounds(clock: FakeClock) -> None:
    s = Scheduler(Policy(budget=0.10, min_interval=2.0, max_interval=30.0))
    s.add("a")
    cool(s, clock)
    s._costs["a"] = 0.001  # P = 0.01 s → clamped up to min
    assert s.period() == 2.0
    assert s.interval("a") == 2.0
    s.mark_hot("a")  # P/2 would be 1 s, below min
    assert s.interval("a") == 2.0
    s._costs["a"] = 100.0  # hot: P = (100/0.5)/0.1 = 2000 s, P/2 = 1000 → clamped to max
    clock.t += sched.PERIOD_REFRESH + 0.01  # the fleet period is recomputed twice a second
    assert s.interval("a") == 30.0
    cool(s, clock)
    assert s.period() == pytest.approx(1000.0)  # period itself is not max-clamped
    assert s.interval("a") == 30.0


def test_empty_fleet_and_no_budget_give_min_interval(clock: FakeClock) -> None:
    assert Scheduler(Policy(budget=0.1, min_interval=3.0)).period() == 3.0
    for budget in (None, 0.0):
        s = Scheduler(Policy(budget=budget, min_interval=4.0, max_interval=50.0))
        s.add("a")
        s._costs["a"] = 1000.0
        assert s.period() == 4.0
        assert s.interval("a") == 4.0  # hot: P/2 = 2 clamped up to min


def test_fixed_interval_ignores_costs_heat_and_budget(clock: FakeClock) -> None:
    s = Scheduler(Policy(auto=False, fixed=7.0, budget=0.01, min_interval=10.0))
    s.add("a")  # hot
    s.add("b")
    s._costs["b"] = 99.0
    assert s.interval("a") == 7.0
    assert s.interval("b") == 7.0
    cool(s, clock)
    assert s.interval("a") == 7.0


def test_remove_drops_vm_from_period(clock: FakeClock) -> None:
    s = Scheduler(Policy(budget=0.1, min_interval=0.001))
    s.add("a")
    s.add("b")
    cool(s, clock)
    s._costs.update({"a": 1.0, "b": 3.0})
    assert s.period() == pytest.approx(40.0)
    s.remove("b")
    assert s.period() == pytest.approx(10.0)
    s.remove("never-added")  # no error
    assert s.cost("b") == INITIAL_COST  # unknown VMs report the initial guess


# -- costs EWMA --------------------------------------------------------------------------

def test_costs_ewma(clock: FakeClock) -> None:
    s = Scheduler(Policy())
    s.add("a")
    assert s.cost("a") == INITIAL_COST
    # The first measurement replaces the initial guess; later ones are averaged in.
    s.record("a", 0.1)
    assert s.cost("a") == pytest.approx(0.1)
    expected = 0.1
    for sample in (0.1, 0.02, 0.5):
        s.record("a", sample)
        expected = (1 - EWMA) * expected + EWMA * sample
        assert s.cost("a") == pytest.approx(expected)
    assert s.cost("a") == pytest.approx(0.8 * (0.8 * (0.8 * 0.1 + 0.2 * 0.1) + 0.2 * 0.02)
                                        + 0.2 * 0.5)
    # A VM never added starts from its first sample, not from the initial guess.
    s.record("z", 0.3)
    assert s.cost("z") == pytest.approx(0.3)
    # Converges to a steady cost.
    for _ in range(200):
        s.record("a", 0.04)
    assert s.cost("a") == pytest.approx(0.04, rel=1e-6)


def test_keyed_passes_do_not_teach_the_plain_pass_estimate(clock: FakeClock) -> None:
    """A keyed pass (the resume pass after a restart, one per keyed_every) costs ~5x
    a plain one. Taught, it made every resumed VM's estimate 5x too high, and a warm
    restart ran at half its budget for minutes: it only guesses a first estimate."""
    from scanner.run.scheduler import KEYED_COST_RATIO

    s = Scheduler(Policy())
    s.add("a")
    s.record("a", 0.05, keyed=True)          # the resume pass: a guess, not a measure
    assert s.cost("a") == pytest.approx(0.05 / KEYED_COST_RATIO)
    clock.t += 3.0
    s.record("a", 0.012)                      # the first plain pass replaces it outright
    assert s.cost("a") == pytest.approx(0.012)
    clock.t += 3.0
    s.record("a", 0.06, keyed=True)           # later keyed passes leave it alone,
    assert s.cost("a") == pytest.approx(0.012)
    clock.t += 3.0
    s.record("a", 0.012)                      # and are timed like any pass
    assert s.measured_period() == pytest.approx(3.0, rel=0.01)


def test_recorded_costs_drive_the_period(clock: FakeClock) -> None:
    s = Scheduler(Policy(budget=0.05, min_interval=0.01, max_interval=1e9))
    s.add("a")
    cool(s, clock)
    for _ in range(300):
        s.record("a", 0.2)
    assert s.period() == pytest.approx(0.2 / 0.05, rel=1e-6)


def test_keyed_passes_use_room_in_the_budget_and_a_bound_in_time_without(
        clock: FakeClock) -> None:
    """A fleet the budget binds is keyed every `--keyed-every` seconds (a share of
    P / keyed_every of its passes). A fleet held by --min-interval or a fixed --interval
    has room in the budget: keyed every KEYED_PASSES periods, if that is sooner."""
    from scanner.run.scheduler import KEYED_PASSES

    small = Scheduler(Policy(budget=0.10, min_interval=1.0))   # 3 VMs, 1 ms passes
    for vm in "abc":
        small.add(vm)
        small.record(vm, 0.001)
    cool(small, clock)
    assert small.period() == 1.0 and small.keyed_every() == KEYED_PASSES * 1.0
    big = Scheduler(Policy(budget=0.10, min_interval=1.0))     # 500 VMs: P = 5 s
    for i in range(500):
        big.add(f"vm{i}")
        big.record(f"vm{i}", 0.001)
    cool(big, clock)
    assert big.period() == pytest.approx(5.0) and big.keyed_every() == 300.0
    # Just under the budget without keyed passes, over it with them: the bound in time.
    edge = Scheduler(Policy(budget=0.10, min_interval=1.0))
    for i in range(90):                    # 90 ms per 1 s period, 9 % of the 10 %
        edge.add(f"vm{i}")
        edge.record(f"vm{i}", 0.001)
    cool(edge, clock)
    assert edge.period() == 1.0 and edge.keyed_every() == 300.0
    # A fixed --interval with room: KEYED_PASSES of it; never later than the policy's.
    fixed = Scheduler(Policy(auto=False, fixed=2.0, budget=0.10))
    fixed.add("a")
    fixed.record("a", 0.001)
    assert fixed.keyed_every() == KEYED_PASSES * 2.0
    assert Scheduler(Policy(budget=None, keyed_every=10.0)).keyed_every() == 10.0
    assert Scheduler(Policy(budget=None)).keyed_every() == KEYED_PASSES * 1.0


def test_describe() -> None:
    assert Policy().describe() == \
        "interval auto, 10% of one core, bounds 1-300s, keyed every 300s"
    assert Policy(auto=False, fixed=2.5, budget=None, keyed_every=60).describe() == \
        "interval 2.5s, no CPU cap, bounds 1-300s, keyed every 60s"


# -- token bucket: exact amounts with a fake clock ----------------------------------------
# acquire(): wait while the bucket is in debt, then reserve (docs/operating.md: "a token bucket
# refilled at the budget is the hard cap for all work").

def test_bucket_exact_delays(clock: FakeClock, sleeps: list[float]) -> None:
    s = Scheduler(Policy(budget=0.1))
    burst = 0.1 * BURST_SECONDS  # 0.2 CPU-s of credit at start

    async def go() -> None:
        await s.acquire(burst)          # spends the credit exactly: no wait
        await s.acquire(0.05)           # not in debt yet: no wait, now 0.05 in debt
        assert sleeps == []
        await s.acquire(0.0)            # 0.05 in debt → 0.05 / 0.1 = 0.5 s
        assert sleeps == [pytest.approx(0.5)]
        s.settle(0.0, 0.1)              # work cost 0.1 more than reserved
        await s.acquire(0.0)
        assert sleeps[-1] == pytest.approx(1.0)
        s.settle(0.0, 0.3)              # 0.3 in debt...
        clock.t += 1.0                  # ...1 s repays 0.1 of it: 0.2 left → 2 s
        await s.acquire(0.0)
        assert sleeps[-1] == pytest.approx(2.0)
        s.settle(0.3, 0.0)              # over-reserved: credit comes back...
        clock.t += 10_000               # ...but a long idle gives at most the burst
        await s.acquire(burst + 0.03)
        assert len(sleeps) == 3
        await s.acquire(0.0)
        assert sleeps[-1] == pytest.approx(0.3)

    asyncio.run(go())
    assert len(sleeps) == 4
    assert s.charged == pytest.approx(0.4)


def test_bucket_never_sleeps_without_budget(clock: FakeClock, sleeps: list[float]) -> None:
    for budget in (None, 0.0):
        s = Scheduler(Policy(budget=budget))

        async def go(s: Scheduler = s) -> None:
            for _ in range(5):
                await s.acquire(1e6)
                s.settle(1e6, 2e6)

        asyncio.run(go())
        assert s.charged == pytest.approx(1e7)
    assert sleeps == []


def test_bucket_budget_holds_over_many_scans(clock: FakeClock, sleeps: list[float]) -> None:
    """100 scans of 0.01 CPU-s each at a 5 % budget: after the 0.1 CPU-s burst, the
    other 0.9 CPU-s must be paid for by 0.9 / 0.05 = 18 s of (fake) waiting."""
    s = Scheduler(Policy(budget=0.05))
    t0 = clock.t

    async def go() -> None:
        for _ in range(100):
            await s.acquire(0.01)
            s.settle(0.01, 0.01)

    asyncio.run(go())
    # the last 0.01 is still owed when the loop ends
    assert sum(sleeps) == pytest.approx((0.9 - 0.01) / 0.05, abs=1e-6)
    assert clock.t - t0 == pytest.approx(sum(sleeps))


# -- token bucket: real delays -----------------------------------------------------------

def test_bucket_really_delays_when_in_debt() -> None:
    async def go() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        s = Scheduler(Policy(budget=0.5))  # 1.0 CPU-s of credit
        t0 = loop.time()
        await s.acquire(1.0)
        await s.acquire(0.1)  # reserved into debt: 0.1 owed
        t1 = loop.time()
        await s.acquire(0.0)  # waits 0.1 / 0.5 = 0.2 s
        t2 = loop.time()
        s.settle(0.0, 0.1)    # 0.1 more than reserved → 0.2 s again
        await s.acquire(0.0)
        t3 = loop.time()
        return t1 - t0, t2 - t1, t3 - t2

    free, first, second = asyncio.run(go())
    assert free < 0.1
    assert 0.19 <= first < 0.6   # never early; generous upper bound for a loaded host
    assert 0.19 <= second < 0.6


def test_no_budget_never_delays_real_time() -> None:
    async def go() -> float:
        loop = asyncio.get_running_loop()
        s = Scheduler(Policy(budget=None))
        t0 = loop.time()
        for _ in range(100):
            await s.acquire(10.0)
            s.settle(10.0, 50.0)
        return loop.time() - t0

    assert asyncio.run(go()) < 0.1


def test_concurrent_acquirers_go_one_by_one() -> None:
    """Four tasks each reserving 0.05 CPU-s at budget 0.5 once the credit is spent: the
    first goes at once (into debt), each next one waits for the previous one's debt:
    ~0, 0.1, 0.2, 0.3 s."""
    async def go() -> list[tuple[int, float]]:
        loop = asyncio.get_running_loop()
        s = Scheduler(Policy(budget=0.5))
        await s.acquire(1.0)
        t0 = loop.time()
        done: list[tuple[int, float]] = []

        async def one(i: int) -> None:
            await s.acquire(0.05)
            done.append((i, loop.time() - t0))

        await asyncio.gather(*(one(i) for i in range(4)))
        return done

    d = asyncio.run(go())
    assert [i for i, _ in d] == [0, 1, 2, 3]  # FIFO
    for (_, t), want in zip(d, (0.0, 0.1, 0.2, 0.3), strict=True):
        assert want - 0.01 <= t < want + 0.25


def test_reconcile_charges_uncounted_cpu_and_steers_the_period(clock: FakeClock) -> None:
    s = Scheduler(Policy(budget=0.10, min_interval=0.01, max_interval=1e9))
    s.add("a")
    cool(s, clock)
    s.record("a", 0.01)
    clock.t += sched.PERIOD_REFRESH + 0.01
    assert s.period() == pytest.approx(0.1)  # 0.01 s / 10 %
    s.reconcile()  # start the marks
    s.overhead, s.rate = 1.0, 0.10
    s._refill()
    s._tokens = -1.0  # in debt, so refills are not capped by the burst limit
    # One second: the scans charged 0.05 s, but the process used 0.30 s (3x budget).
    s.settle(0.0, 0.05)
    tokens_before = s._tokens
    clock.t += 1.0
    clock.cpu += 0.30
    s.reconcile()
    # The uncounted 0.25 s went to the bucket too, against 0.10 s of refill.
    assert s._tokens == pytest.approx(tokens_before + 0.10 - 0.25)
    assert s.overhead > 1.0
    clock.t += sched.PERIOD_REFRESH + 0.01
    assert s.period() == pytest.approx(0.1 * s.overhead)
    # Sustained over budget: the period keeps growing, bounded.
    for _ in range(200):
        clock.t += 1.0
        clock.cpu += 0.30
        s.reconcile()
    assert s.overhead == sched.OVERHEAD_MAX
    # Sustained under budget: it comes back down, bounded below.
    for _ in range(400):
        clock.t += 1.0
        clock.cpu += 0.01
        s.reconcile()
    assert s.overhead == sched.OVERHEAD_MIN
    # At the budget it holds still.
    s.overhead = 2.0
    s.rate = 0.10
    for _ in range(5):
        clock.t += 1.0
        clock.cpu += 0.10
        s.reconcile()
    assert s.overhead == pytest.approx(2.0)


def test_urgent_work_skips_the_queue() -> None:
    """Localizing a detected change must not wait behind routine scans: with three scans
    queued on a bucket in debt, an urgent reservation goes before them."""
    async def go() -> list[str]:
        s = Scheduler(Policy(budget=0.5))
        await s.acquire(2 * 0.5 + 0.05)  # spend the burst credit and 0.1 s more
        order: list[str] = []

        async def scan(i: int) -> None:
            await s.acquire(0.05)
            order.append(f"scan{i}")

        async def urgent() -> None:
            await asyncio.sleep(0.01)  # arrives after the scans queued
            await s.acquire(0.05, urgent=True)
            order.append("urgent")

        await asyncio.gather(*(scan(i) for i in range(3)), urgent())
        return order

    order = asyncio.run(go())
    assert order.index("urgent") <= 1, order  # at most the scan already waiting goes first
    assert sorted(order) == ["scan0", "scan1", "scan2", "urgent"]


# -- the start-up burst ----------------------------------------------------------------------

def test_the_startup_burst_refills_at_its_budget_until_every_first_verdict(
        clock: FakeClock) -> None:
    s = Scheduler(Policy(budget=0.10, startup_budget=1.0, min_interval=0.01,
                         max_interval=1e9))
    assert s.starting and "100% while a VM awaits its first verdict" in s.policy.describe()
    for vm in ("a", "b"):
        s.expect(vm)
        s.add(vm)
    s._tokens = -5.0
    clock.t += 1.0
    s._refill()
    assert s._tokens == pytest.approx(-4.0)  # one core's worth per second
    # The period is the steady one throughout (routine scans keep their rhythm).
    s.record("a", 0.01)
    s.record("b", 0.01)
    clock.t += sched.PERIOD_REFRESH + 0.01
    assert s.period() == pytest.approx(2 * 0.01 / 0.5 / 0.10)
    s.verdict("a")
    assert s.starting and s.pending() == 1
    s.remove("b")  # gone before its verdict: not waited for
    assert not s.starting and s.pending() == 0
    debt = s._tokens  # refilled at one core until the burst ended, kept as it was
    assert debt == pytest.approx(-4.0 + sched.PERIOD_REFRESH + 0.01)
    clock.t += 1.0
    s._refill()
    assert s._tokens == pytest.approx(debt + 0.10)  # steady refill from here


def test_vms_that_appear_later_get_a_burst_of_their_own(clock: FakeClock) -> None:
    """A wave of VMs added while kscan runs (a host booting its fleet) is first checked
    at the start-up budget too, until each of them has its first verdict; the feedback
    of the steady state is frozen meanwhile and goes on from where it stood."""
    s = Scheduler(Policy(budget=0.10, startup_budget=1.0, min_interval=0.01,
                         max_interval=1e9))
    s.expect("a")
    s.add("a")
    s.verdict("a")
    assert not s.starting and s.bursts == 1
    s.record("a", 0.001)
    for _ in range(20):  # the steady state: over budget, so the factor moves
        clock.t += 1.0
        clock.cpu += 0.20
        s.reconcile()
    rate, factor = s.rate, s.overhead
    assert factor > 1.0
    s._tokens = -1.0
    clock.t += 1.0
    s._refill()
    assert s._tokens == pytest.approx(-0.9)  # the steady refill
    wave = [f"new{i}" for i in range(500)]
    for vm in wave:
        s.expect(vm)
        s.add(vm)
    assert s.starting and s.bursts == 2 and s.pending() == 500
    assert "a" not in s._pending  # verified VMs are not waited for again
    clock.t += 1.0
    s._refill()
    assert s._tokens == pytest.approx(0.1)  # one core's worth per second
    for _ in range(5):  # first checks at one core: frozen feedback, charged CPU
        clock.t += 1.0
        clock.cpu += 1.0
        s.reconcile()
    assert (s.rate, s.overhead) == (rate, factor)
    for vm in wave[:-1]:
        s.verdict(vm)
    assert s.starting and s.pending() == 1
    s.remove(wave[-1])  # gone before its verdict: not waited for
    assert not s.starting and s.pending() == 0
    assert (s.rate, s.overhead) == (rate, factor)  # not afresh: from where it stood
    assert s._tokens <= 0.10 * sched.BURST_SECONDS
    t = s._tokens
    clock.t += 1.0
    s._refill()
    assert s._tokens == pytest.approx(min(t + 0.10, 0.10 * sched.BURST_SECONDS))
    s.expect("late")  # one more later: a third burst, over at its verdict
    assert s.starting and s.bursts == 3
    s.verdict("late")
    assert not s.starting


def test_no_burst_when_the_startup_budget_is_not_larger() -> None:
    for sb in (None, 0.05, 0.10):
        s = Scheduler(Policy(budget=0.10, startup_budget=sb))
        assert not s.starting
        s.expect("a")
        assert s.pending() == 0
    assert not Scheduler(Policy(budget=None, startup_budget=1.0)).starting


def _first_checks(s: Scheduler, clock: FakeClock, vms: list[str], rate: float) -> None:
    """Each VM's first check (30 ms charged, 5 ms more uncounted) at CPU rate `rate`,
    reconciled every simulated second, then its first three fast passes (1 ms)."""
    for vm in vms:
        s.expect(vm)
        s.add(vm)
    due = clock.t + 1.0
    for vm in vms:
        s.settle(0.0, 0.030)
        s.record_slow(0.030)
        clock.cpu += 0.035
        clock.t += 0.035 / rate
        while clock.t >= due:
            s.reconcile()
            due += 1.0
        s.verdict(vm)
    for vm in vms:
        for _ in range(3):
            s.record(vm, 0.001)


def _steady(s: Scheduler, clock: FakeClock, seconds: int) -> float:
    """Run at exactly the budget for `seconds` and until every VM is cool; the period."""
    for _ in range(seconds + int(HOT_SECONDS) + 1):
        clock.t += 1.0
        clock.cpu += 0.10
        s.reconcile()
    return s.period()


def test_a_cold_start_leaves_the_steady_state_growth_gives(clock: FakeClock) -> None:
    """500 VMs verified at once at one core, or 100 at a time at 10 %: the same fast-pass
    costs and the same feedback factor, so the same period. First checks (30x a fast
    pass) teach nothing to the scan-cost estimate, and the burst's CPU rate (10x the
    budget) nothing to the feedback. Both runs end at the budget, where the factor
    holds still: the period must agree to within float rounding (1e-9)."""
    vms = [f"vm{i:03d}" for i in range(500)]
    cold = Scheduler(Policy(budget=0.10, startup_budget=1.0, min_interval=0.01,
                            max_interval=1e9))
    _first_checks(cold, clock, vms, rate=1.0)
    assert not cold.starting
    p_cold = _steady(cold, clock, 30)
    grown = Scheduler(Policy(budget=0.10, min_interval=0.01, max_interval=1e9))
    for i in range(0, 500, 100):
        _first_checks(grown, clock, vms[i:i + 100], rate=0.10)
        _steady(grown, clock, 30)
    p_grown = _steady(grown, clock, 30)
    assert cold.cost("vm000") == pytest.approx(0.001) == grown.cost("vm499")
    assert p_cold == pytest.approx(p_grown, rel=1e-9)
    assert p_cold == pytest.approx(500 * 0.001 * cold.overhead / 0.10)
    assert cold.overhead == pytest.approx(1.0)


def test_exempt_cpu_is_not_charged_nor_steers_the_period(clock: FakeClock) -> None:
    """CPU answering metrics scrapes (`Scheduler.exempt`, from the server's threads) is
    not scan work: charged, a client scraping in a loop ran the bucket into debt and
    left the VMs unscanned for tens of seconds."""
    s = Scheduler(Policy(budget=0.10, min_interval=0.01, max_interval=1e9))
    s.add("a")
    cool(s, clock)
    s.reconcile()  # start the marks
    s.overhead, s.rate = 1.0, 0.10
    s._refill()
    s._tokens = -1.0  # in debt, so refills are not capped by the burst limit
    tokens_before = s._tokens
    for _ in range(10):   # 10 s of scraping: the process used 0.5 CPU-s a second on it
        s.settle(0.0, 0.05)
        clock.t += 1.0
        clock.cpu += 0.55
        s.exempt(0.5)
        s.reconcile()
    # Only the scans' own charges and the refill moved the bucket; the measured rate
    # is the scans' own.
    s._refill()
    assert s._tokens == pytest.approx(tokens_before + 10 * 0.10 - 10 * 0.05)
    assert s.rate < 0.08   # EWMA from 0.10 towards 0.05 (charged: towards 0.55)
    assert s.exempted == pytest.approx(5.0)
    s.exempt(-1.0)   # nonsense is ignored
    assert s.exempted == pytest.approx(5.0)


def test_reserve_takes_credit_only_out_of_debt_and_debt_seconds_say_how_long(
        clock: FakeClock) -> None:
    """The pacer's synchronous reservation for a routine pass: taken while the bucket is
    not in debt (it may take it into debt), refused with nothing reserved once it is;
    `debt_seconds` is how long the refill takes to repay it."""
    s = Scheduler(Policy(budget=0.10))
    assert s.reserve(0.15) and s._tokens == pytest.approx(0.20 - 0.15)
    assert s.reserve(0.15) and s._tokens == pytest.approx(-0.10)
    assert not s.reserve(0.01) and s._tokens == pytest.approx(-0.10)
    assert s.debt_seconds() == pytest.approx(1.0)
    clock.t += 0.4
    assert s.debt_seconds() == pytest.approx(0.6)
    clock.t += 0.6
    assert s.debt_seconds() == 0.0 and s.reserve(0.01)
    free = Scheduler(Policy(budget=None))
    assert free.reserve(1.0) and free.debt_seconds() == 0.0


# -- the measured period -----------------------------------------------------------------

def test_measured_period_follows_real_scan_times_not_the_target(clock: FakeClock) -> None:
    """Ten VMs whose fast scans cost 0.01 CPU-s: the target is P = 10 × 0.01 / 0.1 = 1 s.
    But each scan takes 0.5 s of wall time (a slow fake scan, one at a time), so a VM is
    really scanned every 5 s — and that is what the measured period says."""
    s = Scheduler(Policy(budget=0.10, min_interval=0.1, max_interval=300.0))
    vms = [f"vm{i}" for i in range(10)]
    for vm in vms:
        s.add(vm)
    cool(s, clock)
    assert s.measured_period() is None
    assert s.measured_or_target() == s.target()
    for _ in range(6):
        for vm in vms:
            clock.t += 0.5
            s.record(vm, 0.01)
    clock.t += 0.1  # the last pass just happened: no stall
    assert s.target() == pytest.approx(1.0)
    assert s.measured_period() == pytest.approx(5.0)
    assert s.measured_or_target() == pytest.approx(5.0)


def test_measured_period_shows_a_stall_and_forgets_removed_vms(clock: FakeClock) -> None:
    s = Scheduler(Policy(budget=0.10, min_interval=0.1))
    for vm in ("a", "b", "c"):
        s.add(vm)
        for _ in range(3):
            s.record(vm, 0.001)
            clock.t += 2.0
    # Every VM's passes were 2 s apart; nothing scanned for 60 s more: each VM's
    # figure is at least the time since its last pass.
    clock.t += 60
    m = s.measured_period()
    assert m is not None and m >= 60
    for vm in ("a", "b", "c"):
        s.remove(vm)
    assert s.measured_period() is None
    assert not s._last_pass and not s._intervals


def test_measured_period_ewma_and_fixed_target(clock: FakeClock) -> None:
    s = Scheduler(Policy(auto=False, fixed=7.0, budget=0.10))
    s.add("a")
    s.record("a", 0.001)
    clock.t += 4.0
    s.record("a", 0.001)
    assert s.measured_period() == pytest.approx(4.0)
    clock.t += 14.0
    s.record("a", 0.001)
    assert s.measured_period() == pytest.approx((1 - sched.MEASURED_EWMA) * 4.0
                                                + sched.MEASURED_EWMA * 14.0)
    assert s.target() == 7.0


# -- one VM's share of slow-path CPU ---------------------------------------------------------

def test_a_vms_slow_paths_run_at_once_within_their_allowance_then_at_their_share(
        clock: FakeClock, sleeps: list[float]) -> None:
    """A guest that changes its kernel in a loop makes kscan re-check it in a loop. Up to
    the allowance (SLOW_SHARE of the budget for SLOW_ALLOWANCE_S) its checks go at once;
    beyond it, each waits until its level has drained back, at SLOW_SHARE of the budget:
    in the long run it spends no more than that share."""
    s = Scheduler(Policy(budget=0.10))
    rate = sched.SLOW_SHARE * 0.10
    allowance = rate * sched.SLOW_ALLOWANCE_S
    assert s.slow_allowance() == pytest.approx(allowance)  # 0.75 CPU-s at 10 %

    s.charge_vm("loop", allowance - 0.01)
    assert s.slow_wait("loop") == 0 and s.slow_wait("other") == 0
    assert asyncio.run(s.slow_turn("loop")) is False and sleeps == []

    s.charge_vm("loop", 0.26)  # one expensive check (the function tracer on): 0.25 over
    assert s.slow_wait("loop") == pytest.approx(0.25 / rate)  # 10 s at a 2.5 % drain
    assert s.slow_wait("other") == 0  # another VM is not held back
    clock.t += 4.0
    assert s.slow_level("loop") == pytest.approx(allowance + 0.25 - 4.0 * rate)
    assert s.slow_wait("loop") == pytest.approx(6.0)

    assert asyncio.run(s.slow_turn("loop")) is True
    assert sleeps == [pytest.approx(6.0)] and s.slow_paced == 1
    assert s.slow_wait("loop") == pytest.approx(0.0, abs=1e-9)

    # The long run: a VM re-checked in a loop at 0.1 CPU-s each, waiting its turn every
    # time, spends SLOW_SHARE of the budget (within its allowance, spent once).
    start, spent = clock.t, 0.0
    for _ in range(200):
        asyncio.run(s.slow_turn("loop"))
        s.charge_vm("loop", 0.1)
        spent += 0.1
    assert spent / (clock.t - start) == pytest.approx(rate, rel=0.05)


def test_slow_path_shares_need_a_budget_and_drained_levels_are_forgotten(
        clock: FakeClock, sleeps: list[float]) -> None:
    free = Scheduler(Policy(budget=None))
    free.charge_vm("vm", 100.0)
    assert free.slow_wait("vm") == 0 and free.slow_level("vm") == 0
    assert asyncio.run(free.slow_turn("vm")) is False and sleeps == []

    s = Scheduler(Policy(budget=0.10))
    for i in range(50):  # VMs that come and go: their levels do not pile up
        s.charge_vm(f"vm{i}", 0.5)
    assert len(s._slow_levels) == 50
    clock.t += 0.5 / (sched.SLOW_SHARE * 0.10) + 1
    s.reconcile()
    assert s._slow_levels == {}

"""The host's view of whether a guest ran (scanner.vm.progress): real threads of this
process stand in for vCPU threads; starved ones are synthetic samples."""

from __future__ import annotations

import asyncio
import threading
import time

from scanner.vm.progress import MIN_RUN, Sample, progressed, sample_threads, wait_for_progress


def test_a_busy_thread_runs_and_a_sleeping_one_is_asleep() -> None:
    stop = threading.Event()
    ids: dict[str, int] = {}

    def busy() -> None:
        ids["busy"] = threading.get_native_id()
        while not stop.is_set():
            sum(range(1000))

    def idle() -> None:
        ids["idle"] = threading.get_native_id()
        stop.wait()

    threads = [threading.Thread(target=busy), threading.Thread(target=idle)]
    for t in threads:
        t.start()
    try:
        while len(ids) < 2:
            time.sleep(0.01)
        before = sample_threads([ids["busy"], ids["idle"]])
        assert before is not None
        time.sleep(0.4)
        after = sample_threads([ids["busy"], ids["idle"]])
        assert after is not None
        assert after.run_s[0] - before.run_s[0] >= MIN_RUN  # the busy one ran
        assert after.asleep[1] and not after.asleep[0]
        assert progressed(before, after)
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_threads_that_are_not_there_are_not_a_sample() -> None:
    assert sample_threads([0]) is None
    assert sample_threads([-5]) is None
    assert sample_threads([1 << 30]) is None


def test_a_starved_vcpu_has_not_progressed_until_it_runs() -> None:
    before = Sample((1.0, 2.0), (False, True))
    starved = Sample((1.0 + MIN_RUN / 2, 2.0), (False, True))   # runnable, barely ran
    assert not progressed(before, starved)
    ran = Sample((1.0 + MIN_RUN, 2.0), (False, False))          # ran; the other woke
    assert not progressed(before, ran)                          # ... but did not run
    assert progressed(before, Sample((1.0 + MIN_RUN, 2.0), (False, True)))
    assert progressed(before, Sample((1.0,), (False,)))         # vCPUs changed: look


def test_waiting_is_bounded_and_ends_when_the_guest_runs() -> None:
    samples = iter([Sample((0.0,), (False,))] * 3 + [Sample((1.0,), (False,))])

    async def moving() -> Sample | None:
        return next(samples)

    async def stuck() -> Sample | None:
        return Sample((0.0,), (False,))

    async def unknown() -> Sample | None:
        return None

    async def go() -> tuple[float, float, float]:
        return (await wait_for_progress(moving, 0.05, 5.0, poll=0.01),
                await wait_for_progress(stuck, 0.05, 0.5, poll=0.01),
                await wait_for_progress(unknown, 0.05, 5.0, poll=0.01))

    moved, bounded, plain = asyncio.run(go())
    assert 0.05 <= moved < 1.0
    assert 0.5 <= bounded < 1.5
    assert 0.05 <= plain < 0.5

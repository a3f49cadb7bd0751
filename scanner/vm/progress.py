"""Has the guest run? The host's own view of a VM's vCPU threads.

A second look at a change the kernel may have caught half-way (a text_poke_bp() int3, a
trampoline page not yet owned) only proves something if the guest had the chance to
finish in between. On a loaded host a vCPU thread can wait for a core for seconds; a
fixed delay then takes the kernel's unfinished patching for a tampering. The host knows
better than the guest: `/proc/<tid>/schedstat` says how long each vCPU thread ran, and
`/proc/<tid>/stat` whether it is runnable or asleep (a halted vCPU sleeps in QEMU).

`progressed(before, after)` holds once every vCPU has either run `MIN_RUN` seconds
since `before` or is asleep now (idle: it is not in the middle of anything). None of
this is read from the guest: the thread ids come from QEMU (`query-cpus-fast`), the
figures from the host kernel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

__all__ = ["MIN_RUN", "Sample", "progressed", "sample_threads", "wait_for_progress"]

#: A vCPU that ran this long (seconds) since a first look had the chance to finish
#: whatever the kernel was doing (natively microseconds; under TCG milliseconds).
MIN_RUN = 0.05
#: pid_max's largest value: anything above is not a thread id.
_TID_MAX = 1 << 22


@dataclass(frozen=True)
class Sample:
    """Per vCPU thread: seconds it has run, and whether it is asleep now."""

    run_s: tuple[float, ...]
    asleep: tuple[bool, ...]


def _read(path: str, limit: int = 4096) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace")
    except OSError:
        return None


def sample_threads(tids: Sequence[int]) -> Sample | None:
    """The threads' run time and sleep state now; None if any cannot be read (gone, or
    not a thread id at all)."""
    runs: list[float] = []
    asleep: list[bool] = []
    for tid in tids:
        if not 0 < tid < _TID_MAX:
            return None
        sched = _read(f"/proc/{tid}/schedstat")
        stat = _read(f"/proc/{tid}/stat")
        if sched is None or stat is None:
            return None
        try:
            runs.append(int(sched.split()[0]) / 1e9)
            # The state follows the command name, which is in parentheses and may
            # itself hold ") " (QEMU names vCPU threads "CPU 0/KVM").
            state = stat[stat.rindex(")") + 2]
        except (ValueError, IndexError):
            return None
        asleep.append(state in "SI")
    return Sample(tuple(runs), tuple(asleep))


def progressed(before: Sample, after: Sample, min_run: float = MIN_RUN) -> bool:
    """Every vCPU ran `min_run` seconds between the samples or is asleep at `after`."""
    if len(before.run_s) != len(after.run_s):
        return True  # vCPUs came or went: the VM changed under us, look again
    return all(a - b >= min_run or sleeping
               for b, a, sleeping in zip(before.run_s, after.run_s, after.asleep,
                                         strict=True))


async def wait_for_progress(sample: Callable[[], Awaitable[Sample | None]],
                            delay: float, most: float, poll: float = 0.1) -> float:
    """Sleep `delay`, then on until the guest has run (`progressed`) or `most` seconds
    have passed in all; without a first sample (the host cannot tell: a replayed VM,
    another user's QEMU) just `delay`. Returns the seconds waited."""
    t0 = time.monotonic()
    first = await sample()
    await asyncio.sleep(delay)
    if first is None:
        return time.monotonic() - t0
    while time.monotonic() - t0 < most:
        now = await sample()
        if now is None or progressed(first, now):
            break
        await asyncio.sleep(poll)
    return time.monotonic() - t0

"""What a VM's watcher needs from the engine that runs it: a small, explicit interface.

`VmWatcher` (one per VM) is given a `WatchContext`; `Engine` implements it. The watcher
never imports the engine, so the two can be read, typed and tested apart (the unit
tests give watchers a context of their own).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from scanner.examine import Examined, GoldenSet
from scanner.image.kernel_profile import KernelProfile
from scanner.run.actions import Action
from scanner.run.scheduler import Scheduler
from store import Store

__all__ = ["WatchContext"]

T = TypeVar("T")


class WatchContext(Protocol):
    #: The CPU budget: when to scan, what scans and slow paths cost.
    scheduler: Scheduler
    #: Profiles, baselines, per-VM state and the event log.
    store: Store
    #: What to do on tampering, and where forensic copies go.
    action: Action
    forensics_dir: Path
    #: --strict: the kernel's own verified patching is tampering too.
    strict: bool
    #: --trust-module: modules whose runtime patches are not tampering though unsigned.
    trusted_modules: frozenset[str]

    async def emit(self, event: str, vm: str | None, **fields: Any) -> dict[str, Any]:
        """Emit one event (stdout and the database's log); returns it."""
        ...

    async def profiles(self) -> list[KernelProfile]:
        """The stored kernel profiles (cached)."""
        ...

    async def golden(self, ex: Examined) -> GoldenSet:
        """The golden baseline of an examined VM (cached); BaselineMissing if none."""
        ...

    async def timed_in_worker(self, fn: Callable[[], T], vm: str | None = None) -> T:
        """Run CPU-bound work off the event loop, charging its CPU time to the budget
        (and to `vm`'s share of slow-path CPU: `Scheduler.charge_vm`)."""
        ...

    def slow_slot(self) -> AbstractAsyncContextManager[None]:
        """Hold one of the few slow-path slots (each slow path holds ~19 MB of copies)."""
        ...

    def count_scan(self, keyed: bool = False, cpu_seconds: float = 0.0) -> None:
        """One fast scan done (for the stats event); `keyed`: a keyed one; `cpu_seconds`:
        the CPU the scan's own checks took (its hashing and comparisons)."""
        ...

"""Shared fixtures: real QEMU test guests (booted once per session) and small helpers.

Guests boot lazily, all at once, the first time a test asks for any of them, so unit
test runs never start QEMU. They are stopped and their files removed at the end.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kscan.shipped import contrib_path
from scanner.image.kernel_profile import KernelProfile, profile_from_path
from tools.guests import Guest, GuestSpec, ensure_kernel, start, wait_ready

T = TypeVar("T")

#: The standard guests. a/b: same kernel, default CPU (4-level), for baseline pairs;
#: big: >3 GiB so RAM is split below/above 4 GiB, and page-table isolation forced on
#: (the default CPU model is not Meltdown-affected); la57: -cpu max → 5-level paging.
STANDARD = (
    GuestSpec("a"),
    GuestSpec("b"),
    GuestSpec("big", mem_mb=4096, append="pti=on"),
    GuestSpec("la57", cpu="max"),
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class GuestPool:
    """Boots the standard guests on first use; can boot extra ones on demand."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.guests: dict[str, Guest] = {}

    def _ensure_standard(self) -> None:
        # By name, not "none booted yet": a module may have booted extra guests first.
        missing = [s for s in STANDARD if s.name not in self.guests]
        if missing:
            started = start(missing, self.run_dir)
            self.guests.update({g.name: g for g in started})
            wait_ready(started, timeout=float(os.environ.get("KSCAN_BOOT_TIMEOUT", "400")))

    def __getitem__(self, name: str) -> Guest:
        self._ensure_standard()
        return self.guests[name]

    def boot(self, *specs: GuestSpec) -> list[Guest]:
        """Boot extra guests (e.g. ones a test will tamper with or kill)."""
        started = start(specs, self.run_dir)
        self.guests.update({g.name: g for g in started})
        wait_ready(started, timeout=float(os.environ.get("KSCAN_BOOT_TIMEOUT", "400")))
        return started

    def stop_all(self) -> None:
        for g in self.guests.values():
            g.stop()


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestPool]:
    pool = GuestPool(tmp_path_factory.mktemp("guests"))
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def kernel_profile() -> KernelProfile:
    """The profile of the Debian cloud kernel the test guests boot."""
    return profile_from_path(ensure_kernel().vmlinuz)


# -- every event the suite emits matches the published schema -----------------------------

SCHEMA = contrib_path("events.schema.json")


class EmittedEvents:
    """Events the product emitted during the test session: by every in-process engine
    (its sink's `emit`) and by every `kscan run` a test drives (tools.kscan_run.KscanRun).
    Not what tests feed an EventSink directly to test its mechanics."""

    def __init__(self) -> None:
        self.inproc: list[dict[str, Any]] = []
        self.runs: list[Any] = []

    def all(self) -> list[dict[str, Any]]:
        return self.inproc + [e for r in self.runs for e in list(r.events)]


@pytest.fixture(scope="session", autouse=True)
def emitted_events() -> Iterator[EmittedEvents]:
    import jsonschema

    from scanner.run.engine import Engine
    from tools.kscan_run import KscanRun

    seen = EmittedEvents()
    engine_init, run_init = Engine.__init__, KscanRun.__init__

    def engine(self: Engine, *args: Any, **kwargs: Any) -> None:
        engine_init(self, *args, **kwargs)
        sink_emit = self.sink.emit

        async def emit(event: str, vm: str | None, **fields: Any) -> dict[str, Any]:
            ev = await sink_emit(event, vm, **fields)
            if len(seen.inproc) < 100_000:
                seen.inproc.append(ev)
            return ev

        self.sink.emit = emit  # type: ignore[method-assign]

    def run(self: KscanRun, *args: Any, **kwargs: Any) -> None:
        run_init(self, *args, **kwargs)
        seen.runs.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "__init__", engine)
        mp.setattr(KscanRun, "__init__", run)
        yield seen
    validator = jsonschema.Draft202012Validator(__import__("json").loads(SCHEMA.read_text()))
    bad = []
    for ev in seen.all():
        errors = sorted(validator.iter_errors(ev), key=str)
        if errors:
            bad.append(f"{ev.get('event')}: {errors[0].message} (at {list(errors[0].path)})")
    assert not bad, (f"{len(bad)} of {len(seen.all())} emitted events do not match "
                     f"{SCHEMA.name}: " + "; ".join(sorted(set(bad))[:10]))

"""`kscan run --libvirt`: every running domain of a libvirt host, followed by its events.

The fleet lists the running domains once, then follows libvirt's lifecycle events:

* a domain that starts (or resumes after an incoming migration) is a new source, picked
  up by the engine's discovery like a new QMP socket;
* a domain that stops (destroyed, shut down, crashed, migrated away, saved) is reported
  at once — `vm_lost` with the reason — and its watcher is stopped, instead of waiting
  for the next monitor command to fail;
* a domain paused for an incoming migration is not picked up until it runs (its RAM is
  still arriving), and kscan's pause action refuses a domain with a migration job
  (`LibvirtMonitor.stop`): migrations are never paused.

Every event of a domain carries its `uuid` beside `vm` (the domain name). The list is
also refreshed every `RELIST_EVERY` seconds in case an event was missed (libvirtd
restarted, keepalive lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from scanner.qemu.libvirt_domain import (
    DomainInfo,
    LibvirtHost,
    LibvirtMonitor,
    Lifecycle,
    LifecycleEvent,
)
from scanner.run.events import EventSink
from scanner.vm import AttachedVm, SourceKind, VmSource
from scanner.vm.domain import attach_domain

__all__ = ["LibvirtFleet"]

log = logging.getLogger("kscan.libvirt")

RELIST_EVERY = 30.0


class LibvirtFleet:
    def __init__(self, uri: str, sink: EventSink, forget: Callable[[str], bool]) -> None:
        self.uri = uri
        self.sink = sink
        #: Stop watching a source now; True if it was being watched.
        self.forget = forget
        self.host: LibvirtHost | None = None
        self.domains: dict[str, DomainInfo] = {}
        self.monitors: dict[str, LibvirtMonitor] = {}  # of the VMs opened, by domain

    async def start(self) -> None:
        self.host = await LibvirtHost.open(self.uri, events=True)
        await self._relist()

    async def close(self) -> None:
        if self.host is not None:
            await self.host.close()

    def sources(self) -> list[VmSource]:
        return [VmSource(SourceKind.LIBVIRT, d.name, self.uri)
                for d in sorted(self.domains.values(), key=lambda d: d.name) if d.running]

    async def open(self, name: str) -> AttachedVm:
        assert self.host is not None
        vm = await attach_domain(name, self.uri, host=self.host)
        if isinstance(vm.qmp, LibvirtMonitor):
            vm.qmp.follows_events = True
            self.monitors[name] = vm.qmp
        return vm

    async def _relist(self) -> None:
        assert self.host is not None
        found = {d.name: d for d in await self.host.running()}
        for d in found.values():
            self.sink.labels[d.name] = {"uuid": d.uuid}
        for name in set(self.domains) - set(found):
            await self._stopped(name, "domain no longer running")
        self.domains = found

    async def follow(self) -> None:
        """Apply lifecycle events as they come; relist now and then."""
        assert self.host is not None and self.host.events is not None
        while True:
            try:
                async with asyncio.timeout(RELIST_EVERY):
                    ev = await self.host.events.get()
            except TimeoutError:
                with contextlib.suppress(Exception):
                    await self._relist()
                continue
            log.debug("libvirt event %s", ev)
            await self._apply(ev)

    async def _apply(self, ev: LifecycleEvent) -> None:
        if ev.kind in (Lifecycle.STARTED, Lifecycle.RESUMED, Lifecycle.SUSPENDED):
            # (Re)read the state: a start for an incoming migration is paused until it
            # has all its RAM, and is picked up when it resumes.
            self.sink.labels[ev.name] = {"uuid": ev.uuid}
            with contextlib.suppress(Exception):
                await self._relist()
        elif ev.kind is Lifecycle.STOPPED:
            self.domains.pop(ev.name, None)
            await self._stopped(ev.name, ev.reason)

    async def _stopped(self, name: str, reason: str) -> None:
        self.domains.pop(name, None)
        mon = self.monitors.pop(name, None)
        if mon is not None:
            mon.mark_gone(reason)  # a command failing now reports this reason
        if self.forget(name):
            await self.sink.emit("vm_lost", name, reason=reason)

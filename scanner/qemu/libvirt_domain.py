"""libvirt-managed domains: the monitor through libvirt's QMP passthrough, pause through
virDomainSuspend, the QEMU process of a domain, running domains and lifecycle events.

On a libvirt host, libvirt owns QEMU's only monitor. `LibvirtMonitor` speaks to it
through `virDomainQemuMonitorCommand` (libvirt_qemu.qemuMonitorCommand) and offers the
API the scanner uses of `QmpVm` — `execute`, `hmp` (`human-monitor-command`, with
`cpu-index` since HMP `cpu N` does not persist between passthrough calls), `vcpus`,
`flatview`, `run_state`, `cpu_model`, ... Two differences:

* the first passthrough command marks the domain **tainted** (`custom-monitor`; libvirt
  logs one line and `virsh dominfo` shows it) — kscan only reads, but libvirt cannot
  know that;
* `stop()` is `virDomainSuspend` (no taint; libvirt knows the domain is paused), and it
  refuses while the domain has a migration (or any other) job running: kscan does not
  pause migrations.

The Python binding (`libvirt-python`) is an optional extra: `pip install 'kscan[libvirt]'`.
Its calls block, so each runs in a worker thread; events come from libvirt's default
event loop, run in a daemon thread and handed to asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from kscan.errors import KscanError
from scanner.errors import QmpError, VmStateError
from scanner.qemu.qmp import COMMAND_TIMEOUT, QmpVm

__all__ = ["DEFAULT_URI", "DomainInfo", "LibvirtHost", "LibvirtMonitor", "Lifecycle",
           "LifecycleEvent", "MissingBinding", "binding", "domain_pid"]

log = logging.getLogger("kscan.libvirt")
T = TypeVar("T")

DEFAULT_URI = "qemu:///system"
PID_DIR = Path("/run/libvirt/qemu")
CALL_TIMEOUT = 30.0
#: How long a command that finds its domain gone waits for the lifecycle event.
GONE_EVENT_WAIT = 3.0


class MissingBinding(KscanError):
    """The libvirt Python binding is not installed."""


def binding() -> tuple[ModuleType, ModuleType]:
    """(libvirt, libvirt_qemu), or a one-line error naming the extra to install."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as err:
        raise MissingBinding(
            f"--libvirt needs the libvirt Python binding ({err.name} is not installed)",
            hint="pip install 'kscan[libvirt]' (it builds against libvirt-dev, pkg-config "
                 "and gcc)") from None
    return libvirt, libvirt_qemu


class Lifecycle(enum.IntEnum):
    """virDomainEventType."""

    DEFINED = 0
    UNDEFINED = 1
    STARTED = 2
    SUSPENDED = 3
    RESUMED = 4
    STOPPED = 5
    SHUTDOWN = 6
    PMSUSPENDED = 7
    CRASHED = 8
    UNKNOWN = 99

    @classmethod
    def _missing_(cls, value: object) -> Lifecycle:
        return cls.UNKNOWN


#: virDomainEventStoppedDetailType, for the reason a stopped domain is reported with.
STOPPED_DETAIL = {0: "shut down", 1: "destroyed", 2: "crashed", 3: "migrated away",
                  4: "saved", 5: "failed", 6: "snapshot reverted"}
STARTED_MIGRATED = 1  # VIR_DOMAIN_EVENT_STARTED_MIGRATED
STOPPED_MIGRATED = 3


@dataclass(frozen=True)
class LifecycleEvent:
    name: str
    uuid: str
    kind: Lifecycle
    detail: int

    @property
    def reason(self) -> str:
        if self.kind is Lifecycle.STOPPED:
            return "domain stopped: " + STOPPED_DETAIL.get(self.detail, f"detail {self.detail}")
        return f"domain {self.kind.name.lower()}"


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    running: bool  # virDomainState RUNNING (not paused, not migrating in)


def domain_pid(name: str, uuid: str) -> int:
    """The PID of a domain's QEMU (libvirt's pid file), checked against its -uuid."""
    path = PID_DIR / f"{name}.pid"
    try:
        pid = int(path.read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        raise VmStateError(f"no QEMU process: {path} or its /proc entry is missing",
                           vm=name, hint="is the domain running on this host?") from None
    except (OSError, ValueError) as err:
        raise VmStateError(f"cannot read the QEMU PID from {path}: {err}", vm=name,
                           hint="run kscan as root (the pid file is root's)") from err
    for flag, value in itertools.pairwise(argv):
        if flag == b"-uuid" and value.decode(errors="replace").lower() == uuid.lower():
            return pid
    raise VmStateError(f"process {pid} named in {path} is not this domain's QEMU "
                       f"(no -uuid {uuid})", vm=name)


class LibvirtHost:
    """One connection to libvirtd; optionally delivering lifecycle events."""

    _event_thread: threading.Thread | None = None  # one per process, never stopped

    def __init__(self, uri: str, conn: Any, events: asyncio.Queue[LifecycleEvent] | None,
                 libvirt: ModuleType, libvirt_qemu: ModuleType) -> None:
        self.uri = uri
        self.conn = conn
        self.events = events
        self.lv = libvirt
        self.lvq = libvirt_qemu
        self._callback: int | None = None

    @classmethod
    async def open(cls, uri: str = DEFAULT_URI, *, events: bool = False) -> LibvirtHost:
        lv, lvq = binding()
        queue: asyncio.Queue[LifecycleEvent] | None = None
        if events:
            cls._start_event_loop(lv)
            queue = asyncio.Queue()
        try:
            conn = await asyncio.to_thread(lv.open, uri)
        except lv.libvirtError as err:
            raise VmStateError(f"cannot connect to libvirt: {_text(err)}", vm=uri,
                               hint="is libvirtd running, and may this user connect?"
                               ) from err
        host = cls(uri, conn, queue, lv, lvq)
        if queue is not None:
            loop = asyncio.get_running_loop()

            def on_event(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
                ev = LifecycleEvent(dom.name(), dom.UUIDString(), Lifecycle(event), detail)
                loop.call_soon_threadsafe(queue.put_nowait, ev)

            host._callback = await host.call(conn.domainEventRegisterAny, None,
                                             lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)
            with contextlib.suppress(lv.libvirtError):
                await host.call(conn.setKeepAlive, 5, 3)
        return host

    @classmethod
    def _start_event_loop(cls, lv: ModuleType) -> None:
        if cls._event_thread is not None:
            return
        lv.virEventRegisterDefaultImpl()  # before any connection is opened

        def loop() -> None:
            while True:
                try:
                    lv.virEventRunDefaultImpl()
                except Exception as err:  # keep delivering events
                    log.debug("libvirt event loop: %s", err)

        t = threading.Thread(target=loop, name="libvirt-events", daemon=True)
        t.start()
        cls._event_thread = t

    async def call(self, fn: Any, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """A blocking binding call, in a worker thread."""
        async with asyncio.timeout(timeout):
            return await asyncio.to_thread(fn, *args)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._callback is not None:
                await self.call(self.conn.domainEventDeregisterAny, self._callback)
        with contextlib.suppress(Exception):
            await self.call(self.conn.close)

    async def running(self) -> list[DomainInfo]:
        """Domains that are active and running (not paused for an incoming migration)."""
        flags = self.lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE

        def listing() -> list[DomainInfo]:
            out = []
            for d in self.conn.listAllDomains(flags):
                with contextlib.suppress(self.lv.libvirtError):
                    state = d.state()[0]
                    out.append(DomainInfo(d.name(), d.UUIDString(),
                                          state == self.lv.VIR_DOMAIN_RUNNING))
            return out

        try:
            result: list[DomainInfo] = await self.call(listing)
        except self.lv.libvirtError as err:
            raise VmStateError(f"cannot list domains: {_text(err)}", vm=self.uri) from err
        return result

    async def monitor(self, name: str) -> LibvirtMonitor:
        """The monitor of a running domain, by name (or UUID)."""
        def lookup() -> Any:
            try:
                return self.conn.lookupByName(name)
            except self.lv.libvirtError:
                return self.conn.lookupByUUIDString(name)

        try:
            dom = await self.call(lookup)
            active = await self.call(dom.isActive)
            dname, uuid = dom.name(), dom.UUIDString()
        except self.lv.libvirtError as err:
            raise VmStateError(f"no such domain on {self.uri}: {_text(err)}", vm=name,
                               hint="virsh list --all shows the domains") from err
        if not active:
            raise VmStateError("the domain is not running", vm=dname)
        return LibvirtMonitor(self, dom, dname, uuid)


class LibvirtMonitor(QmpVm):
    """QEMU's monitor through libvirt's passthrough; the `QmpVm` API the scanner uses."""

    def __init__(self, host: LibvirtHost, dom: Any, name: str, uuid: str) -> None:
        # Not QmpVm.__init__: there is no QMP client of our own.
        self.socket = f"libvirt {host.uri} domain {name}"
        self._lock = asyncio.Lock()
        self.host = host
        self.dom = dom
        self.domain = name
        self.uuid = uuid
        self.owns_host = False  # close() closes the connection too
        #: Why the domain is gone, from its lifecycle event (`mark_gone`).
        self.gone: str | None = None
        #: Someone follows lifecycle events for this domain: a command that finds the
        #: domain gone waits briefly for the event, so the reason is the event's.
        self.follows_events = False
        self._gone_event = asyncio.Event()

    def mark_gone(self, reason: str) -> None:
        self.gone = reason
        self._gone_event.set()

    async def close(self) -> None:
        if self.owns_host:
            await self.host.close()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = COMMAND_TIMEOUT) -> Any:
        if self.gone:
            raise QmpError(self.gone, socket=self.socket, command=cmd)
        text = json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
        lv = self.host.lv
        try:
            raw = await self.host.call(self.host.lvq.qemuMonitorCommand, self.dom, text, 0,
                                       timeout=timeout)
        except TimeoutError:
            raise QmpError(f"no reply within {timeout:g}s", socket=self.socket,
                           command=cmd) from None
        except lv.libvirtError as err:
            code = err.get_error_code()
            gone = code in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID)
            if gone and self.follows_events and not self.gone:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(GONE_EVENT_WAIT):
                        await self._gone_event.wait()
            if self.gone:
                raise QmpError(self.gone, socket=self.socket, command=cmd) from err
            raise QmpError(_text(err), socket=self.socket, command=cmd,
                           hint="the domain is not running" if gone else "") from err
        try:
            reply = json.loads(raw)
        except (TypeError, ValueError) as err:
            raise QmpError(f"passthrough reply is not JSON: {err}", socket=self.socket,
                           command=cmd) from err
        if isinstance(reply, dict) and "error" in reply:
            e = reply["error"] if isinstance(reply["error"], dict) else {}
            raise MonitorCommandError(f"{e.get('class', 'Error')}: {e.get('desc', '')}",
                                      socket=self.socket, command=cmd)
        return reply.get("return") if isinstance(reply, dict) else None

    async def _qom_get(self, path: str, prop: str) -> Any:
        try:
            return await self.execute("qom-get", {"path": path, "property": prop})
        except MonitorCommandError:
            return None  # property absent

    async def name(self) -> str:
        return self.domain

    async def stop(self) -> None:
        """virDomainSuspend — unless a migration (or other job) is running."""
        lv = self.host.lv
        try:
            job = await self.host.call(self.dom.jobInfo)
            if job and job[0] != lv.VIR_DOMAIN_JOB_NONE:
                raise QmpError("not paused: the domain has a job running (a migration?)",
                               socket=self.socket, command="virDomainSuspend",
                               hint="kscan does not pause migrating domains")
            await self.host.call(self.dom.suspend)
        except lv.libvirtError as err:
            raise QmpError(_text(err), socket=self.socket, command="virDomainSuspend") from err

    async def cont(self) -> None:
        try:
            await self.host.call(self.dom.resume)
        except self.host.lv.libvirtError as err:
            raise QmpError(_text(err), socket=self.socket, command="virDomainResume") from err

    def pid(self) -> int:
        return domain_pid(self.domain, self.uuid)


class MonitorCommandError(QmpError):
    """QEMU answered a passthrough command with an error."""


def _text(err: Exception) -> str:
    return " ".join(str(err).split())

"""QMP access to one VM: registers, run state, memory backends and RAM layout.

This lives in `scanner/`, not `translate/`: it is I/O with QEMU (asyncio, sockets,
timeouts), and `translate/` stays a pure library that is fed the layout and register
values it needs, so it can be unit-tested on synthetic memory without a QEMU.

Built on `qemu.qmp.QMPClient`. Its default event listener keeps an unbounded queue and
history and cannot be removed, so we give it a name filter no event matches: kscan
never reads QMP events through it, and a long-running watcher must not grow without
bound. Every call has a timeout chosen at the call site, and every
qemu.qmp error is converted here, once, into `QmpError` naming the socket and command.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from qemu.qmp import EventListener, Message, QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import ConnectError
from qemu.qmp.qmp_client import ExecuteError

from scanner.errors import QmpError, VmStateError
from scanner.qemu.hmp import FlatRange, ParseError, VcpuState, parse_flatview, parse_registers
from translate.physmem import RamRange, append_ram

__all__ = ["Memdev", "QmpVm", "RunState", "RunStatus"]

log = logging.getLogger("kscan.qmp")
# qemu.qmp logs every failed connect at ERROR with a traceback; our errors say enough.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 15.0
#: Deadline of one operation made of several commands (the RAM layout: one qom-get per
#: memdev; the CPU model): a peer answering each command just in time must not stretch
#: it without bound.
OPERATION_TIMEOUT = 30.0
#: More memory backends than this is not a VM kscan can read (QEMU allows 256 NUMA
#: nodes; real VMs have one or two backends).
MAX_MEMDEVS = 256
#: Feature words: QEMU reports ~40; refuse a reply far beyond that.
MAX_FEATURE_WORDS = 1024
#: More vCPUs than QEMU allows (x86 max_cpus is 4096 with x2APIC + IOMMU): a broken reply.
MAX_VCPUS = 8192
_U64 = 1 << 64


_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


class RunStatus(enum.StrEnum):
    """QEMU's RunState (qapi/run-state.json); a value this kscan does not know is UNKNOWN."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> RunStatus:
        return cls.UNKNOWN

    @property
    def gone(self) -> bool:
        """The guest will not run its kernel again without a reset."""
        return self in (RunStatus.SHUTDOWN, RunStatus.INTERNAL_ERROR, RunStatus.GUEST_PANICKED)


@dataclass(frozen=True)
class RunState:
    status: RunStatus
    running: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", RunStatus(self.status))


@dataclass(frozen=True)
class Memdev:
    """A memory backend object of the VM."""

    id: str
    size: int
    path: str | None  # mem-path for file backends, None for anonymous RAM
    share: bool
    offset: int  # newer QEMU: where in the file the backend starts


class _Client(QMPClient):
    """qemu.qmp's client without its per-message debug text.

    Its message hooks (`_cb_outbound`/`_cb_inbound`, documented as the place for
    subclasses to filter messages) format every message as indented JSON for a debug
    line that is off (we silence qemu.qmp's logger): ~70 us of kscan's CPU per command,
    a third of a live fast pass's register refresh, and a peer's large reply formatted
    for nothing. Here the text is made only when that debug log is on."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_outbound(msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_inbound(msg)
        return msg


class QmpVm:
    """An open QMP session with one QEMU. Use `async with await QmpVm.connect(...)`."""

    #: RESET events seen (0 where events are not delivered, as through libvirt).
    resets = 0

    def __init__(self, socket: str, client: QMPClient) -> None:
        self.socket = socket
        self._client = client
        self._lock = asyncio.Lock()  # HMP commands are not re-entrant per monitor
        #: RESET events seen (a guest reboot, or a system_reset): kscan run drops the
        #: VM's per-boot state on one, even if the kernel comes back at the same slide.
        self.resets = 0

    def _on_event(self, msg: Message) -> bool:
        if msg.get("event") == "RESET":
            self.resets += 1
        return False

    # -- lifecycle -------------------------------------------------------------------
    @classmethod
    async def connect(cls, socket: str | os.PathLike[str],
                      timeout: float = CONNECT_TIMEOUT) -> QmpVm:
        path = os.fspath(socket)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise QmpError("no such socket", socket=path,
                           hint="is QEMU running with -qmp unix:PATH,server=on,wait=off?") from None
        except OSError as err:
            raise QmpError(f"cannot stat: {err.strerror}", socket=path) from err
        if not stat.S_ISSOCK(st.st_mode):
            raise QmpError("not a unix socket", socket=path,
                           hint="pass the path given to QEMU's -qmp unix:PATH option")
        client = _Client(os.path.basename(path))
        # The default listener cannot be removed; make it accept no event at all.
        client.events.names = {"kscan: no events"}
        try:
            async with asyncio.timeout(timeout):
                await client.connect(path)
        except TimeoutError:
            await _quiet_disconnect(client)
            raise QmpError(f"no QMP greeting within {timeout:g}s", socket=path,
                           hint="QEMU serves one client per QMP socket: is another client "
                                "(kscan run, libvirt) connected? Give kscan its own -qmp "
                                "socket. Or this is not a QMP socket") from None
        except ConnectError as err:
            await _quiet_disconnect(client)
            raise QmpError(f"cannot connect: {err.exc if err.exc else err}", socket=path,
                           hint="is this a QEMU QMP socket, and is that QEMU still running?"
                           ) from err
        except (QMPError, OSError, EOFError) as err:
            await _quiet_disconnect(client)
            raise QmpError(f"not a QMP peer: {err}", socket=path,
                           hint="pass QEMU's -qmp socket") from err
        vm = cls(path, client)
        # RESETs are counted in a listener's filter, which queues nothing: no unbounded
        # queue of events in a long-running watcher.
        client.register_listener(EventListener(event_filter=vm._on_event))
        return vm

    async def close(self) -> None:
        await _quiet_disconnect(self._client)

    async def __aenter__(self) -> QmpVm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- commands --------------------------------------------------------------------
    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = COMMAND_TIMEOUT) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(cmd, args)
        except TimeoutError:
            raise QmpError(f"no reply within {timeout:g}s", socket=self.socket,
                           command=cmd) from None
        except ExecuteError as err:
            raise QmpError(f"{err.error_class}: {err}", socket=self.socket,
                           command=cmd) from err
        except (QMPError, OSError, EOFError) as err:
            raise QmpError(f"connection lost: {err or type(err).__name__}", socket=self.socket,
                           command=cmd, hint="the VM may have exited") from err

    @contextlib.asynccontextmanager
    async def deadline(self, what: str, timeout: float | None = None
                       ) -> AsyncIterator[None]:
        """One deadline over a whole operation of several commands (default
        OPERATION_TIMEOUT)."""
        timeout = OPERATION_TIMEOUT if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError:
            raise QmpError(f"{what} took longer than {timeout:g}s", socket=self.socket,
                           command=what, hint="the QEMU process is overloaded or not "
                           "a well-behaved QMP peer") from None

    def _bad(self, command: str, what: str) -> QmpError:
        return QmpError(f"malformed reply: {what}", socket=self.socket, command=command,
                        hint="the peer is not a QEMU kscan understands")

    async def hmp(self, command_line: str, timeout: float = COMMAND_TIMEOUT,
                  cpu_index: int | None = None) -> str:
        """An HMP command; `cpu_index` selects the vCPU for this command only (HMP `cpu N`
        does not persist between `human-monitor-command` calls)."""
        args: dict[str, Any] = {"command-line": command_line}
        if cpu_index is not None:
            args["cpu-index"] = cpu_index
        async with self._lock:
            out = await self.execute("human-monitor-command", args, timeout)
        if not isinstance(out, str):
            raise QmpError("human-monitor-command returned no text", socket=self.socket,
                           command=command_line)
        return out

    async def name(self) -> str:
        reply = await self.execute("query-name")
        name = reply.get("name") if isinstance(reply, dict) else None
        if isinstance(name, str) and name and len(name) <= 256:
            return name
        return os.path.basename(os.path.dirname(self.socket)) or self.socket

    async def query_uuid(self) -> str | None:
        """The VM's UUID (`-uuid`), or None if QEMU has none (all zeros) or the reply is
        not a UUID."""
        reply = await self.execute("query-uuid")
        text = reply.get("UUID") if isinstance(reply, dict) else None
        if (isinstance(text, str) and _UUID.fullmatch(text)
                and text != "00000000-0000-0000-0000-000000000000"):
            return text.lower()
        return None

    async def run_state(self) -> RunState:
        reply = await self.execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise QmpError("query-status reply has no status", socket=self.socket,
                           command="query-status")
        return RunState(reply["status"], bool(reply.get("running")))

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def vcpus(self) -> list[VcpuState]:
        text = await self.hmp("info registers -a")
        try:
            return parse_registers(text)
        except ParseError as err:
            raise QmpError(str(err), socket=self.socket, command="info registers -a") from err

    async def flatview(self) -> list[FlatRange]:
        text = await self.hmp("info mtree -f")
        try:
            return parse_flatview(text)
        except ParseError as err:
            raise QmpError(str(err), socket=self.socket, command="info mtree -f") from err

    async def memdevs(self) -> list[Memdev]:
        async with self.deadline("query-memdev"):
            return await self._memdevs()

    async def _memdevs(self) -> list[Memdev]:
        reply = await self.execute("query-memdev")
        if not isinstance(reply, list):
            raise QmpError("query-memdev reply is not a list", socket=self.socket,
                           command="query-memdev")
        if len(reply) > MAX_MEMDEVS:
            raise self._bad("query-memdev", f"{len(reply)} memory backends")
        out = []
        for dev in reply:
            if not isinstance(dev, dict) or not isinstance(dev.get("id"), str):
                continue
            mid, size = dev["id"], dev.get("size", 0)
            if not _is_u64(size):
                raise self._bad("query-memdev", f"memdev {mid!r} has size {size!r:.40}")
            path = await self._qom_get(f"/objects/{mid}", "mem-path")
            share = dev.get("share")
            if share is None:
                share = await self._qom_get(f"/objects/{mid}", "share")
            offset = await self._qom_get(f"/objects/{mid}", "offset")
            if offset is not None and not _is_u64(offset):
                raise self._bad("qom-get", f"memdev {mid!r} has offset {offset!r:.40}")
            out.append(Memdev(mid, size, path if isinstance(path, str) and path else None,
                              share is True, offset or 0))
        return out

    async def _qom_get(self, path: str, prop: str) -> Any:
        try:
            return await self.execute("qom-get", {"path": path, "property": prop})
        except QmpError as err:
            if isinstance(err.__cause__, ExecuteError):
                return None  # property absent: not a file backend, or an older QEMU
            raise

    async def ram_layout(self, vm: str | None = None) -> list[RamRange]:
        """GPA → (file, offset) for all of the VM's RAM that lives in backend files."""
        vm = vm or self.socket
        devs = await self.memdevs()
        files = {d.id: d for d in devs if d.path}
        if not files:
            raise VmStateError(
                "guest RAM is not in a memory-backend-file (kscan maps that file)", vm=vm,
                hint="start QEMU with -object memory-backend-file,id=ram0,size=...,"
                     "mem-path=/dev/shm/NAME,share=on -machine memory-backend=ram0")
        private = [d.id for d in files.values() if not d.share]
        if private:
            raise VmStateError(
                f"memory backend {', '.join(private)} has share=off: the file does not see "
                "the guest's writes", vm=vm, hint="add share=on to -object memory-backend-file")
        return layout_from_flatview(await self.flatview(), files, vm)

    async def gva2gpa(self, va: int, cpu: int = 0) -> int | None:
        """QEMU's own translation (HMP gva2gpa) — kscan's test oracle."""
        text = (await self.hmp(f"gva2gpa {va:#x}", cpu_index=cpu)).strip()
        if text.startswith("gpa:"):
            return int(text.split(":", 1)[1].strip(), 16)
        return None

    async def vcpu_threads(self) -> list[int]:
        """The host thread id of each vCPU (query-cpus-fast), in vCPU order: how the
        host tells whether the guest has run (`scanner.vm.progress`)."""
        async with self.deadline("query-cpus-fast"):
            cpus = await self.execute("query-cpus-fast")
        if not isinstance(cpus, list) or not 0 < len(cpus) <= MAX_VCPUS:
            raise self._bad("query-cpus-fast", f"{str(cpus)[:60]!r}")
        tids = []
        for c in cpus:
            tid = c.get("thread-id") if isinstance(c, dict) else None
            if not isinstance(tid, int) or isinstance(tid, bool) or not 0 < tid < 1 << 22:
                raise self._bad("query-cpus-fast", f"thread-id {tid!r:.40}")
            tids.append(tid)
        return tids

    async def cpu_model(self) -> tuple[str, list[Any]]:
        """(QOM type, feature words) of vCPU 0: what boot-time code patching depends on."""
        async with self.deadline("query-cpus-fast"):
            cpus = await self.execute("query-cpus-fast")
            if (not isinstance(cpus, list) or not cpus or not isinstance(cpus[0], dict)
                    or not isinstance(cpus[0].get("qom-path"), str)):
                raise QmpError("query-cpus-fast gave no vCPU", socket=self.socket,
                               command="query-cpus-fast")
            path = cpus[0]["qom-path"]
            kind = await self._qom_get(path, "type")
            words = await self._qom_get(path, "feature-words")
        if kind is not None and (not isinstance(kind, str) or len(kind) > 256):
            raise self._bad("qom-get", f"CPU type {kind!r:.40}")
        return (str(kind), self._feature_words(words))

    def _feature_words(self, words: Any) -> list[Any]:
        """The feature words, each a flat object of strings and 64-bit integers."""
        if not isinstance(words, list):
            return []
        if len(words) > MAX_FEATURE_WORDS:
            raise self._bad("qom-get", f"{len(words)} feature words")
        for w in words:
            if not isinstance(w, dict) or not all(
                    isinstance(k, str) and len(k) <= 64
                    and (_is_u64(v) or (isinstance(v, str) and len(v) <= 64))
                    for k, v in w.items()):
                raise self._bad("qom-get", f"feature word {str(w)[:60]!r}")
        return words


def layout_from_flatview(ranges: Sequence[FlatRange], files: dict[str, Memdev],
                         vm: str | None = None) -> list[RamRange]:
    """Keep the flat-view ranges that belong to file backends; merge those that continue
    each other in both GPA and file offset."""
    out: list[RamRange] = []
    for fr in ranges:
        dev = files.get(fr.name)
        if dev is None or dev.path is None:
            continue
        if fr.offset + fr.size > dev.size:
            raise VmStateError(f"flat view maps {fr.name}+{fr.offset:#x} past its size "
                               f"{dev.size:#x}", vm=vm or dev.id)
        r = RamRange(fr.start, fr.size, dev.path, dev.offset + fr.offset)
        append_ram(out, r)
    return out


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64


async def _quiet_disconnect(client: QMPClient) -> None:
    with contextlib.suppress(Exception):
        await client.disconnect()

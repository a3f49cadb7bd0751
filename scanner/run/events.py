"""The event stream: one JSON object per line on stdout, and the database's event log.

Every event has `ts` (Unix time, float), `event` (its type), `severity` (critical,
warning, notice, info), `host` (this host's name) and `vm` (the VM's name, or null for
kscan's own events), `uuid` where the VM has one, plus fields of its type
(docs/operating.md: "Events"; the JSON Schema: kscan/contrib/events.schema.json).

Order of a detection's path: an event is appended to the database's append-only log
first (every type except `DROPPABLE`), then queued for stdout; `emit` never waits for
stdout, so a stalled reader cannot hold up a VM's action, scans or any other VM.

Stdout is written by a thread of its own (a blocking write on the event loop would
freeze every VM), from a bounded queue of `queue_size` lines. When the queue is full:

1. `stats` (`DROPPABLE`) go first: a new one is not queued, and queued ones are evicted
   to make room for other events; each counts in `dropped`;
2. other events, except those in `NEVER_DROP`, are then left out of stdout only (they
   are in the database already) and count in `dropped` too;
3. `NEVER_DROP` events (`tamper`, `tamper_transient`, `action`, `tamper_cleared`,
   `forensics_failed`) are always queued, in a reserve of another `queue_size` lines
   beyond the bound; only beyond that reserve would one be left out of stdout
   (counted, and in the database).

If stdout accepts nothing for `stall_warning` seconds kscan says so on stderr, once per
stall, and again when it flows. On close the queue is given `CLOSE_TIMEOUT` seconds to
drain; the rest is reported on stderr (it is in the database).

Under systemd (`scanner.run.journal`) each line starts with its syslog priority `<N>`
for journald, and the one-line summary of each event is not also logged on stderr.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

from scanner.run.journal import is_journal, priority_prefix
from scanner.terminal import printable

__all__ = ["DROPPABLE", "NEVER_DROP", "EventSink"]

log = logging.getLogger("kscan.events")

DROPPABLE = frozenset({"stats"})
NEVER_DROP = frozenset({"tamper", "tamper_transient", "action", "tamper_cleared",
                        "forensics_failed"})
QUEUE_SIZE = 4096
STALL_WARNING = 10.0
CLOSE_TIMEOUT = 5.0
#: Lines handed to the writer thread at once, at most this many bytes (one write call).
BATCH_BYTES = 1 << 20


#: The host every event comes from (a SIEM sees many).
HOST = socket.gethostname()

#: Severity of each event type, in the manner of Falco's priorities. Tampering is the
#: one critical event; what needs an operator's look is a warning; what changes a VM's
#: standing is a notice; the rest is info.
SEVERITY: dict[str, str] = {
    "tamper": "critical", "tamper_transient": "critical",
    "vm_lost": "warning", "vm_unreachable": "warning", "error": "warning",
    "forensics_failed": "warning", "profile_missing": "warning",
    "baseline_missing": "warning", "module_list_broken": "warning", "slow_paced": "warning",
    "tamper_cleared": "notice", "kernel_patched": "notice", "vm_rebooted": "notice",
    "vm_found": "notice", "vm_skipped": "notice", "pruned": "notice", "action": "notice",
    "reloaded": "notice", "module_loaded": "notice", "module_unloaded": "notice",
}
SEVERITIES = ("critical", "warning", "notice", "info")


def severity(event: str, fields: dict[str, Any]) -> str:
    """The severity of an event: a failed action is a warning; unknown types are info."""
    if event == "action" and fields.get("ok") is False:
        return "warning"
    if event == "module_loaded" and fields.get("sig_ok") is False:
        return "warning"  # the kernel did not accept its signature
    if event == "kernel_patched" and any(
            isinstance(o, dict) and o.get("kind") == "module" for o in fields.get("owners", ())):
        return "warning"  # a module (signed, or trusted by the operator) patched the kernel
    return SEVERITY.get(event, "info")


class EventSink:
    def __init__(self, out: IO[bytes] | None = None,
                 persist: Callable[[dict[str, Any]], Any] | None = None,
                 queue_size: int = QUEUE_SIZE, stall_warning: float = STALL_WARNING,
                 close_timeout: float = CLOSE_TIMEOUT, journal: bool | None = None,
                 shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self._out = out if out is not None else sys.stdout.buffer
        #: What stdout gets of each event (`scanner.run.formats`: ECS, OCSF); the
        #: database keeps the native event.
        self._shape = shape
        #: stdout is journald's stream: each line starts with its `<N>` priority, and
        #: when stderr is the journal too no summary of an event goes there (one entry
        #: per event). None: find out from the process's fds (scanner.run.journal).
        if journal is None:
            journal = out is None and is_journal(1)
        self.journal = journal
        self.echo = not (journal and is_journal(2))
        self._persist = persist
        self._size = max(1, queue_size)
        self._stall_warning = stall_warning
        self._close_timeout = close_timeout
        #: (event type, line); bounded by `_size` (+ `_size` for NEVER_DROP events).
        self._lines: collections.deque[tuple[str, bytes]] = collections.deque()
        self._ready = asyncio.Event()
        self.dropped = 0
        self.written = 0
        self.stalled = False
        self._task: asyncio.Task[None] | None = None
        #: Fields added to every event of a VM, by VM name (a libvirt domain's uuid).
        self.labels: dict[str, dict[str, Any]] = {}
        self._thread: _WriterThread | None = None
        self._closing = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = _WriterThread(self._out, loop)
        self._thread.start()
        self._task = loop.create_task(self._writer(), name="events")

    async def emit(self, event: str, vm: str | None, **fields: Any) -> dict[str, Any]:
        extra = self.labels.get(vm, {}) if vm is not None else {}
        ev = {"ts": time.time(), "event": event, "severity": severity(event, fields),
              "host": HOST, "vm": vm, **extra, **fields}
        if self._persist is not None and event not in DROPPABLE:
            try:
                await self._persist(ev)
            except Exception as err:  # the stream must go on; the log says why
                log.error("event not stored in the database: %s", printable(err))
        if event not in DROPPABLE and self.echo:
            log.info("%s", printable(human(ev)))
        shown = self._shape(ev) if self._shape is not None else ev
        line = orjson.dumps(shown, option=orjson.OPT_NON_STR_KEYS, default=_default) + b"\n"
        if self.journal:
            line = priority_prefix(ev["severity"]) + line
        self._enqueue(event, line)
        return ev

    def _enqueue(self, event: str, line: bytes) -> None:
        q = self._lines
        if len(q) >= self._size:
            if event in DROPPABLE:
                self.dropped += 1
                return
            evicted = next((i for i, (kind, _) in enumerate(q) if kind in DROPPABLE), None)
            if evicted is not None:
                del q[evicted]
                self.dropped += 1
            elif event not in NEVER_DROP or len(q) >= 2 * self._size:
                self.dropped += 1
                self._say_stalled()
                return
        q.append((event, line))
        self._ready.set()

    def _say_stalled(self) -> None:
        if not self.stalled:
            self.stalled = True
            log.warning("stdout is not being read: stats and routine events are left "
                        "out of it (they are counted; every event but stats is in the "
                        "database's event log)")

    async def _writer(self) -> None:
        assert self._thread is not None
        while True:
            while not self._lines:
                if self._closing:
                    return
                self._ready.clear()
                await self._ready.wait()
            batch, size = [], 0
            while self._lines and size < BATCH_BYTES:
                _, line = self._lines.popleft()
                batch.append(line)
                size += len(line)
            fut = self._thread.submit(b"".join(batch))
            try:
                await asyncio.wait_for(asyncio.shield(fut), self._stall_warning)
            except TimeoutError:
                self._say_stalled()
                await fut
            if self.stalled and not self._lines:
                self.stalled = False
                log.info("stdout is being read again")
            self.written += len(batch)

    async def close(self) -> None:
        if self._task is None:
            return
        self._closing = True
        self._ready.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._close_timeout)
        except TimeoutError:
            left = len(self._lines)
            log.warning("stdout did not take the last events within %gs; %d queued "
                        "line(s) not written (every event but stats is in the database)",
                        self._close_timeout, left)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        except asyncio.CancelledError:
            pass
        if self._thread is not None:
            self._thread.stop()


class _WriterThread(threading.Thread):
    """Writes batches to stdout; blocking here blocks only this (daemon) thread."""

    def __init__(self, out: IO[bytes], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name="kscan-stdout", daemon=True)
        self._out: IO[bytes] | _Null = out
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[bytes, asyncio.Future[None]] | None] = \
            queue.SimpleQueue()

    def submit(self, data: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._jobs.put((data, fut))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)

    def run(self) -> None:
        while (job := self._jobs.get()) is not None:
            data, fut = job
            try:
                self._out.write(data)
                self._out.flush()
            except (BrokenPipeError, ValueError, OSError) as err:
                log.warning("stdout closed (%s); events go to the database only",
                            type(err).__name__)
                self._out = _Null()
            with contextlib.suppress(RuntimeError):  # the loop may be gone at exit
                self._loop.call_soon_threadsafe(_done, fut)


def _done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _items(ev: dict[str, Any], key: str) -> list[Any]:
    got = ev.get(key)
    return got if isinstance(got, list) else []


def human(ev: dict[str, Any]) -> str:
    """A one-line summary of an event for the log on stderr."""
    who = ev["vm"] or ""
    kind = ev["event"]
    if not who:
        detail = ev.get("message") or ev.get("policy") or ""
        return str(kind) + (f": {detail}" if detail else "")
    if kind == "tamper":
        # Also for rows of the event log another version wrote: only well-formed items.
        ms = [m for m in _items(ev, "mismatches") if isinstance(m, dict)]
        fs = [f for f in _items(ev, "findings") if isinstance(f, dict)]
        parts = [m["pointers"][0].get("message", "") if m.get("pointers") else
                 f"{m.get('region')} page {m.get('page')} ({m.get('basis')}"
                 + (f", {m['ranges'][0].get('kind')}" if m.get("ranges") else "") + ")"
                 for m in ms[:4]]
        parts += [str(f.get("message", "")) for f in fs[:4]]
        more = len(ms) + len(fs) - len(parts)
        return (f"{who}: TAMPERED: " + "; ".join(parts) + (f"; +{more} more" if more > 0
                                                            else "")
                + f" [action {ev.get('action')}, forensics {ev.get('forensics')}]")
    if kind == "action":
        return f"{who}: action {ev.get('action')}: " + ("ok" if ev.get("ok") else "FAILED") \
            + (f" (run state {ev['run_state']})" if "run_state" in ev else "") \
            + (f" {ev['error']}" if ev.get("error") else "")
    detail = ev.get("message") or ev.get("reason") or ""
    if kind == "vm_identified":
        detail = f"{ev.get('release')} slide {ev.get('slide')} {ev.get('boot_profile')}"
    return f"{who}: {kind}" + (f": {detail}" if detail else "")


def _default(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray):
        return obj.hex()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"not serializable: {type(obj).__name__}")


class _Null:
    def write(self, b: bytes) -> int:
        return len(b)

    def flush(self) -> None:
        pass

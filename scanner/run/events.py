"""The event stream: one JSON object per line on stdout, and the database's event log.

Every event has `ts` (Unix time, float), `event` (its type) and `vm` (the VM's name, or
null for kscan's own events), plus fields of its type (README: "Events"). Lines are
written by one task from a bounded queue. Policy when the reader of stdout is slower
than kscan: events of the types in `DROPPABLE` (routine `stats`) are dropped and
counted (`dropped` in the next stats event); every other event waits for room, so no
detection is ever lost.

Events also go to the database's append-only log, except `DROPPABLE` ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

__all__ = ["DROPPABLE", "EventSink"]

log = logging.getLogger("kscan.events")

DROPPABLE = frozenset({"stats"})
QUEUE_SIZE = 4096


class EventSink:
    def __init__(self, out: IO[bytes] | None = None,
                 persist: Callable[[dict[str, Any]], Any] | None = None,
                 queue_size: int = QUEUE_SIZE) -> None:
        self._out = out if out is not None else sys.stdout.buffer
        self._persist = persist
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(queue_size)
        self.dropped = 0
        self.written = 0
        self._task: asyncio.Task[None] | None = None
        #: Fields added to every event of a VM, by VM name (a libvirt domain's uuid).
        self.labels: dict[str, dict[str, Any]] = {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._writer(), name="events")

    async def emit(self, event: str, vm: str | None, **fields: Any) -> dict[str, Any]:
        extra = self.labels.get(vm, {}) if vm is not None else {}
        ev = {"ts": time.time(), "event": event, "vm": vm, **extra, **fields}
        if event in DROPPABLE:
            try:
                self._queue.put_nowait(ev)
            except asyncio.QueueFull:
                self.dropped += 1
        else:
            await self._queue.put(ev)
        return ev

    async def _writer(self) -> None:
        opts = orjson.OPT_NON_STR_KEYS
        while True:
            ev = await self._queue.get()
            if ev is None:
                return
            line = orjson.dumps(ev, option=opts, default=_default) + b"\n"
            try:
                self._out.write(line)
                if self._queue.empty():
                    self._out.flush()
            except BrokenPipeError:
                log.warning("stdout closed; events go to the database only")
                self._out = _Null()
            self.written += 1
            if ev["event"] not in DROPPABLE:
                log.info("%s", human(ev))
            if self._persist is not None and ev["event"] not in DROPPABLE:
                try:
                    await self._persist(ev)
                except Exception as err:  # the stream must go on; the log says why
                    log.error("event not stored in the database: %s", err)

    async def close(self) -> None:
        if self._task is None:
            return
        await self._queue.put(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(Exception):
            self._out.flush()


def human(ev: dict[str, Any]) -> str:
    """A one-line summary of an event for the log on stderr."""
    who = ev["vm"] or ""
    kind = ev["event"]
    if not who:
        detail = ev.get("message") or ev.get("policy") or ""
        return str(kind) + (f": {detail}" if detail else "")
    if kind == "tamper":
        parts = [f"{m['region']} page {m['page']} ({m['basis']}"
                 + (f", {m['ranges'][0]['kind']}" if m["ranges"] else "") + ")"
                 for m in ev.get("mismatches", [])[:4]]
        parts += [f["message"] for f in ev.get("findings", [])[:4]]
        more = len(ev.get("mismatches", [])) + len(ev.get("findings", [])) - len(parts)
        return (f"{who}: TAMPERED: " + "; ".join(parts) + (f"; +{more} more" if more > 0
                                                            else "")
                + f" [action {ev.get('action')}, forensics {ev.get('forensics')}]")
    if kind == "action":
        return f"{who}: action {ev.get('action')}: " + ("ok" if ev.get("ok") else "FAILED") \
            + (f" (run state {ev['run_state']})" if "run_state" in ev else "") \
            + (f" {ev['error']}" if ev.get("error") else "")
    detail = ev.get("message") or ev.get("reason") or ""
    if kind == "vm_identified":
        detail = f"{ev.get('release')} slide {ev.get('slide', 0):#x} {ev.get('boot_profile')}"
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

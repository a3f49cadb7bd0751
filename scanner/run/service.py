"""`kscan run` under a service manager: systemd's notification protocol.

`Notifier` speaks sd_notify(3) over the datagram socket systemd names in
`$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace) — a few lines, no
dependency. With no `$NOTIFY_SOCKET` every call is a no-op, so the same code runs
under a terminal, a test and systemd.

* `READY=1` once every source configured at start has been attached (`vm_found`) or
  reported unreachable once (`notify_ready`); `Type=notify` units start then.
* `WATCHDOG=1` every half of `$WATCHDOG_USEC`, sent by a task on the event loop
  (`watchdog`): a wedged loop stops the pings and systemd restarts kscan
  (`WatchdogSec=`).
* `RELOADING=1` … `READY=1` around a SIGHUP reload, `STOPPING=1` on the way out, and a
  `STATUS=` line for `systemctl status`.

The socket is non-blocking: a full socket buffer loses one notification rather than
ever blocking the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Protocol

__all__ = ["Notifier", "Service", "notify_ready", "run_service_tasks", "watchdog"]

log = logging.getLogger("kscan.service")

READY_POLL = 0.1
#: A notification systemd had no room for is sent again this often, this many times.
RETRY_AFTER, RETRIES = 0.05, 40


class Notifier:
    """sd_notify over `$NOTIFY_SOCKET`; inert without it."""

    def __init__(self, env: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address: str | None = env.get("NOTIFY_SOCKET") or None
        self.watchdog_s: float | None = _watchdog_seconds(env)
        # Like sd_notify(unset_environment=1): an --on-tamper exec hook must not
        # inherit the socket (nor the watchdog: its pings would come from the wrong pid).
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        self._sock: socket.socket | None = None
        if self.address is not None:
            if not (self.address.startswith("/") or self.address.startswith("@")):
                log.warning("NOTIFY_SOCKET %r is neither a path nor @abstract; ignored",
                            self.address)
                self.address = None
            else:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send one notification of `KEY=value` lines; False if it could not go."""
        if self._sock is None or self.address is None:
            return False
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        data = "\n".join(lines).encode()
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            # systemd has not read the last few yet (a unix datagram queue holds ~10).
            # A lost WATCHDOG=1 is made good by the next; anything else is tried again.
            if lines != ("WATCHDOG=1",):
                self._retry(data, addr, RETRIES)
            return False
        except OSError as err:  # systemd gone: never fatal
            log.debug("sd_notify %s: %s", lines, err)
            return False
        self.sent += 1
        return True

    def _retry(self, data: bytes, addr: str, left: int) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def again() -> None:
            if self._sock is None:
                return
            try:
                self._sock.sendto(data, addr)
                self.sent += 1
            except BlockingIOError:
                if left > 1:
                    self._retry(data, addr, left - 1)
            except OSError as err:
                log.debug("sd_notify %r: %s", data, err)

        loop.call_later(RETRY_AFTER, again)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """The watchdog timeout systemd set for this process, or None."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (our parent)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def monotonic_usec() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


class Service(Protocol):
    """What readiness needs of the engine (`scanner.run.engine.Engine`)."""

    first_pass: asyncio.Event
    first_sources: frozenset[str]
    ready: bool

    def settled(self, source: str) -> bool: ...

    def status(self) -> str: ...


async def notify_ready(engine: Service, notifier: Notifier) -> None:
    """Say READY=1 once every source of the first discovery pass has been attached or
    reported unreachable (or lost) once."""
    await engine.first_pass.wait()
    pending = set(engine.first_sources)
    while pending:
        pending = {s for s in pending if not engine.settled(s)}
        if pending:
            await asyncio.sleep(READY_POLL)
    engine.ready = True
    notifier.send("READY=1", f"STATUS={engine.status()}")
    log.debug("ready: %d source(s) settled", len(engine.first_sources))


async def watchdog(notifier: Notifier) -> None:
    """Ping systemd's watchdog from the event loop, twice per timeout."""
    if notifier.watchdog_s is None:
        return
    every = max(0.05, notifier.watchdog_s / 2)
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(every)


async def run_service_tasks(engine: Service, notifier: Notifier) -> None:
    """Readiness and the watchdog, for as long as the engine runs."""
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(notify_ready(engine, notifier), name="sd-ready")
            tg.create_task(watchdog(notifier), name="sd-watchdog")

"""The HTTP side of `--metrics`: a small server that never lets scraping cost scans.

A local client scraping in a tight loop used to run the scan budget into unbounded
debt: every scrape built a snapshot on the loop and rendered it in a thread, and that
thread's CPU was charged to the bucket like any other (measured: 8 s of scraping, then
56 s before the next scan). Here:

* the rendered page is cached and rebuilt at most every `REBUILD_SECONDS` (one
  snapshot on the loop, one rendering); any other scrape gets the cached bytes;
* requests are paced: at most `MAX_RATE` answered per second, at most
  `MAX_CONCURRENT` connections handled at once (more wait in the listen backlog, in
  the kernel) — a waiting handler sleeps, it costs nothing;
* the CPU the handler threads use is measured (`time.thread_time`) and handed to
  `on_cpu`, which exempts it from the scan budget (`Scheduler.exempt`): what scrapes
  cost is bounded by the pacing, and never delays a scan.

It serves `GET /metrics` (and `/`) over TCP (`HOST:PORT`) or a unix socket
(`unix:PATH`: created 0660 — owner and group — with no moment of wider access; a
stale socket left by a killed kscan is replaced, a live one or any other file is not).
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["MAX_CONCURRENT", "MAX_RATE", "REBUILD_SECONDS", "CachedPage", "Pacer",
           "serve_tcp", "serve_unix"]

REBUILD_SECONDS = 1.0
MAX_RATE = 10.0
MAX_CONCURRENT = 4
#: How long a request may wait for its turn before it is answered 503 (bounded).
MAX_WAIT = 5.0
SOCKET_MODE = 0o660
_READ_TIMEOUT = 10.0
_SLOT_WAIT = 1.0


class CachedPage:
    """The rendered metrics page, rebuilt by `build` at most every `min_age` seconds;
    concurrent requests wait for one rebuild instead of each doing their own."""

    def __init__(self, build: Callable[[], bytes], min_age: float = REBUILD_SECONDS) -> None:
        self._build = build
        self._min_age = min_age
        self._lock = threading.Lock()
        self._body = b""
        self._at = -1e9
        self.rebuilds = 0

    def get(self) -> bytes:
        with self._lock:
            if time.monotonic() - self._at >= self._min_age:
                self._body = self._build()
                self._at = time.monotonic()
                self.rebuilds += 1
            return self._body


class Pacer:
    """At most `rate` turns per second, handed out in order; `turn()` sleeps until the
    caller's (False: it would wait longer than `max_wait`)."""

    def __init__(self, rate: float = MAX_RATE, max_wait: float = MAX_WAIT) -> None:
        self._gap = 1.0 / rate
        self._max_wait = max_wait
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def reserve(self) -> float | None:
        """Take the next turn: seconds until it comes, or None (over `max_wait`)."""
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next)
            if at - now > self._max_wait:
                return None
            self._next = at + self._gap
        return at - now

    def turn(self) -> bool:
        wait = self.reserve()
        if wait is None:
            return False
        if wait > 0:
            time.sleep(wait)
        return True


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Serving  # type: ignore[assignment]
    protocol_version = "HTTP/1.0"   # one request per connection: nothing held open
    timeout = _READ_TIMEOUT         # a client that sends nothing does not keep a slot

    def handle(self) -> None:
        t0 = time.thread_time()
        try:
            super().handle()
        finally:
            self.server.on_cpu(time.thread_time() - t0)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            self._answer(404, b"not found: kscan serves /metrics\n", "text/plain")
            return
        if not self.server.pacer.turn():
            self._answer(503, b"too many scrapes: try again later\n", "text/plain",
                         retry_after=True)
            return
        self._answer(200, self.server.page.get(), self.server.content_type)

    def _answer(self, code: int, body: bytes, ctype: str, retry_after: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if retry_after:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass   # scrapes are not events


class _Serving:
    """What the handler needs of its server (mixed into both server classes)."""

    page: CachedPage
    pacer: Pacer
    content_type: str
    on_cpu: Callable[[float], None]
    _slots: threading.BoundedSemaphore

    def _setup(self, page: CachedPage, content_type: str,
               on_cpu: Callable[[float], None]) -> None:
        self.page, self.content_type, self.on_cpu = page, content_type, on_cpu
        self.pacer = Pacer()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)


class _Threads(socketserver.ThreadingMixIn):
    """A thread per connection, at most `MAX_CONCURRENT` at once: the accepting thread
    waits for a free slot, further clients wait in the kernel's backlog."""

    daemon_threads = True
    block_on_close = False
    _slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bounded, so that shutdown() is never stuck behind a full house: a client
        # that finds every slot taken for that long is turned away.
        if not self._slots.acquire(timeout=_SLOT_WAIT):
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _TcpServer(_Threads, _Serving, http.server.HTTPServer):
    def __init__(self, addr: tuple[str, int], page: CachedPage, content_type: str,
                 on_cpu: Callable[[float], None]) -> None:
        self._setup(page, content_type, on_cpu)
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)


class _UnixServer(_Threads, _Serving, socketserver.UnixStreamServer):
    def __init__(self, path: str, page: CachedPage, content_type: str,
                 on_cpu: Callable[[float], None]) -> None:
        self._setup(page, content_type, on_cpu)
        super().__init__(path, _Handler, bind_and_activate=False)
        try:
            old = os.umask(0o777 & ~SOCKET_MODE)   # the socket is never wider than 0660
            try:
                self.server_bind()
            finally:
                os.umask(old)
            os.chmod(path, SOCKET_MODE)
            self.server_activate()
        except BaseException:
            self.server_close()
            raise
        self.inode = os.stat(path).st_ino


Server = _TcpServer | _UnixServer


def _start(server: Server) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name="kscan-metrics", daemon=True)
    t.start()
    return t


def serve_tcp(host: str, port: int, page: CachedPage, content_type: str,
              on_cpu: Callable[[float], None]) -> tuple[_TcpServer, threading.Thread]:
    """Listen on HOST:PORT and serve from a thread; OSError if it cannot listen."""
    server = _TcpServer((host, port), page, content_type, on_cpu)
    return server, _start(server)


def clear_stale_socket(path: str) -> None:
    """Remove a unix socket left at `path` by a kscan that was killed (nothing accepts
    on it). A live socket, or anything that is not a socket, is refused (OSError)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        else:
            raise OSError(errno.EADDRINUSE, f"another process serves on {path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def serve_unix(path: str, page: CachedPage, content_type: str,
               on_cpu: Callable[[float], None]) -> tuple[_UnixServer, threading.Thread]:
    """Listen on the unix socket `path` (replacing a stale one) and serve from a
    thread; OSError if it cannot."""
    if not Path(path).parent.is_dir():
        raise OSError(errno.ENOENT, f"no directory {Path(path).parent}")
    clear_stale_socket(path)
    server = _UnixServer(path, page, content_type, on_cpu)
    return server, _start(server)


def remove_socket(server: _UnixServer, path: str) -> None:
    """Unlink our socket at close — only if it still is ours (same inode)."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == server.inode:
            os.unlink(path)

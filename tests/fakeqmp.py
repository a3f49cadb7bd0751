"""A fake QMP peer for tests: a unix socket speaking QMP's greeting, `qmp_capabilities`
and `execute` as JSON lines, with replies a test chooses — including hostile ones.

It runs in a thread (plain sockets), so it serves kscan in-process and kscan run as a
subprocess alike. By default it answers like a small, well-formed QEMU whose RAM is a
regular file: `query-name`, `query-status`, `query-memdev`, `qom-get` (mem-path, share,
offset, type, feature-words), `query-cpus-fast`, and HMP `info registers -a` /
`info mtree -f`. A test overrides any of those with `replies[cmd]`: a value (the
`return`), a callable taking the arguments, `Delay(seconds, value)`, or `Raw(bytes)`
written as is (for malformed JSON and escape sequences).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": "fake"}, "capabilities": []}}

REGISTERS = """CPU#0
RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000
RIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
GDT=     fffffe0000001000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=0000000000000000 CR3=0000000000001000 CR4=000006b0
EFER=0000000000000d01
"""


def mtree(size: int) -> str:
    return ("FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n"
            f"  0000000000000000-{size - 1:016x} (prio 0, ram): ram0\n")


@dataclass
class Delay:
    seconds: float
    value: Any


@dataclass
class Raw:
    data: bytes


@dataclass
class FakeQmp:
    """Serve QMP on `path`; RAM of `mem_size` bytes in the file `mem_path`."""

    path: Path
    mem_path: Path
    mem_size: int = 1 << 20
    name: str = "fake"
    replies: dict[str, Any] = field(default_factory=dict)
    hmp: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: list[socket.socket] = []

    # -- defaults ----------------------------------------------------------------------
    def default(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "query-name":
            return {"name": self.name}
        if cmd == "query-status":
            return {"status": "running", "running": True}
        if cmd == "query-memdev":
            return [{"id": "ram0", "size": self.mem_size, "merge": False, "dump": True,
                     "prealloc": False, "share": True, "policy": "default",
                     "host-nodes": []}]
        if cmd == "qom-get":
            prop, path = args.get("property"), args.get("path", "")
            if path == "/objects/ram0" and prop == "mem-path":
                return str(self.mem_path)
            if prop == "type":
                return "qemu64-x86_64-cpu"
            if prop == "feature-words":
                return []
            return KeyError(prop)  # → an error reply (property not found)
        if cmd == "query-cpus-fast":
            return [{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]",
                     "thread-id": 1, "target": "x86_64"}]
        if cmd == "human-monitor-command":
            line = args.get("command-line", "")
            if line in self.hmp:
                return self.hmp[line]
            if line.startswith("info registers"):
                return REGISTERS
            if line.startswith("info mtree"):
                return mtree(self.mem_size)
            return ""
        if cmd in ("stop", "cont"):
            return {}
        return KeyError(cmd)

    # -- serving -----------------------------------------------------------------------
    def start(self) -> FakeQmp:
        if not self.mem_path.exists():
            with open(self.mem_path, "wb") as f:
                f.truncate(self.mem_size)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.path))
        s.listen(8)
        s.settimeout(0.2)
        self._sock = s
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"fakeqmp:{self.name}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> FakeQmp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket, obj: Any) -> None:
        conn.sendall(json.dumps(obj).encode() + b"\r\n")

    def _client(self, conn: socket.socket) -> None:
        buf = ""
        decoder = json.JSONDecoder()
        try:
            self._send(conn, GREETING)
            conn.settimeout(0.5)
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buf += chunk.decode()
                while buf.strip():  # QMP is a JSON stream: no newline needed
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break
                    buf = buf.lstrip()[end:]
                    self._answer(conn, msg)
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _answer(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        cmd, args, mid = msg.get("execute", ""), msg.get("arguments") or {}, msg.get("id")
        self.log.append(cmd if cmd != "human-monitor-command" else
                        f"hmp:{args.get('command-line')}")
        if cmd == "qmp_capabilities":
            self._reply(conn, {"return": {}}, mid)
            return
        if cmd in self.replies:
            value = self.replies[cmd]
            if callable(value) and not isinstance(value, Delay | Raw):
                value = value(args)
        else:
            value = self.default(cmd, args)
        if isinstance(value, Delay):
            time.sleep(value.seconds)
            value = value.value
        if isinstance(value, Raw):
            conn.sendall(value.data)
            return
        if isinstance(value, KeyError):
            self._reply(conn, {"error": {"class": "GenericError",
                                         "desc": f"no such thing: {value.args[0]}"}}, mid)
            return
        self._reply(conn, {"return": value}, mid)

    def _reply(self, conn: socket.socket, obj: dict[str, Any], mid: Any) -> None:
        if mid is not None:
            obj = {**obj, "id": mid}
        self._send(conn, obj)


Replier = Callable[[dict[str, Any]], Any]

"""`kscan run` in a subprocess, its JSON-lines event stream collected as it comes.

Shared by the tests, the demo and the benchmarks, which all drive the real command
line. `wait_for` blocks until an event matching a predicate arrives (or fails with the
tail of kscan's stderr); `tee` also copies the stream to our stdout (the demo).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Event = dict[str, Any]
ROOT = Path(__file__).resolve().parent.parent


class NoEvent(AssertionError):
    """The expected event did not come in time (or kscan exited)."""


class KscanRun:
    def __init__(self, args: list[str], stderr_path: Path | None = None,
                 tee: bool = False) -> None:
        self._err = open(stderr_path, "wb") if stderr_path else None  # noqa: SIM115
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen([sys.executable, "-m", "scanner", "run", *args],
                                     stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT)
        self.events: list[Event] = []
        self.bad_lines: list[bytes] = []
        self.cond = threading.Condition()
        self._tee = tee
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self._tee:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            try:
                ev = json.loads(line)
            except ValueError:
                self.bad_lines.append(line)
                continue
            with self.cond:
                self.events.append(ev)
                self.cond.notify_all()

    def wait_for(self, pred: Callable[[Event], bool], timeout: float, after: int = 0) -> Event:
        """The first event (from index `after` on) satisfying `pred`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for ev in self.events[after:]:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = ""
                    if self.stderr_path is not None:
                        tail = self.stderr_path.read_text(errors="replace")[-3000:]
                    raise NoEvent(f"no matching event within {timeout}s; got "
                                  f"{[e['event'] for e in self.events[after:]][-30:]}\n"
                                  f"stderr:\n{tail}")
                self.cond.wait(min(left, 0.5))

    def mark(self) -> int:
        """Index of the next event (pass as `after` to wait for later ones only)."""
        with self.cond:
            return len(self.events)

    def of(self, kind: str, vm: str | None = None, after: int = 0) -> list[Event]:
        with self.cond:
            return [e for e in self.events[after:]
                    if e["event"] == kind and (vm is None or e["vm"] == vm)]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait; kill if it does not stop. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(5)
        if self._err is not None:
            self._err.close()
        return rc

"""Standard streams a command may start without.

A service manager, a cron job or `kscan profile list >&-` can start kscan with fd 0, 1
or 2 closed. Python then sets `sys.stdout` (etc.) to None, and the next file kscan
opens — a socket, the database, uvloop's own pipes — takes the free number: libuv
asserts (`uv__close: fd > STDERR_FILENO`, abort, exit 134) and a later print would go
into the database file. `reopen_closed` puts /dev/null on each closed standard fd first,
as daemons do, so output to a closed stream goes nowhere and nothing else gets its
number.
"""

from __future__ import annotations

import io
import os
import sys

__all__ = ["reopen_closed"]


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def reopen_closed() -> list[int]:
    """Open /dev/null on every closed fd of 0, 1, 2 (and give Python a stream for it);
    return the fds reopened."""
    reopened: list[int] = []
    for fd in (0, 1, 2):
        if not _closed(fd):
            continue
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:  # a lower fd was free too: it is taken in order, so move it
            os.dup2(null, fd)
            os.close(null)
        reopened.append(fd)
        mode = "r" if fd == 0 else "w"
        stream = io.TextIOWrapper(io.FileIO(fd, mode, closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=fd != 0)
        setattr(sys, ("stdin", "stdout", "stderr")[fd], stream)
    return reopened

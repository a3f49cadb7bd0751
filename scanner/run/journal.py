"""`kscan run` under systemd: lines for the journal, and lines for a terminal.

systemd connects a unit's stdout and stderr to journald by a stream socket and names it
in `$JOURNAL_STREAM` (`DEVICE:INODE`, systemd.exec(5)); a process that finds the
numbers of its own fd there is talking to the journal (sd_journal_stream_fd(3) is how
the other side is set up). Then:

* each line starts with its syslog priority, `<N>` (sd-daemon(3): `SD_CRIT` is `<2>`),
  which journald takes as the entry's `PRIORITY=` and strips from `MESSAGE=` (the
  unit's `SyslogLevelPrefix=yes`, systemd's default). A `tamper` is journaled as
  critical, and `journalctl -u kscan -p warning` shows what needs a look;
* the journal timestamps every entry itself, so stderr lines carry no time of their
  own; elsewhere (a terminal, a file) they start with the UTC time;
* when stdout and stderr are both the journal, the one-line summaries of events that
  `run` writes on stderr for a human are left out: the event is journaled once, as
  its JSON line, and `journalctl -o cat` is JSON but for kscan's own log lines.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

__all__ = ["PRIORITY", "StderrFormatter", "is_journal", "priority_prefix"]

#: journald priority of each event severity (syslog levels; sd-daemon's SD_* prefixes).
PRIORITY = {"critical": 2, "error": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}


def is_journal(fd: int, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `fd` is the journal stream systemd names in $JOURNAL_STREAM."""
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def priority_prefix(severity: str) -> bytes:
    """`<N>` for a line of this severity (unknown severities are info)."""
    return b"<%d>" % PRIORITY.get(severity, 6)


_LEVELS = ((logging.ERROR, "error"), (logging.WARNING, "warning"), (logging.INFO, "info"))


class StderrFormatter(logging.Formatter):
    """`kscan: message`, after `<N>` for the journal or the UTC time for anything else."""

    def __init__(self, journal: bool) -> None:
        super().__init__("kscan: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journal:
            name = next((n for lvl, n in _LEVELS if record.levelno >= lvl), "debug")
            # A traceback's further lines would be entries of their own: keep one.
            return f"<{PRIORITY[name]}>" + text.replace("\n", " | ")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {text}"

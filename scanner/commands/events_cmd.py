"""`kscan events`: the database's event log, without sqlite3.

Every event `kscan run` emitted (all but `stats`), and what one-shot commands recorded
(`check`, `baseline`, `accepted`, `imported`, `exported`, `baseline_removed`,
`profile_removed`), read through `store.reader` (read-only: it works while `run`
writes). Filters: `--vm NAME` (repeatable; `--vm ''` for kscan's own events),
`--type T` (repeatable or comma-separated), `--severity S` (this one and worse),
`--since` (`90s`, `15m`, `1h`, `2d`, an ISO 8601 time, or Unix seconds). Without
`--since`, the last `--lines` events (100); with it, every event since then.
`--follow` then prints new events as `run` appends them (polling every second), until
Ctrl-C. Lines are `TIME SEVERITY VM: EVENT: summary`; `--json` prints each event as one
JSON object per line, as `run` writes them on stdout, with its log `id`;
`--event-format ecs|ocsf` prints them as `run --event-format` does (JSON lines, the log
`id` kept among kscan's own fields), for replaying the log into a SIEM.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from scanner.run.events import SEVERITIES, human, severity
from scanner.run.formats import EVENT_FORMATS, formatter
from scanner.terminal import printable
from store.models import EventRow
from store.reader import Reader

__all__ = ["add_parser", "parse_since"]

FOLLOW_POLL = 1.0
#: Rows read per query while following or printing everything since a time.
PAGE = 1000
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?", re.I)
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """`--since` as Unix time: a duration back from now (`90s`, `15m`, `1h`, `2d`,
    `1w`; a bare number is a Unix time), or an ISO 8601 date/time (UTC unless it says)."""
    now = time.time() if now is None else now
    t = text.strip()
    m = _DURATION.fullmatch(t)
    if m is not None and m.group(2):
        return now - float(m.group(1)) * _UNIT[m.group(2).lower()]
    if m is not None:
        return float(m.group(1))
    try:
        when = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: use a duration (90s, 15m, 1h, 2d), an ISO time "
            "(2026-12-03T21:00) or Unix seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _types(text: str) -> list[str]:
    return [t for t in (x.strip() for x in text.split(",")) if t]


def _severity(text: str) -> str:
    if text not in SEVERITIES:
        raise argparse.ArgumentTypeError(f"--severity {text!r}: one of "
                                         + ", ".join(SEVERITIES))
    return text


def as_event(row: EventRow) -> dict[str, Any]:
    """The event as `run` wrote it (vm null for kscan's own), with its log id."""
    ev = {"id": row.id, **row.as_dict()}
    ev["vm"] = row.vm or None
    # One-shot commands log without a severity: a tampered `check` is critical too.
    ev.setdefault("severity", "critical" if row.event == "check" and row.detail.get(
        "result") == "tampered" else severity(row.event, row.detail))
    return ev


def format_line(ev: dict[str, Any]) -> str:
    stamp = dt.datetime.fromtimestamp(ev["ts"], dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        summary = human(ev)  # "VM: event: detail"
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # odd detail
        summary = f"{ev['vm'] + ': ' if ev['vm'] else ''}{ev['event']}"
    sev = str(ev.get("severity"))
    return printable(f"{stamp} {sev:<8} {summary}", limit=1000)


class _Printer:
    def __init__(self, json: bool, min_severity: str | None, fmt: str = "native") -> None:
        self.json = json or fmt != "native"  # ECS and OCSF are JSON documents
        self.shape = formatter(fmt)
        self.rank = SEVERITIES.index(min_severity) if min_severity else len(SEVERITIES)

    def wanted(self, ev: dict[str, Any]) -> bool:
        sev = ev.get("severity")
        rank = SEVERITIES.index(sev) if sev in SEVERITIES else len(SEVERITIES) - 1
        return rank <= self.rank

    def print(self, rows: Sequence[EventRow]) -> None:
        out = sys.stdout
        for row in rows:
            ev = as_event(row)
            if not self.wanted(ev):
                continue
            if self.json:
                out.buffer.write(orjson.dumps(self.shape(ev), option=orjson.OPT_NON_STR_KEYS)
                                 + b"\n")
            else:
                out.write(format_line(ev) + "\n")
        out.flush()


async def cmd_events(args: argparse.Namespace) -> int:
    types = [t for group in args.type or () for t in group]
    vms: list[str | None] = list(args.vm) if args.vm else [None]
    printer = _Printer(args.json, args.severity, args.event_format)
    with Reader.open(args.db) as r:
        last = r.last_event_id()  # before reading: nothing appended meanwhile is missed
        rows: list[EventRow] = []
        for vm in vms:
            if args.since is None:
                rows += r.events(vm=vm, types=types, limit=args.lines, newest=True)
                continue
            after = 0
            while True:  # every event since then, a page at a time
                page = r.events(vm=vm, since=args.since, types=types, after_id=after,
                                limit=PAGE)
                rows += page
                if len(page) < PAGE:
                    break
                after = page[-1].id
        rows.sort(key=lambda e: e.id)
        if args.since is None:
            rows = rows[-args.lines:]
        printer.print(rows)
        last = max([last, *(e.id for e in rows)])
        while args.follow:
            new: list[EventRow] = []
            for vm in vms:
                new += r.events(vm=vm, types=types, after_id=last, limit=PAGE)
            new.sort(key=lambda e: e.id)
            printer.print(new)
            last = max([last, *(e.id for e in new)])
            if len(new) < PAGE:
                await asyncio.sleep(FOLLOW_POLL)
    return 0


def _lines(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lines {text!r}: a whole number") from None
    if not 1 <= n <= 1_000_000:
        raise argparse.ArgumentTypeError(f"--lines {n}: must be 1..1000000")
    return n


def add_parser(sub: Any, db_arg: Any) -> None:
    p = sub.add_parser(
        "events", help="the database's event log: filter, follow, JSON",
        description="Print the event log kscan keeps in its database (every event of "
        "kscan run but stats, and what one-shot commands recorded). Read-only: works "
        "while kscan run is running.",
        epilog="examples:\n  kscan events                             the last 100\n"
               "  kscan events --vm web01 --since 1h\n"
               "  kscan events --type tamper --since 7d --json | jq .mismatches_total\n"
               "  kscan events --severity warning --follow\n"
               "  kscan events --since 2026-12-01T00:00 --type tamper,action\n"
               "  kscan events --since 30d --event-format ecs > kscan-ecs.ndjson",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vm", action="append", metavar="NAME",
                   help="only this VM's events (repeatable; '' for kscan's own)")
    p.add_argument("--type", action="append", type=_types, metavar="TYPE[,TYPE]",
                   help="only these event types (repeatable or comma-separated)")
    p.add_argument("--severity", type=_severity, metavar="LEVEL",
                   help="only this severity and worse: " + ", ".join(SEVERITIES))
    p.add_argument("--since", type=parse_since, metavar="WHEN",
                   help="every event since: 90s, 15m, 1h, 2d, an ISO time or Unix seconds "
                        "(default: the last --lines)")
    p.add_argument("-n", "--lines", type=_lines, default=100, metavar="N",
                   help="without --since, the last N events (default 100)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="then print new events as they are logged, until Ctrl-C")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--event-format", choices=EVENT_FORMATS, default="native",
                   help="the shape of --json lines, as kscan run's: kscan's own (native, "
                        "default), Elastic Common Schema 8.x (ecs) or OCSF 1.5 (ocsf); "
                        "ecs and ocsf imply --json")
    db_arg(p)
    p.set_defaults(func=cmd_events)

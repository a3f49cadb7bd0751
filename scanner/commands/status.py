"""`kscan status`: each VM the database knows, its last verdict, when, and against what.

Read from the database only (`store.reader`, read-only: it works while `kscan run`
writes, and never makes the service wait): a VM is known by its events. For each:

* `verdict`: the last verification's result — `clean` (`vm_clean`, `tamper_cleared`,
  `kernel_patched`, `accepted`, a clean `check`), `TAMPERED` (`tamper`, a tampered
  `check`), `baselined` (declared verified by `kscan baseline`) — and `verdict_at`, its
  time; `unknown` when none is recorded;
* `last_verified`: the last full check the database holds (a restart's resumed first
  verdict included). Fast passes in between are not written to the database;
  `kscan_vm_last_verified_timestamp_seconds` has them;
* `state`: what its last lifecycle event says (`watching`, `lost`, `booting`,
  `no baseline`, `no profile`, `error`, ...), and `last_event`;
* the kernel (`build_id`, `release`, KASLR `slide`) and the baseline it is checked
  against (`boot_profile`; `golden` is false when no golden baseline of that kernel
  and boot profile is stored any more).

`--json` prints one object per VM in a list (times as Unix seconds). Exit status as
`check`'s: 1 when the last verdict of a VM shown is TAMPERED, else 0 (2: an error).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from kscan.errors import KscanError
from scanner.terminal import printable
from store.reader import Reader

__all__ = ["VmStatus", "add_parser", "checked_against", "vm_statuses"]

#: Events that carry a verdict, and the verdict (None: read `result` from the event).
VERDICT_EVENTS: dict[str, str | None] = {
    "vm_clean": "clean", "tamper_cleared": "clean", "kernel_patched": "clean",
    "accepted": "clean", "tamper": "TAMPERED", "check": None, "baseline": "baselined",
}
#: Events that name the kernel a VM runs (build id, slide, boot profile).
IDENTITY_EVENTS = ("vm_identified", "baseline", "check", "accepted", "tamper",
                   "kernel_patched")
#: How many of those are read back to fill in what the newest leaves out.
IDENTITY_LOOKBACK = 16
#: Lifecycle events of a VM and the state each leaves it in.
STATE_EVENTS: dict[str, str] = {
    "vm_found": "attached", "vm_identified": "watching", "vm_clean": "watching",
    "tamper": "watching", "tamper_cleared": "watching", "kernel_patched": "watching",
    "vm_rebooted": "watching", "vm_booting": "booting", "vm_lost": "lost",
    "baseline_missing": "no baseline", "profile_missing": "no profile", "error": "error",
}


@dataclass(frozen=True)
class VmStatus:
    vm: str
    verdict: str
    verdict_at: float | None
    last_verified: float | None
    state: str
    last_event: str | None
    last_event_at: float | None
    build_id: str | None
    release: str | None
    slide: int | None
    boot_profile: str | None
    golden: bool | None
    golden_boots: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def vm_statuses(r: Reader) -> list[VmStatus]:
    """The status of every VM the event log names, by name. (Per-VM state is keyed by
    the VM's identity, not its name — `scanner.vm.identity` — so the log, which names
    VMs as operators know them, is what this reads.)"""
    goldens = r.golden_boots()
    releases = {p.build_id: p.release for p in r.profiles()}
    out = []
    for name in r.event_vms():
        verdict, verdict_at = "unknown", None
        for ev in r.last_events(name, tuple(VERDICT_EVENTS)):
            verdict = VERDICT_EVENTS[ev.event] or (
                "TAMPERED" if ev.detail.get("result") == "tampered" else "clean")
            verdict_at = ev.ts
        state, last_event, last_at = "unknown", None, None
        for ev in r.last_events(name, tuple(STATE_EVENTS)):
            state, last_event, last_at = STATE_EVENTS[ev.event], ev.event, ev.ts
        # The newest event naming the kernel, and older ones of the same kernel and
        # slide (one boot) for what it leaves out (a tamper names no boot profile).
        build_id = release = boot_profile = None
        slide = None
        for i, ev in enumerate(r.last_events(name, IDENTITY_EVENTS, limit=IDENTITY_LOOKBACK)):
            d = ev.detail
            ev_slide = d.get("slide") if isinstance(d.get("slide"), int) else None
            if i == 0:
                build_id, slide = _str(d.get("build_id")), ev_slide
            elif _str(d.get("build_id")) != build_id or ev_slide != slide:
                break
            release = release or _str(d.get("release"))
            boot_profile = boot_profile or _str(d.get("boot_profile"))
        release = release or (releases.get(build_id) if build_id else None)
        key = (build_id, boot_profile) if build_id and boot_profile else None
        out.append(VmStatus(
            vm=name, verdict=verdict, verdict_at=verdict_at, last_verified=verdict_at,
            state=state, last_event=last_event, last_event_at=last_at, build_id=build_id,
            release=release, slide=slide, boot_profile=boot_profile,
            golden=(key in goldens) if key else None,
            golden_boots=goldens.get(key) if key else None))
    return out


def checked_against(rows: list[VmStatus]) -> dict[tuple[str, str], list[str]]:
    """The VMs whose last verdict was against each (build id, boot profile): those
    verified there, not those a baseline was only taken from."""
    users: dict[tuple[str, str], list[str]] = {}
    for s in rows:
        if s.build_id and s.boot_profile and s.verdict in ("clean", "TAMPERED"):
            users.setdefault((s.build_id, s.boot_profile), []).append(s.vm)
    return users


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def ago(ts: float | None, now: float) -> str:
    """`12s ago`, `5m ago`, `3h ago`, `2d ago`; `never` for None."""
    if ts is None:
        return "never"
    d = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= size:
            return f"{int(d // size)}{unit} ago"
    return f"{int(d)}s ago"


def format_table(rows: list[VmStatus], now: float) -> str:
    head = ("VM", "VERDICT", "LAST VERIFIED", "STATE", "KERNEL", "BASELINE")
    table = [head]
    for s in rows:
        kernel = (s.release or (s.build_id or "?")[:16]) + (
            f" slide {s.slide:#x}" if s.slide is not None else "")
        base = "-" if s.boot_profile is None else s.boot_profile + (
            "" if s.golden else " (no golden baseline)")
        table.append((printable(s.vm, limit=64), s.verdict, ago(s.last_verified, now),
                      s.state, printable(kernel, limit=80), printable(base, limit=80)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                     + "  " + row[-1] for row in table)


async def cmd_status(args: argparse.Namespace) -> int:
    with Reader.open(args.db) as r, r.snapshot():
        rows = vm_statuses(r)
    if args.vm:
        unknown = sorted(set(args.vm) - {s.vm for s in rows})
        if unknown:
            raise KscanError(f"no VM named {printable(', '.join(unknown))} in {r.path}",
                             hint="kscan status lists the VMs it knows")
        rows = [s for s in rows if s.vm in set(args.vm)]
    # As `check`: 1 when a VM's last verdict is tampering (cron, monitoring checks).
    rc = 1 if any(s.verdict == "TAMPERED" for s in rows) else 0
    if args.json:
        import sys

        sys.stdout.buffer.write(orjson.dumps([s.to_json() for s in rows],
                                             option=orjson.OPT_INDENT_2) + b"\n")
        return rc
    if not rows:
        print("no VM known to this database yet (kscan run or kscan check records them)")
        return rc
    print(format_table(rows, time.time()))
    return rc


def add_parser(sub: Any, db_arg: Any) -> None:
    p = sub.add_parser(
        "status", help="each known VM: last verdict, when verified, kernel and baseline",
        description="Each VM the database knows: its last verdict (clean or TAMPERED) and "
        "when, the last full check recorded, its state, kernel and baseline. Read-only: "
        "works while kscan run is running, from the database it writes. Exit 1 when a "
        "VM's last verdict is TAMPERED, else 0.",
        epilog="examples:\n  kscan status\n  kscan status --json | jq '.[] | "
               "select(.verdict == \"TAMPERED\") | .vm'\n  KSCAN_DB=/var/lib/kscan/kscan.db "
               "kscan status --vm web01",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vm", action="append", metavar="NAME", help="only this VM (repeatable)")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per VM")
    db_arg(p)
    p.set_defaults(func=cmd_status)

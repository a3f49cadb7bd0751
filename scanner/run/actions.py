"""Security actions on tampering: forensic copies, and `--on-tamper report|pause|exec:CMD`.

* report (the default): the event is the action.
* pause: stop the VM over QMP (`stop`), then confirm its run state. Opt-in only.
* exec:CMD: run CMD (split like a shell would, but never run through one) with the
  event JSON on stdin; bounded by a timeout; its exit status becomes an event.

Every detection, whatever the action, keeps a forensic copy under
`<forensics dir>/<vm>/<UTC time>/`: `report.json` (the full check report), for each
changed page the live bytes as found in guest memory and normalized, and
`baseline.json` with the baseline's hashes of those pages and regions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from kscan.errors import KscanError
from scanner.check.locate import LiveKernel
from scanner.check.verify import CheckReport
from store import GoldenRegion
from translate import PAGE, GuestMemory, TranslationError

__all__ = ["Action", "ActionKind", "parse_action", "run_exec", "save_forensics"]

EXEC_TIMEOUT = 30.0
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class ActionKind(enum.StrEnum):
    REPORT = "report"
    PAUSE = "pause"
    EXEC = "exec"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    argv: tuple[str, ...] = ()  # EXEC: the command

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ActionKind(self.kind))

    def describe(self) -> str:
        if self.kind is ActionKind.EXEC:
            return "exec:" + shlex.join(self.argv)
        return self.kind.value


class ActionError(KscanError):
    pass


def parse_action(text: str) -> Action:
    if text in (ActionKind.REPORT, ActionKind.PAUSE):
        return Action(ActionKind(text))
    if text.startswith("exec:"):
        try:
            argv = tuple(shlex.split(text[5:]))
        except ValueError as err:
            raise ActionError(f"--on-tamper {text!r}: {err}",
                              hint="quote the command as a shell would") from None
        if not argv or not argv[0]:
            raise ActionError("--on-tamper exec: needs a command",
                              hint="e.g. --on-tamper exec:/usr/local/bin/page-oncall")
        return Action(ActionKind.EXEC, argv)
    raise ActionError(f"--on-tamper {text!r}: use report, pause or exec:COMMAND")


def save_forensics(root: Path, vm: str, report: CheckReport, lk: LiveKernel,
                   mem: GuestMemory, normalized: Mapping[str, bytes | bytearray],
                   golden: Mapping[str, GoldenRegion]) -> Path:
    """Write the forensic copy of a detection; returns its directory."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(report.ts))
    d = root / _SAFE.sub("_", vm) / f"{stamp}-{int(report.ts * 1000) % 1000:03d}"
    (d / "pages").mkdir(parents=True, exist_ok=True, mode=0o700)
    (d / "report.json").write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
    base: dict[str, Any] = {"build_id": report.build_id, "boot_profile": report.boot_profile,
                            "slide": report.slide, "regions": {}}
    for m in report.mismatches:
        stem = f"{m.region.lstrip('.')}-{m.page:05d}"
        page = bytes(normalized[m.region][m.page * PAGE:(m.page + 1) * PAGE])
        (d / "pages" / f"{stem}.normalized.bin").write_bytes(page)
        with contextlib.suppress(TranslationError):
            (d / "pages" / f"{stem}.live.bin").write_bytes(bytes(mem.view(m.gpa, len(page))))
        g = golden.get(m.region)
        if g is not None:
            r = base["regions"].setdefault(m.region, {"region_hash": g.region_hash.hex(),
                                                      "pages": {}})
            if m.page < g.pages:
                r["pages"][str(m.page)] = {"hash": f"{g.page_hash(m.page):016x}",
                                           "per_boot": g.is_per_boot(m.page),
                                           "va": m.va, "gpa": m.gpa}
    (d / "baseline.json").write_bytes(orjson.dumps(base, option=orjson.OPT_INDENT_2))
    os.chmod(d, 0o700)
    return d


async def run_exec(argv: tuple[str, ...], event: dict[str, Any],
                   timeout: float = EXEC_TIMEOUT) -> dict[str, Any]:
    """Run the hook with the event on stdin; never through a shell."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
    except OSError as err:
        return {"ok": False, "error": f"cannot run {argv[0]}: {err.strerror}"}
    try:
        _, err_out = await asyncio.wait_for(
            proc.communicate(orjson.dumps(event, default=str) + b"\n"), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"ok": False, "error": f"timed out after {timeout:g}s; killed"}
    return {"ok": proc.returncode == 0, "exit_code": proc.returncode,
            "stderr": err_out.decode(errors="replace")[-500:]}

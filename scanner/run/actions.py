"""Security actions on tampering: forensic copies, and `--on-tamper report|pause|exec:CMD`.

* report (the default): the event is the action.
* pause: stop the VM over QMP (`stop`), then confirm its run state. Opt-in only.
* exec:CMD: run CMD (split like a shell would, but never run through one) with the
  event JSON on stdin; bounded by a timeout; its exit status becomes an event.

Every detection, whatever the action, keeps a forensic copy under
`<forensics dir>/<vm>/<UTC time>/`: `report.json` (the check report), for each changed
page the live bytes as found in guest memory and normalized, and `baseline.json` with
the baseline's hashes of those pages and regions — capped at `MAX_FORENSIC_PAGES` pages
and `MAX_RANGES_PER_PAGE` byte ranges per page, with the totals in the report. The
copy is taken at detection time (`collect_forensics`, cheap) and written afterwards in
a thread (`write_forensics`): the `tamper` event and the action never wait for a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import os
import re
import shlex
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from kscan.errors import KscanError
from scanner.check.locate import LiveKernel
from scanner.check.verify import CheckReport, PageMismatch
from store import GoldenRegion
from translate import PAGE, GuestMemory, TranslationError

__all__ = ["Action", "ActionKind", "ForensicCopy", "collect_forensics", "parse_action",
           "prune_forensics", "run_exec", "save_forensics", "tamper_fields",
           "write_forensics"]

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


#: Caps on what one detection writes. A tamper covering all of `.text` changes ~3,600
#: pages with tens of thousands of byte ranges: uncapped, that was ~18 MiB of event
#: JSON and ~28 MiB of forensics per distinct change set. The event and the copy keep
#: the first pages/ranges and say how many there were in all.
MAX_EVENT_PAGES = 64
MAX_RANGES_PER_PAGE = 16
MAX_EVENT_FINDINGS = 64
MAX_FORENSIC_PAGES = 64


def capped_mismatches(mismatches: Sequence[PageMismatch], pages: int = MAX_EVENT_PAGES,
                      ranges: int = MAX_RANGES_PER_PAGE) -> list[dict[str, Any]]:
    """The first `pages` mismatches as JSON, each with at most `ranges` byte ranges
    (`ranges_total` says how many it had when cut)."""
    out = []
    for m in mismatches[:pages]:
        j = m.to_json()
        if len(m.ranges) > ranges:
            j["ranges"] = j["ranges"][:ranges]
            j["ranges_total"] = len(m.ranges)
        out.append(j)
    return out


def tamper_fields(report: CheckReport) -> dict[str, Any]:
    """The `tamper` event's mismatches and findings, capped, with their totals."""
    ms, fs = report.mismatches, report.findings
    return {"mismatches": capped_mismatches(ms),
            "mismatches_total": len(ms),
            "ranges_total": sum(len(m.ranges) for m in ms),
            "findings": [f.to_json() for f in fs[:MAX_EVENT_FINDINGS]],
            "findings_total": len(fs)}


def _safe_name(vm: str) -> str:
    """A VM name as one path component that stays inside the forensics root: no
    separators, never `.`/`..` or a hidden name, bounded in length."""
    name = _SAFE.sub("_", vm)[:100]
    return name if name and not name.startswith(".") else "_" + name


def forensic_dir(root: Path, vm: str, ts: float) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts))
    d = root / _safe_name(vm) / f"{stamp}-{int(ts * 1000) % 1000:03d}"
    if os.path.commonpath([os.path.abspath(d), os.path.abspath(root)]) != \
            os.path.abspath(root):  # pragma: no cover - _safe_name makes this impossible
        raise ActionError(f"forensic path {d} is outside {root}")
    return d


@dataclass(frozen=True)
class ForensicCopy:
    """The bytes of one forensic copy, taken at detection time; written later, off the
    event loop, by `write_forensics`."""

    dir: Path
    files: tuple[tuple[str, bytes], ...]  # (path relative to dir, contents)


def collect_forensics(root: Path, vm: str, report: CheckReport, mem: GuestMemory,
                      normalized: Mapping[str, bytes | bytearray],
                      golden: Mapping[str, GoldenRegion],
                      max_pages: int = MAX_FORENSIC_PAGES) -> ForensicCopy:
    """Take the forensic copy of a detection: the report (pages and ranges capped, with
    totals), for the first `max_pages` changed pages the live bytes as found in guest
    memory and normalized, and the baseline's hashes of those pages. Cheap (at most
    2 × `max_pages` pages are copied): run where the detection is."""
    d = forensic_dir(root, vm, report.ts)
    ms = report.mismatches
    kept = ms[:max_pages]
    kept_ids = {id(m) for m in kept}
    capped = dataclasses.replace(report, regions=tuple(
        dataclasses.replace(r, mismatches=tuple(m for m in r.mismatches
                                                if id(m) in kept_ids))
        for r in report.regions))
    rep = capped.to_json()
    rep["result"] = "tampered"
    for r in rep["regions"]:
        for m in r["mismatches"]:
            if len(m["ranges"]) > MAX_RANGES_PER_PAGE:
                m["ranges_total"] = len(m["ranges"])
                m["ranges"] = m["ranges"][:MAX_RANGES_PER_PAGE]
    rep["mismatches_total"] = len(ms)
    rep["pages_copied"] = len(kept)
    files: list[tuple[str, bytes]] = [
        ("report.json", orjson.dumps(rep, option=orjson.OPT_INDENT_2, default=str))]
    base: dict[str, Any] = {"build_id": report.build_id, "boot_profile": report.boot_profile,
                            "slide": report.slide, "regions": {}}
    for m in kept:
        stem = f"pages/{m.region.lstrip('.')}-{m.page:05d}"
        region = normalized.get(m.region)
        if region is not None:
            page = bytes(region[m.page * PAGE:(m.page + 1) * PAGE])
            files.append((f"{stem}.normalized.bin", page))
        with contextlib.suppress(TranslationError, ValueError):
            files.append((f"{stem}.live.bin", bytes(mem.view(m.gpa, PAGE))))
        g = golden.get(m.region)
        if g is not None:
            r = base["regions"].setdefault(m.region, {"region_hash": g.region_hash.hex(),
                                                      "pages": {}})
            if m.page < g.pages:
                r["pages"][str(m.page)] = {"hash": f"{g.page_hash(m.page):016x}",
                                           "per_boot": g.is_per_boot(m.page),
                                           "va": m.va, "gpa": m.gpa}
    files.append(("baseline.json", orjson.dumps(base, option=orjson.OPT_INDENT_2)))
    return ForensicCopy(d, tuple(files))


def _private_dir(path: Path) -> None:
    """Make `path` a directory only its owner can enter: created 0700 (never wider,
    whatever the umask), or an existing one (not a symlink) set to 0700."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if path.is_symlink() or not path.is_dir():
            raise ActionError(f"forensic path {path} is not a directory") from None
    os.chmod(path, 0o700, follow_symlinks=False)


def write_forensics(copy: ForensicCopy) -> Path:
    """Write a forensic copy (blocking I/O: call it in a thread); its directory.

    Guest pages and reports can be sensitive: every directory kscan creates below the
    forensics root (the VM's, the copy's, `pages/`) is 0700 from its creation, and
    every file is created 0600, exclusively, never through a symlink — no moment in
    which another local user could read or plant anything."""
    d = copy.dir
    root = d.parent.parent
    if not root.exists():   # kscan's own: private too (one that exists is the admin's)
        root.mkdir(parents=True, mode=0o700, exist_ok=True)
    for sub in (d.parent, d, d / "pages"):
        _private_dir(sub)
    for rel, data in copy.files:
        fd = os.open(d / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return d


def save_forensics(root: Path, vm: str, report: CheckReport, lk: LiveKernel,
                   mem: GuestMemory, normalized: Mapping[str, bytes | bytearray],
                   golden: Mapping[str, GoldenRegion]) -> Path:
    """Collect and write a forensic copy at once (for callers off the event loop)."""
    return write_forensics(collect_forensics(root, vm, report, mem, normalized, golden))


def prune_forensics(root: Path, max_bytes: int) -> int:
    """Remove the oldest forensic copies until `root` holds at most `max_bytes`; the
    newest copy of each VM is never removed. Returns how many copies were removed.
    (Blocking I/O: call it in a thread.)"""
    if not root.is_dir():
        return 0
    copies: list[tuple[str, Path, int]] = []  # (dir name: UTC stamp, path, bytes)
    newest: set[Path] = set()
    for vm_dir in root.iterdir():
        if not vm_dir.is_dir() or vm_dir.is_symlink():
            continue
        dirs = sorted((d for d in vm_dir.iterdir() if d.is_dir() and not d.is_symlink()),
                      key=lambda d: d.name)
        if dirs:
            newest.add(dirs[-1])
        for d in dirs:
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file()
                       and not f.is_symlink())
            copies.append((d.name, d, size))
    total = sum(size for _, _, size in copies)
    removed = 0
    for _, d, size in sorted(copies, key=lambda c: c[0]):
        if total <= max_bytes:
            break
        if d in newest:
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= size
        removed += 1
    return removed


#: After the hook exits, how long its stderr is still read: a background child it left
#: behind holds the pipe open, and its end is not waited for.
STDERR_GRACE = 0.5
STDERR_TAIL = 500


def _kill_group(pgid: int) -> None:
    """SIGKILL the hook's whole process group (its session: `start_new_session`)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def run_exec(argv: tuple[str, ...], event: dict[str, Any],
                   timeout: float = EXEC_TIMEOUT) -> dict[str, Any]:
    """Run the hook with the event on stdin; never through a shell.

    The hook runs in a session of its own. On timeout its whole process group is
    killed (what it started too, unless that left the group). The result waits for the
    hook's exit, not for the end of its pipes: a hook that starts `sleep 100 &` and
    exits is done when it exits (its stderr is read for `STDERR_GRACE` more seconds),
    and never raises — the `action` event and the forensic copy after it depend on
    that."""
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=w, start_new_session=True)
        finally:
            os.close(w)
    except OSError as err:
        os.close(r)
        return {"ok": False, "error": f"cannot run {argv[0]}: {err.strerror}"}
    tail = bytearray()
    reader = asyncio.StreamReader()
    err_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0))

    async def feed() -> None:
        # Written here, not by communicate(): a hook that exits without reading closes
        # the pipe, which uvloop reports as RuntimeError (asyncio as BrokenPipeError) —
        # the hook ran all the same; its exit code tells.
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            proc.stdin.write(orjson.dumps(event, default=str) + b"\n")
            await proc.stdin.drain()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            proc.stdin.close()

    async def drain_stderr() -> None:
        while chunk := await reader.read(65536):
            tail.extend(chunk)
            del tail[:-STDERR_TAIL * 4]   # bytes: room for multi-byte characters

    feeder = loop.create_task(feed())
    drainer = loop.create_task(drain_stderr())
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            _kill_group(proc.pid)
            with contextlib.suppress(TimeoutError, ProcessLookupError, ChildProcessError):
                await asyncio.wait_for(proc.wait(), 5.0)
        await asyncio.wait({drainer}, timeout=STDERR_GRACE)
    finally:
        for t in (feeder, drainer):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
                proc.stdin.close()
        err_transport.close()
    if timed_out:
        return {"ok": False, "error": f"timed out after {timeout:g}s; killed"}
    return {"ok": proc.returncode == 0, "exit_code": proc.returncode,
            "stderr": tail.decode(errors="replace")[-STDERR_TAIL:]}

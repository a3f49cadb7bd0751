"""scanner.run.actions: parsing --on-tamper, and the exec hook really run (no shell): event
JSON on stdin, exit status, missing programs, the timeout kill."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from kscan.errors import KscanError
from scanner.run.actions import Action, ForensicCopy, parse_action, run_exec, write_forensics

PY = sys.executable


# -- parse_action ------------------------------------------------------------------------

def test_parse_simple_actions() -> None:
    assert parse_action("report") == Action("report")
    assert parse_action("pause") == Action("pause")
    assert parse_action("report").describe() == "report"
    assert parse_action("pause").describe() == "pause"


def test_parse_exec_with_quotes() -> None:
    a = parse_action("exec:/usr/local/bin/page-oncall --team 'kernel sec' \"x y\" z\\ w")
    assert a.kind == "exec"
    assert a.argv == ("/usr/local/bin/page-oncall", "--team", "kernel sec", "x y", "z w")
    # describe() quotes it back so that it parses to the same argv
    assert a.describe().startswith("exec:")
    assert parse_action(a.describe()) == a


def test_parse_exec_semicolon_is_just_an_argument() -> None:
    a = parse_action("exec:/bin/echo hi; rm -rf /")
    assert a.argv == ("/bin/echo", "hi;", "rm", "-rf", "/")


@pytest.mark.parametrize("bad", ["", "Report", "pause ", "halt", "exec", "exec:", "exec:   ",
                                 "shell:/bin/true", "exec :/bin/true"])
def test_parse_bad_values(bad: str) -> None:
    with pytest.raises(KscanError) as ei:
        parse_action(bad)
    msg = str(ei.value)
    assert "--on-tamper" in msg
    if bad and not bad.startswith("exec:"):
        assert repr(bad) in msg  # names the input


def test_parse_exec_unbalanced_quote_is_a_kscan_error() -> None:
    with pytest.raises(KscanError, match="page-oncall"):
        parse_action("exec:/bin/page-oncall 'unterminated")


def test_parse_exec_empty_program_name_is_refused() -> None:
    with pytest.raises(KscanError):
        parse_action("exec:'' --flag")


# -- run_exec ----------------------------------------------------------------------------

EVENT: dict[str, Any] = {"ts": 1.5, "event": "tamper", "vm": "vm7", "pages": [1, 2],
                         "raw": b"\x00\xff", "note": "caf\u00e9 \"q\""}


def test_run_exec_passes_event_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "event.json"
    code = "import sys; open(sys.argv[1], 'wb').write(sys.stdin.buffer.read())"
    res = asyncio.run(run_exec((PY, "-c", code, str(out)), EVENT))
    assert res["ok"] is True and res["exit_code"] == 0
    data = out.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    got = orjson.loads(data)
    assert got["event"] == "tamper" and got["vm"] == "vm7" and got["pages"] == [1, 2]
    assert got["note"] == "caf\u00e9 \"q\"" and got["ts"] == 1.5
    assert isinstance(got["raw"], str)  # bytes become text (default=str), not a crash


def test_run_exec_nonzero_exit(tmp_path: Path) -> None:
    code = "import sys; sys.stdin.read(); sys.stderr.write('pager down\\n'); sys.exit(3)"
    res = asyncio.run(run_exec((PY, "-c", code), EVENT))
    assert res["ok"] is False
    assert res["exit_code"] == 3
    assert "pager down" in res["stderr"]


def test_run_exec_killed_by_signal() -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    res = asyncio.run(run_exec((PY, "-c", code), EVENT))
    assert res["ok"] is False and res["exit_code"] == -15


def test_run_exec_stderr_is_bounded() -> None:
    code = "import sys; sys.stderr.write('x' * 100000 + 'END')"
    res = asyncio.run(run_exec((PY, "-c", code), EVENT))
    assert res["ok"] is True
    assert len(res["stderr"]) == 500 and res["stderr"].endswith("END")


def test_run_exec_hook_ignoring_stdin_and_huge_event() -> None:
    big = {**EVENT, "blob": "z" * 1_000_000}
    res = asyncio.run(run_exec((PY, "-c", "import sys; sys.exit(0)"), big, timeout=10))
    assert res["ok"] is True and res["exit_code"] == 0


@pytest.mark.parametrize("argv", [("/nonexistent/kscan-hook",), ("kscan-no-such-program-x",)])
def test_run_exec_missing_program(argv: tuple[str, ...]) -> None:
    res = asyncio.run(run_exec(argv, EVENT))
    assert res["ok"] is False
    assert argv[0] in res["error"] and "cannot run" in res["error"]
    assert "exit_code" not in res


def test_run_exec_not_executable(tmp_path: Path) -> None:
    f = tmp_path / "hook.sh"
    f.write_text("#!/bin/sh\nexit 0\n")
    f.chmod(0o644)
    res = asyncio.run(run_exec((str(f),), EVENT))
    assert res["ok"] is False and str(f) in res["error"]


def test_run_exec_timeout_kills(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
            "time.sleep(30)")
    t0 = time.monotonic()
    res = asyncio.run(run_exec((PY, "-c", code, str(pidfile)), EVENT, timeout=0.5))
    elapsed = time.monotonic() - t0
    assert res["ok"] is False
    assert "timed out after 0.5s" in res["error"]
    assert 0.45 <= elapsed < 5
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


def test_run_exec_never_uses_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    argfile = tmp_path / "arg"
    evil = f"hi; touch {marker}"
    code = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
    res = asyncio.run(run_exec((PY, "-c", code, str(argfile), evil), EVENT))
    assert res["ok"] is True
    assert argfile.read_text() == evil  # one argument, verbatim
    assert not marker.exists()
    # A command string given whole: a shell would run `touch`; exec treats it as a name.
    res = asyncio.run(run_exec((f"/bin/true; touch {marker}",), EVENT))
    assert res["ok"] is False
    # Through parse_action, the way the CLI does it.
    act = parse_action(f"exec:/bin/echo $(touch {marker}) `touch {marker}`; touch {marker}")
    res = asyncio.run(run_exec(act.argv, EVENT))
    assert res["ok"] is True
    assert not marker.exists()


def test_run_exec_hook_ignoring_stdin_under_uvloop() -> None:
    """`kscan run` runs on uvloop, which reports the pipe a hook closed unread as
    RuntimeError (not BrokenPipeError): the action is still reported."""
    import uvloop

    async def many() -> list[dict[str, Any]]:
        return [await run_exec(("/bin/true",), EVENT, timeout=10) for _ in range(5)]

    for res in uvloop.run(many()):
        assert res["ok"] is True and res["exit_code"] == 0


# -- hooks that leave children behind ----------------------------------------------------

def _gone(pid: int, within: float = 10.0) -> bool:
    """Whether `pid` is dead (gone, or a zombie not yet reaped by its new parent)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


BACKGROUND_HOOK = ("import subprocess, sys; sys.stdin.read(); "
                   "p = subprocess.Popen(['sleep', '100']); "
                   "open(sys.argv[1], 'w').write(str(p.pid)); sys.stderr.write('paged\\n')")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_run_exec_hook_leaving_a_background_child_is_done_when_it_exits(
        tmp_path: Path, loop: str) -> None:
    """`sleep 100 &` holds the hook's stderr pipe open after the hook exits: the result
    is the hook's exit, not a timeout (and under uvloop not ProcessLookupError from
    killing a process already gone)."""
    import uvloop

    pidfile = tmp_path / "child"
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    try:
        res = runner(run_exec((PY, "-c", BACKGROUND_HOOK, str(pidfile)), EVENT, timeout=20))
        assert res["ok"] is True and res["exit_code"] == 0, res
        assert "paged" in res["stderr"]
        child = int(pidfile.read_text())
        assert not _gone(child, within=0.2)   # a finished hook's children are its own
    finally:
        if pidfile.exists():
            _kill(int(pidfile.read_text()))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_run_exec_timeout_kills_the_hooks_whole_process_group(tmp_path: Path,
                                                              loop: str) -> None:
    import uvloop

    pidfile = tmp_path / "child"
    code = ("import subprocess, sys, time; sys.stdin.read(); "
            "p = subprocess.Popen(['sleep', '100']); "
            "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(60)")
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    try:
        res = runner(run_exec((PY, "-c", code, str(pidfile)), EVENT, timeout=8))
        assert res["ok"] is False and "timed out" in res["error"]
        assert _gone(int(pidfile.read_text()))   # the grandchild too
    finally:
        if pidfile.exists():
            _kill(int(pidfile.read_text()))


def test_run_exec_hook_runs_in_a_session_of_its_own(tmp_path: Path) -> None:
    out = tmp_path / "ids"
    code = ("import os, sys; open(sys.argv[1], 'w').write("
            "f'{os.getsid(0)} {os.getpgid(0)} {os.getpid()}')")
    res = asyncio.run(run_exec((PY, "-c", code, str(out)), EVENT))
    assert res["ok"] is True
    sid, pgid, pid = map(int, out.read_text().split())
    assert sid == pgid == pid != os.getsid(0)


# -- forensic copies: private from the start ---------------------------------------------

def _copy(root: Path, vm: str = "vm7", stamp: str = "20261203T000000Z-001") -> ForensicCopy:
    return ForensicCopy(root / vm / stamp, (("report.json", b"{}"),
                                            ("pages/text-00001.live.bin", b"\xcc" * 4096),
                                            ("baseline.json", b"{}")))


def test_forensic_dirs_and_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    root = tmp_path / "forensics"
    old = os.umask(0o022)
    try:
        d = write_forensics(_copy(root))
    finally:
        os.umask(old)
    for sub in (root / "vm7", d, d / "pages"):   # the VM's directory too, not only the copy's
        assert sub.stat().st_mode & 0o777 == 0o700, sub
    for f in (d / "report.json", d / "baseline.json", d / "pages" / "text-00001.live.bin"):
        assert f.stat().st_mode & 0o777 == 0o600, f
    assert root.stat().st_mode & 0o777 == 0o700   # created by kscan: private too


def test_a_failed_forensic_write_leaves_nothing_readable(tmp_path: Path) -> None:
    """The copy's directory is 0700 when it is made, not chmod'ed at the end: a write
    failing half-way (here a name already taken) never leaves pages readable."""
    root = tmp_path / "forensics"
    copy = _copy(root)
    (copy.dir / "pages").mkdir(parents=True)
    (copy.dir / "baseline.json").mkdir()           # the last file cannot be written
    with pytest.raises(OSError):
        write_forensics(copy)
    for sub in (root / "vm7", copy.dir, copy.dir / "pages"):
        assert sub.stat().st_mode & 0o777 == 0o700, sub
    assert (copy.dir / "pages" / "text-00001.live.bin").stat().st_mode & 0o777 == 0o600


def test_a_planted_symlink_in_a_forensic_copy_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "forensics"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    copy = _copy(root)
    (copy.dir / "pages").mkdir(parents=True)
    (copy.dir / "report.json").symlink_to(victim)
    with pytest.raises(OSError):
        write_forensics(copy)
    assert victim.read_bytes() == b"precious"

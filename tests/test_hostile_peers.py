"""Hostile QMP peers (tests/fakeqmp.py) against `kscan inspect`, `check` and `run`: every
malformed reply, FIFO or device as guest RAM, slow peer and escape sequence ends in exit
2 with one escaped line (one-shot) or in an event for that VM only (`run`); a stalled
stdout does not stop `run`; a `run` killed with SIGKILL leaves a clean database holding
every event it had printed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import scanner.qemu.qmp as qmp_mod
from scanner.errors import QmpError
from scanner.qemu.qmp import QmpVm
from store import Store
from tests.fakeqmp import REGISTERS, Delay, FakeQmp
from tests.test_unit_watcher import make_profile

ROOT = Path(__file__).resolve().parent.parent


def kscan(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KSCAN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "scanner", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env, **kw)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("hostile") / "kscan.db"
    prof = make_profile()

    async def add() -> None:
        async with Store.open(path) as st:
            await st.add_profile(prof.build_id, prof.release, prof.version, prof.to_bytes())

    asyncio.run(add())
    return str(path)


def nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


MTREE_2_64 = ('FlatView #0\n AS "memory", root: system\n'
              "  10000000000000000-1000000000000ffff (prio 0, ram): ram0\n"
              "  ffffffffffff0000-ffffffffffffffff (prio 0, ram): ram0 @ffffffffffff0000\n")

#: name → (replies, hmp). Each was a traceback and exit 1 before (or a hang).
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "memdev size abc": ({"query-memdev": [{"id": "ram0", "size": "abc", "share": True}]}, {}),
    "memdev size null": ({"query-memdev": [{"id": "ram0", "size": None, "share": True}]}, {}),
    "memdev size 2**70": ({"query-memdev": [{"id": "ram0", "size": 2**70, "share": True}]},
                          {}),
    "memdev not a list": ({"query-memdev": {"id": "ram0"}}, {}),
    "cpus-fast [5]": ({"query-cpus-fast": [5]}, {}),
    "name is a list": ({"query-name": [1, 2]}, {}),
    "status is 5": ({"query-status": 5}, {}),
    "registers not text": ({}, {"info registers -a": 12}),
    "CPU# with 5000 digits": ({}, {"info registers -a": "CPU#" + "9" * 5000 + "\n"
                                   + REGISTERS}),
    "register with 5000 digits": ({}, {"info registers -a": REGISTERS.replace(
        "CR3=0000000000001000", "CR3=" + "f" * 5000)}),
    "flat view at 2^64": ({}, {"info mtree -f": MTREE_2_64}),
    "mtree is an object": ({}, {"info mtree -f": {"a": 1}}),
    "escape sequence in error": ({"query-name": lambda a: KeyError("\x1b[2J\x1b]0;pwned\x07")},
                                 {}),
}


def one_clean_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("kscan: ") and "Traceback" not in out.stderr
    assert "\x1b" not in out.stderr and "\x07" not in out.stderr
    return lines[0]


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[FakeQmp]:
    f = FakeQmp(tmp_path / "qmp.sock", tmp_path / "ram")
    with f:
        yield f


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_and_check_exit_2_on_hostile_replies(peer: FakeQmp, db: str,
                                                     case: str) -> None:
    replies, hmp = CASES[case]
    peer.replies.update(replies)
    peer.hmp.update(hmp)
    for cmd in ("inspect", "check"):
        out = kscan(cmd, "--qmp", str(peer.path), "--db", db, "--json")
        if cmd == "inspect" and out.returncode == 0:  # a reply inspect does not use
            assert out.stderr == "" and json.loads(out.stdout)["name"]
            continue
        line = one_clean_line(out)
        assert str(peer.path) in line or "VM fake" in line or "CR3" in line, line
        assert out.stdout == ""


@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory"])
def test_memory_path_that_is_not_a_regular_file(tmp_path: Path, db: str, kind: str) -> None:
    """Before: a FIFO blocked os.open forever (inspect/check hung, run froze)."""
    if kind == "fifo":
        mem = tmp_path / "fifo"
        os.mkfifo(mem)
    elif kind == "chardev":
        mem = Path("/dev/zero")
    else:
        mem = tmp_path
    with FakeQmp(tmp_path / "qmp.sock", mem):
        t0 = time.monotonic()
        for cmd in ("inspect", "check"):
            line = one_clean_line(kscan(cmd, "--qmp", str(tmp_path / "qmp.sock"),
                                        "--db", db, timeout=30))
            assert "not a regular file" in line and str(mem) in line
        assert time.monotonic() - t0 < 20


def test_profile_add_of_dev_zero_and_fifo(tmp_path: Path, db: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        line = one_clean_line(kscan("profile", "add", path, "--db", db, timeout=30))
        assert "not a regular file" in line


def test_one_deadline_over_a_whole_operation(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: 40 memdevs answering in 1 s each took `inspect` 83 s (each call within its
    own timeout). Now one deadline covers the operation."""
    monkeypatch.setattr(qmp_mod, "OPERATION_TIMEOUT", 1.0)
    devs = [{"id": f"m{i}", "size": 4096, "share": True} for i in range(40)]
    with FakeQmp(tmp_path / "q.sock", tmp_path / "ram",
                 replies={"query-memdev": devs, "qom-get": Delay(0.2, None)}) as f:
        async def go() -> float:
            vm = await QmpVm.connect(f.path)
            t0 = time.monotonic()
            try:
                with pytest.raises(QmpError, match="took longer than 1s"):
                    await vm.memdevs()
            finally:
                await vm.close()
            return time.monotonic() - t0

        assert asyncio.run(go()) < 3


def test_replies_are_not_formatted_for_a_debug_log_that_is_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """qemu.qmp formats every message as indented JSON for its debug log, on or off
    (~70 us a command, and a peer's large reply formatted for nothing): kscan's client
    formats them only when that log is on."""
    from qemu.qmp import Message

    made: list[int] = []
    real_str = Message.__str__
    monkeypatch.setattr(Message, "__str__", lambda m: made.append(1) or real_str(m))
    big = "x" * 200_000
    with FakeQmp(tmp_path / "q.sock", tmp_path / "ram", hmp={"info big": big}) as f:
        async def go() -> list[str]:
            vm = await QmpVm.connect(f.path)
            try:
                out = [await vm.hmp("info big")]
                assert not made  # off: nothing formatted, however large the reply
                with caplog.at_level(logging.DEBUG, logger="qemu.qmp"):
                    out.append(await vm.hmp("info big"))
                return out
            finally:
                await vm.close()

        assert asyncio.run(go()) == [big, big]
    assert len(made) == 2  # on: the request and the reply, as qemu.qmp logs them
    assert any("<--" in r.getMessage() for r in caplog.records)


# -- kscan run ------------------------------------------------------------------------------

def start_run(args: list[str], stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "scanner", "run", *args], cwd=ROOT,
                            env=env, stdout=stdout, stderr=stderr)


def hostile_fleet(tmp_path: Path) -> list[FakeQmp]:
    """One well-formed peer (its RAM holds no kernel: it stays booting) and hostile ones."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    peers = [FakeQmp(tmp_path / "vm-good.sock", tmp_path / "good.ram", name="good"),
             FakeQmp(tmp_path / "vm-abc.sock", tmp_path / "abc.ram", name="abc",
                     replies={"query-memdev": [{"id": "ram0", "size": "abc"}]}),
             FakeQmp(tmp_path / "vm-fifo.sock", fifo, name="fifo"),
             FakeQmp(tmp_path / "vm-digits.sock", tmp_path / "d.ram", name="digits",
                     hmp={"info registers -a": "CPU#" + "7" * 5000 + "\n"}),
             FakeQmp(tmp_path / "vm-slow.sock", tmp_path / "slow.ram", name="slow",
                     replies={"query-name": Delay(20, {"name": "slow"})})]
    for p in peers:
        p.start()
    return peers


def events_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def test_run_survives_hostile_peers(tmp_path: Path, db: str) -> None:
    """Before: one peer's ValueError ended `kscan run` for every VM, and a FIFO froze it
    (its --duration never fired). Now each becomes that VM's event and run goes on."""
    peers = hostile_fleet(tmp_path)
    try:
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "scanner", "run", "--qmp", str(tmp_path / "vm-*.sock"),
             "--db", db, "--duration", "6", "--interval", "1", "--stats-every", "1",
             "--forensics-dir", str(tmp_path / "f")], capture_output=True, text=True,
            timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        took = time.monotonic() - t0
    finally:
        for p in peers:
            p.stop()
    assert out.returncode == 0, out.stderr
    assert took < 20
    evs = events_of(out.stdout)
    kinds = [e["event"] for e in evs]
    assert kinds[0] == "kscan_started" and kinds[-1] == "kscan_stopped"
    unreachable = {Path(e["source"]).name: e["message"] for e in evs
                   if e["event"] == "vm_unreachable"}
    assert "size 'abc'" in unreachable["vm-abc.sock"]
    assert "not a regular file" in unreachable["vm-fifo.sock"]
    assert "no CR0" in unreachable["vm-digits.sock"]
    assert any(e["event"] == "vm_found" and e["vm"] == "good" for e in evs)
    assert sum(1 for k in kinds if k == "stats") >= 3  # the loop kept its rhythm
    assert "Traceback" not in out.stderr and "\x1b" not in out.stderr


def test_run_with_a_stalled_stdout_still_stops(tmp_path: Path, db: str) -> None:
    """Before: events were written on the loop; a full pipe froze every VM. Now stdout
    is written by its own thread: stats go first, the loop runs, --duration fires."""
    r, w = os.pipe()
    try:
        err = tmp_path / "stderr"
        with open(err, "wb") as ferr:
            p = start_run(["--qmp", str(tmp_path / "none-*.sock"), "--db", db,
                           "--duration", "4", "--stats-every", "0.0005"], w, ferr)
            os.close(w)
            w = -1
            try:
                rc = p.wait(timeout=40)
            finally:
                if p.poll() is None:
                    p.kill()
        assert rc == 0
        text = err.read_text()
        # Said on stderr: the queue overflowed (stats dropped) and/or the last events
        # could not be written at exit.
        assert "stdout is not being read" in text or "did not take the last events" in text
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    con = sqlite3.connect(db)
    kinds = [k for (k,) in con.execute("SELECT event FROM event ORDER BY id DESC LIMIT 2")]
    assert "kscan_stopped" in kinds


def test_run_killed_mid_write_loses_no_reported_event(tmp_path: Path) -> None:
    """SIGKILL while events stream: the database opens clean (integrity_check ok) and
    holds every event kscan had printed (an event is stored before it is printed)."""
    db = str(tmp_path / "k.db")
    peers = [FakeQmp(tmp_path / f"vm{i:02d}.sock", tmp_path / "none", name=f"p{i}",
                     replies={"query-name": (lambda a, i=i: KeyError(f"peer {i} refuses"))})
             for i in range(40)]
    for p in peers:
        p.start()
    try:
        proc = start_run(["--qmp", str(tmp_path / "vm*.sock"), "--db", db,
                          "--stats-every", "0.01"], subprocess.PIPE, subprocess.DEVNULL)
        assert proc.stdout is not None
        printed: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while len([e for e in printed if e["event"] == "vm_unreachable"]) < 15:
            assert time.monotonic() < deadline, printed[-3:]
            printed.append(json.loads(proc.stdout.readline()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # What was already in the pipe was printed too.
        printed += events_of(proc.stdout.read().decode())
    finally:
        for p in peers:
            p.stop()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {(round(ts, 6), ev) for ts, ev in con.execute("SELECT ts, event FROM event")}
    reported = [(round(e["ts"], 6), e["event"]) for e in printed if e["event"] != "stats"]
    assert len(reported) >= 16
    assert [r for r in reported if r not in stored] == []

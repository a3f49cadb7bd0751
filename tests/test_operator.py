"""An operator's first day (issue 18): the defects they hit, each a test, and the commands
they expect — on the real command line, over synthetic replayed VMs (`test_ops`'s fleet:
no guest boots here).

Defects: closed standard streams (1), a literal --qmp path that does not exist (2), bad
`run` options accepted silently (3), a reload that changes `db` (4), Ctrl-C on a FIFO
(5), the journald recipe (6). Commands: `status`, `events`, `baseline list|rm`,
`profile rm`, the database found without --db, `--connect` from LIBVIRT_DEFAULT_URI,
`run --check-config`, `run -q`, timestamps on stderr.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from scanner.commands.cli import build_parser
from scanner.commands.events_cmd import parse_since
from scanner.run.journal import is_journal
from store.paths import default_db_path
from tests.kscan_proc import RunProc, kscan
from tests.test_event_schema import VALIDATOR
from tests.test_ops import fleet, make_vm, tamper  # noqa: F401  (fleet: a fixture)
from tests.test_unit_watcher import write_vm

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "docs" / "operating.md"  # the journald recipe
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z kscan: ")


def sh(command: str, env: dict[str, str] | None = None,
       timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`command` through sh (for `>&-`), kscan being `python -m scanner`."""
    return subprocess.run(["sh", "-c", command.replace(
        "kscan ", f"{sys.executable} -m scanner ")], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of the process's stdout, failing (not hanging) after `timeout`."""
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line within {timeout}s"
    return proc.stdout.readline()


def events_of(db: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(event, vm, detail) of every event in the database's log, oldest first."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [(e, vm, json.loads(d)) for e, vm, d in conn.execute(
            "SELECT event, vm, detail FROM event ORDER BY id")]


# -- 1. closed standard streams -------------------------------------------------------------

@pytest.mark.parametrize("closed", [">&-", "2>&-", "<&-", ">&- 2>&- <&-"])
def test_one_shot_commands_survive_closed_streams(tmp_path: Path, closed: str) -> None:
    """Was: a libuv assertion, exit 134, for every command."""
    db = tmp_path / "k.db"
    res = sh(f"kscan profile list --db {db} {closed}")
    assert res.returncode == 0, res.stderr
    assert "Assertion" not in res.stderr
    res = sh(f"kscan status --db {db} {closed}")
    assert res.returncode == 0, res.stderr


def test_run_survives_closed_streams(fleet: dict[str, Any]) -> None:  # noqa: F811
    """`run` keeps uvloop; with every standard stream closed it still watches, and the
    events reach the database."""
    db = fleet["db"]
    res = sh(f"kscan run --config '' --replay '{fleet['tmp']}/vms/ops0' --db {db} "
             "--interval 0.2 --duration 6 >&- 2>&- <&-")
    assert res.returncode == 0, res.stderr
    kinds = [(e, vm) for e, vm, _ in events_of(db)]
    assert ("vm_clean", "ops0") in kinds and ("kscan_stopped", "") in kinds


# -- 2. a literal path that does not exist ----------------------------------------------------

def test_literal_paths_that_do_not_exist_are_sources(fleet: dict[str, Any]) -> None:  # noqa: F811
    """Was: silent (the glob expansion dropped it). Now unreachable until it appears,
    and picked up as soon as it does, not after the unreachable backoff (30 s)."""
    tmp = fleet["tmp"]
    absent_sock = tmp / "nonexistent" / "kscan.sock"
    later = tmp / "later" / "vm9"
    run = RunProc(["--config", "", "--qmp", str(absent_sock), "--replay", str(later),
                   "--db", str(fleet["db"]), "--interval", "0.2"], tmp / "stderr")
    try:
        for src in (absent_sock, later):
            ev = run.wait_for(lambda e, s=src: e["event"] == "vm_unreachable"
                              and e["source"] == str(s), 60)
            assert "does not exist" in ev["message"]
        err = (tmp / "stderr").read_text()
        assert f"vm_unreachable: {absent_sock} does not exist" in err
        # Lines on a terminal or file carry their time (the journal has its own).
        assert all(STAMP.match(line) for line in err.splitlines()), err
        t0 = time.monotonic()
        write_vm(tmp / "staging" / "vm9", "vm9", _ram())
        later.parent.mkdir()
        os.rename(tmp / "staging" / "vm9", later)  # whole at once, as a socket appears
        run.wait_for(lambda e: e["event"] == "vm_clean" and e["vm"] == "vm9", 60)
        assert time.monotonic() - t0 < 25  # picked up, not left to the 30 s backoff
    finally:
        assert run.stop() == 0


def _ram() -> Any:
    from tests.test_ops import LOAD_GPA
    from tests.test_unit_watcher import SLIDE, build_ram

    return build_ram(SLIDE, LOAD_GPA, 0x2222, text_writable=False)


# -- 3. bad options: one line naming the option, exit 2 --------------------------------------

BAD_OPTIONS = [
    (["--stats-every", "-1"], "--stats-every"),
    (["--min-interval", "-1"], "--min-interval"),
    (["--min-interval", "10", "--max-interval", "5"], "--min-interval 10 is above"),
    (["--workers", "0"], "--workers 0"),
    (["--keyed-every", "0"], "--keyed-every 0: must be"),
    (["--duration", "-1"], "--duration"),
    (["--on-tamper", "exec:/nonexistent/hook --sev 1"], "--on-tamper exec:/nonexistent"),
    (["--on-tamper", "exec:no-such-program-kscan"], "not found on PATH"),
    (["--forensics-dir", "{tmp}/afile/forensics"], "--forensics-dir"),
]


@pytest.mark.parametrize(("argv", "says"), BAD_OPTIONS)
def test_bad_run_options_are_one_line_exit_2(tmp_path: Path, argv: list[str],
                                             says: str) -> None:
    (tmp_path / "afile").write_text("not a directory")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    res = kscan("run", "--config", "", "--qmp", str(tmp_path / "x.sock"), "--db",
                str(tmp_path / "k.db"), *argv, timeout=60)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert says in res.stderr
    assert not (tmp_path / "k.db").exists()  # refused before anything was opened


CONFIG_BAD = [
    ("stats_every = -1", "stats_every"), ("min_interval = -1", "min_interval"),
    ("min_interval = 10\nmax_interval = 5", "--min-interval 10 is above"),
    ("workers = 0", "workers"), ("duration = -1", "duration"),
    ("keyed_every = -5", "keyed_every"),
    ('on_tamper = "exec:/nonexistent/hook"', "--on-tamper"),
    ('forensics_dir = "{tmp}/afile/x"', "--forensics-dir"),
]


@pytest.mark.parametrize(("text", "says"), CONFIG_BAD)
def test_bad_config_values_are_one_line_exit_2(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "afile").write_text("")
    conf = tmp_path / "k.toml"
    conf.write_text(f'qmp = ["{tmp_path}/x.sock"]\n' + text.replace("{tmp}", str(tmp_path))
                    + "\n")
    res = kscan("run", "--config", str(conf), "--db", str(tmp_path / "k.db"), timeout=60)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert says in res.stderr and str(conf) in res.stderr


def test_stats_every_0_means_no_stats(fleet: dict[str, Any]) -> None:  # noqa: F811
    """Was: ~67,000 stats lines in 2 s at full CPU."""
    res = kscan("run", "--config", "", "--replay", str(fleet["tmp"] / "vms" / "ops0"),
                "--db", str(fleet["db"]), "--stats-every", "0", "--duration", "4",
                "--interval", "0.5", timeout=120)
    assert res.returncode == 0, res.stderr
    kinds = [json.loads(line)["event"] for line in res.stdout.splitlines()]
    assert "vm_clean" in kinds and "stats" not in kinds
    assert len(kinds) < 20


def test_check_config(tmp_path: Path) -> None:
    conf = tmp_path / "k.toml"
    conf.write_text(f'db = "{tmp_path}/k.db"\nqmp = ["/run/vms/*/qmp.sock"]\n'
                    'on_tamper = "exec:/bin/true"\ncpu_budget = 5\n')
    res = kscan("run", "--config", str(conf), "--check-config", timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("configuration OK") and "exec:/bin/true" in res.stdout
    assert "5% of one core" in res.stdout
    assert not (tmp_path / "k.db").exists() and not (tmp_path / "forensics").exists()
    conf.write_text(conf.read_text() + "workers = 0\n")
    res = kscan("run", "--config", str(conf), "--check-config", timeout=60)
    assert res.returncode == 2 and "workers" in res.stderr and not res.stdout


# -- 4. a reload that changes db --------------------------------------------------------------

def test_reload_changing_db_needs_restart_and_keeps_forensics(
        fleet: dict[str, Any]) -> None:  # noqa: F811
    tmp = fleet["tmp"]
    conf = tmp / "kscan.toml"
    base = f'replay = ["{tmp}/vms/ops0"]\ninterval = 0.2\n'
    conf.write_text(f'db = "{fleet["db"]}"\n' + base)
    run = RunProc(["--config", str(conf)], tmp / "stderr")
    try:
        started = run.wait_for(lambda e: e["event"] == "kscan_started", 60)
        assert started["forensics_dir"] == str(tmp / "forensics")
        run.wait_for(lambda e: e["event"] == "vm_clean", 60)
        conf.write_text(f'db = "{tmp}/other/kscan.db"\n' + base)
        mark = run.mark()
        run.proc.send_signal(signal.SIGHUP)
        ev = run.wait_for(lambda e: e["event"] == "reloaded", 30, mark)
        assert ev["restart_needed"] == ["db"]
        assert ev["forensics_dir"] == str(tmp / "forensics")  # beside the db in use
        tamper(fleet["mems"]["ops0"])
        t = run.wait_for(lambda e: e["event"] == "tamper", 30, mark)
        assert str(t["forensics"]).startswith(str(tmp / "forensics"))
    finally:
        assert run.stop() == 0
    assert not (tmp / "other").exists()


# -- 5. Ctrl-C while a FIFO is awaited -----------------------------------------------------------

def _wait_blocked_in_open(proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until the process sits in openat(2) (of the FIFO: nothing else blocks there)."""
    deadline = time.monotonic() + timeout
    blocked_since = 0.0
    while time.monotonic() < deadline:
        try:
            call = Path(f"/proc/{proc.pid}/syscall").read_text().split()[0]
        except (OSError, IndexError):
            call = ""
        try:  # where the kernel has it waiting: a FIFO's open waits for a writer
            wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
        except OSError:
            wchan = ""
        # Waiting for a FIFO's writer; or in openat(2) for a second on end (imports
        # open files too, briefly: a SIGINT then would not be the case under test).
        if wchan in ("wait_for_partner", "fifo_open"):
            return
        if call in ("257", "2"):
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 1.0:
                return
        else:
            blocked_since = 0.0
        assert proc.poll() is None, "kscan exited before opening the FIFO"
        time.sleep(0.2)
    raise AssertionError("kscan never blocked opening the FIFO")


@pytest.mark.parametrize("command", ["run", "import"])
def test_ctrl_c_on_a_fifo(tmp_path: Path, command: str) -> None:
    """Was: a traceback (run --config FIFO), SIGINT ignored (import FIFO)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    key = tmp_path / "k.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out",
                    str(tmp_path / "k.pem")], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "k.pem"), "-pubout", "-out",
                    str(key)], check=True, capture_output=True)
    argv = (["run", "--config", str(fifo)] if command == "run"
            else ["import", str(fifo), "--trust", str(key)])
    proc = subprocess.Popen([sys.executable, "-m", "scanner", *argv, "--db",
                             str(tmp_path / "k.db")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        _wait_blocked_in_open(proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert b"Traceback" not in err, err.decode()


# -- 6. journald ---------------------------------------------------------------------------------

def journald(raw: bytes) -> list[tuple[int, str]]:
    """What journald makes of a unit's stream: each line an entry, a leading `<N>` its
    PRIORITY (SyslogLevelPrefix=yes), else the unit's SyslogLevel (info, 6)."""
    out = []
    for line in raw.decode().splitlines():
        m = re.match(r"<([0-7])>", line)
        out.append((int(m.group(1)), line[m.end():]) if m else (6, line))
    return out


def readme_recipe() -> str:
    m = re.search(r"^ +(journalctl -u kscan -o cat \| jq .*)$", README.read_text(), re.M)
    assert m is not None, "docs/operating.md's journald recipe is gone"
    return m.group(1)


def test_journald_priorities_no_duplicates_and_the_readme_recipe(
        fleet: dict[str, Any]) -> None:  # noqa: F811
    """Was: every event journaled twice (JSON on stdout, a summary on stderr), no
    PRIORITY, and the documented `journalctl -o cat | jq` failed on the summaries."""
    tmp = fleet["tmp"]
    journal = tmp / "journal"
    with open(journal, "wb") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen([sys.executable, "-m", "scanner", "run", "--config", "",
                                 "--replay", str(tmp / "vms" / "*"), "--db", str(fleet["db"]),
                                 "--interval", "0.2", "--on-tamper", "exec:/bin/true"],
                                stdout=stream, stderr=stream, cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + 60
            while journal.read_bytes().count(b'"event":"vm_clean"') < 2:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
            tamper(fleet["mems"]["ops1"])
            while b'"event":"action"' not in journal.read_bytes():
                assert time.monotonic() < deadline + 30 and proc.poll() is None
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
    entries = journald(journal.read_bytes())
    events = [(p, json.loads(m)) for p, m in entries if m.startswith("{")]
    others = [m for _, m in entries if not m.startswith("{")]
    kinds = [e["event"] for _, e in events]
    assert kinds.count("tamper") == 1 and kinds.count("vm_found") == 2
    # Each event once: no stderr summary repeats one ("ops1: TAMPERED", "ops0: vm_found").
    assert not [m for m in others if re.search(r"vm_found|vm_clean|TAMPERED|kscan_st", m)]
    want = {"critical": 2, "warning": 4, "notice": 5, "info": 6}
    for prio, ev in events:
        assert prio == want[ev["severity"]], ev
    assert [p for p, e in events if e["event"] == "tamper"] == [2]
    # The documented recipe over that journal: exactly the critical events.
    cat = tmp / "cat"
    cat.write_text("".join(m + "\n" for _, m in entries)
                   + "kscan: a log line of kscan's own, not JSON\n")
    recipe = readme_recipe().replace("journalctl -u kscan -o cat", f"cat {cat}")
    res = subprocess.run(["sh", "-c", recipe], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["event"] for e in got] == ["tamper"] and got[0]["vm"] == "ops1"


def test_is_journal_matches_the_fd_named(tmp_path: Path) -> None:
    f = tmp_path / "f"
    with open(f, "wb") as out, open(tmp_path / "g", "wb") as other:
        st = os.fstat(out.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert is_journal(out.fileno(), env)
        assert not is_journal(other.fileno(), env)
        assert not is_journal(out.fileno(), {"JOURNAL_STREAM": "x:y"})
        assert not is_journal(out.fileno(), {})


def test_quiet_run_leaves_out_event_summaries(fleet: dict[str, Any]) -> None:  # noqa: F811
    res = kscan("run", "--config", "", "--replay", str(fleet["tmp"] / "vms" / "ops0"),
                "--db", str(fleet["db"]), "--duration", "3", "-q", "--qmp",
                str(fleet["tmp"] / "absent.sock"), timeout=120)
    assert res.returncode == 0
    assert '"vm_clean"' in res.stdout and "vm_unreachable" in res.stdout
    assert res.stderr == ""


# -- status, events, baseline list|rm, profile rm -------------------------------------------------

def test_status_and_events_while_run_writes(fleet: dict[str, Any]) -> None:  # noqa: F811
    tmp, db = fleet["tmp"], str(fleet["db"])
    follow = subprocess.Popen([sys.executable, "-m", "scanner", "events", "--db", db,
                               "--follow", "--json", "--type", "tamper,tamper_cleared"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    run = RunProc(["--config", "", "--replay", str(tmp / "vms" / "*"), "--db", db,
                   "--interval", "0.2"], tmp / "stderr")
    try:
        for vm in ("ops0", "ops1"):
            run.wait_for(lambda e, vm=vm: e["event"] == "vm_clean" and e["vm"] == vm, 60)
        mark = run.mark()
        tamper(fleet["mems"]["ops1"])
        run.wait_for(lambda e: e["event"] == "tamper", 30, mark)
        res = kscan("status", "--db", db, "--json", timeout=60)  # run is still running
        assert res.returncode == 1, res.stderr  # as check: a VM's last verdict is tampered
        status = {s["vm"]: s for s in json.loads(res.stdout)}
        assert status["ops1"]["verdict"] == "TAMPERED"
        assert status["ops0"]["verdict"] == "clean" and status["ops0"]["state"] == "watching"
        assert status["ops0"]["release"] == "6.1.0-synthetic" and status["ops0"]["golden"]
        assert abs(status["ops0"]["last_verified"] - time.time()) < 60
        text = kscan("status", "--db", db, timeout=60).stdout
        assert re.search(r"^ops1 +TAMPERED +\d+s ago +watching +6\.1\.0-synthetic", text, re.M)
        assert kscan("status", "--db", db, "--vm", "ops0", timeout=60).returncode == 0
        res = kscan("status", "--db", db, "--vm", "nosuch", timeout=60)
        assert res.returncode == 2 and "no VM named nosuch" in res.stderr

        res = kscan("events", "--db", db, "--vm", "ops1", "--type", "tamper", "--json",
                    timeout=60)
        (line,) = res.stdout.splitlines()
        assert json.loads(line)["vm"] == "ops1" and json.loads(line)["severity"] == "critical"
        res = kscan("events", "--db", db, "--severity", "critical", "--since", "1h",
                    timeout=60)
        (line,) = res.stdout.splitlines()
        assert "critical ops1: TAMPERED:" in line
        assert kscan("events", "--db", db, "-n", "2", timeout=60).stdout.count("\n") == 2
        # --follow printed the tamper as run appended it.
        got = json.loads(read_line(follow, 30))
        assert got["event"] == "tamper" and got["vm"] == "ops1"
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(30)
        assert run.stop() == 0
    assert follow.returncode == 130 and follow.stderr and b"Traceback" not in \
        follow.stderr.read()


def test_status_events_read_only_never_create(tmp_path: Path) -> None:
    db = tmp_path / "none.db"
    for cmd in ("status", "events"):
        res = kscan(cmd, "--db", str(db), timeout=60)
        assert res.returncode == 2 and "no such database" in res.stderr
        assert len(res.stderr.splitlines()) == 1
    assert not db.exists()


def test_baseline_list_rm_and_profile_rm(fleet: dict[str, Any]) -> None:  # noqa: F811
    db = str(fleet["db"])
    check = kscan("check", "--replay", str(fleet["tmp"] / "vms" / "ops0"), "--db", db)
    assert check.returncode == 0, check.stderr
    listed = json.loads(kscan("baseline", "list", "--db", db, "--json").stdout)
    (golden,) = listed
    assert golden["vms"] == ["ops0"] and golden["boots"] == 1
    build_id = golden["build_id"]
    # The profile is needed by the baseline; the baseline by ops0.
    res = kscan("profile", "rm", build_id[:12], "--db", db)
    assert res.returncode == 2 and "needed by 1 golden baseline" in res.stderr
    res = kscan("baseline", "rm", build_id, "--db", db)
    assert res.returncode == 2 and "ops0" in res.stderr
    assert kscan("baseline", "rm", "ffff0000ffff", "--db", db).returncode == 2
    assert json.loads(kscan("baseline", "list", "--db", db, "--json").stdout) == listed
    res = kscan("baseline", "rm", build_id, "--force", "--db", db)
    assert res.returncode == 0 and golden["boot_profile"] in res.stdout
    assert json.loads(kscan("baseline", "list", "--db", db, "--json").stdout) == []
    res = kscan("profile", "rm", build_id, "--db", db)
    assert res.returncode == 0, res.stderr
    assert json.loads(kscan("profile", "list", "--db", db, "--json").stdout) == []
    logged = [(e, d.get("build_id")) for e, _, d in events_of(fleet["db"])]
    assert ("baseline_removed", build_id) in logged and ("profile_removed", build_id) in logged
    for ev, vm, detail in events_of(fleet["db"]):   # as the exact schema has them
        if ev.endswith("_removed"):
            row = {"ts": 1.0, "event": ev, "vm": vm, **detail}
            assert [e.message for e in VALIDATOR.iter_errors(row)] == [], row
    # `kscan baseline --replay` still takes a baseline (the actions are optional).
    res = kscan("baseline", "--replay", str(fleet["tmp"] / "golden"), "--db", db)
    assert res.returncode == 2 and "profile" in res.stderr  # its profile is gone now


def test_profile_rm_force_takes_its_baselines(fleet: dict[str, Any]) -> None:  # noqa: F811
    db = str(fleet["db"])
    (golden,) = json.loads(kscan("baseline", "list", "--db", db, "--json").stdout)
    res = kscan("profile", "rm", golden["build_id"], "--force", "--db", db)
    assert res.returncode == 0 and golden["boot_profile"] in res.stdout
    assert json.loads(kscan("baseline", "list", "--db", db, "--json").stdout) == []


# -- finding the database, libvirt's URI ---------------------------------------------------------

def test_default_db_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = tmp_path / "var-lib-kscan" / "kscan.db"
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert default_db_path(env, service_db=service) == tmp_path / "xdg" / "kscan" / "kscan.db"
    service.parent.mkdir()
    service.write_bytes(b"")
    want = service if os.geteuid() == 0 else tmp_path / "xdg" / "kscan" / "kscan.db"
    assert default_db_path(env, service_db=service) == want
    env["STATE_DIRECTORY"] = f"{tmp_path}/unit:{tmp_path}/second"
    assert default_db_path(env, service_db=service) == tmp_path / "unit" / "kscan.db"
    env["KSCAN_DB"] = "relative.db"  # ignored, as XDG ignores relative paths
    assert default_db_path(env, service_db=service) == tmp_path / "unit" / "kscan.db"
    env["KSCAN_DB"] = str(tmp_path / "mine.db")
    assert default_db_path(env, service_db=service) == tmp_path / "mine.db"


def test_one_shot_commands_find_the_service_db(fleet: dict[str, Any]) -> None:  # noqa: F811
    env = {"KSCAN_DB": str(fleet["db"]), "XDG_STATE_HOME": str(fleet["tmp"] / "xdg")}
    res = sh("kscan profile list --json", env)
    assert [p["release"] for p in json.loads(res.stdout)] == ["6.1.0-synthetic"]
    res = sh("kscan status --json", {**env, "KSCAN_DB": "",
                                     "STATE_DIRECTORY": str(fleet["db"].parent)})
    assert res.returncode == 0 and {s["vm"] for s in json.loads(res.stdout)} == {"golden"}


def test_connect_honours_libvirt_default_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+ssh://host/system")
    for argv in (["run", "--libvirt"], ["check", "--libvirt", "d"], ["baseline"]):
        assert build_parser().parse_args(argv).connect == "qemu+ssh://host/system"
    assert build_parser().parse_args(["run", "--connect", "test:///default"]).connect == \
        "test:///default"
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI")
    assert build_parser().parse_args(["run"]).connect == "qemu:///system"


def test_parse_since() -> None:
    assert parse_since("90s", now=1000.0) == 910.0
    assert parse_since("2h", now=10000.0) == 2800.0
    assert parse_since("1d", now=100000.0) == 13600.0
    assert parse_since("1700000000") == 1700000000.0
    assert parse_since("2026-12-03T00:00:00Z") == parse_since("2026-12-03T00:00")
    with pytest.raises(Exception, match="--since"):
        parse_since("yesterday-ish")


# -- hostile names ---------------------------------------------------------------------------

EVIL = "evil\x1b]0;owned\x07\n2026-01-01T00:00:00Z critical web01: TAMPERED: forged\u202e"


def test_hostile_vm_names_cannot_forge_lines(tmp_path: Path) -> None:
    """A VM's name is its QMP peer's choice: in `status` and `events` text it is escaped,
    one line per VM or event, with no terminal control or bidi character left."""
    import asyncio

    from store import Store

    db = tmp_path / "k.db"

    async def fill() -> None:
        async with Store.open(db) as st:
            await st.append_event({"ts": time.time(), "event": "vm_clean", "vm": EVIL,
                                   "severity": "info"})
            await st.append_event({"ts": time.time(), "event": "vm_lost", "vm": EVIL,
                                   "severity": "warning", "reason": "\x1b[2J" + EVIL})

    asyncio.run(fill())
    for argv, lines in ((["status"], 2), (["events"], 2)):
        res = kscan(*argv, "--db", str(db), timeout=60)
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.splitlines()) == lines, res.stdout
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", res.stdout), res.stdout
        assert "\\x1b" in res.stdout
    res = kscan("events", "--db", str(db), "--json", timeout=60)
    assert [json.loads(line)["vm"] for line in res.stdout.splitlines()] == [EVIL, EVIL]


def test_journal_log_lines_stay_one_entry() -> None:
    """Under the journal a log line holding a peer's newline cannot start an entry of its
    own (a forged `<2>{"event": "tamper", ...}`): it stays one entry, kscan's."""
    import logging

    from scanner.run.journal import StderrFormatter

    record = logging.LogRecord("kscan", logging.WARNING, __file__, 1,
                               'peer said: x\n<2>{"event":"tamper"}', None, None)
    line = StderrFormatter(journal=True).format(record)
    assert "\n" not in line and line.startswith("<4>kscan: peer said")
    assert STAMP.match(StderrFormatter(journal=False).format(record))


def test_reader_refuses_what_is_not_a_kscan_database(tmp_path: Path) -> None:
    from store.errors import SchemaError
    from store.reader import Reader
    from store.schema import APPLICATION_ID, SCHEMA_VERSION

    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(SchemaError, match="not a kscan database"), Reader.open(foreign):
        pass
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError, match="newer"), Reader.open(newer):
        pass
    before = foreign.read_bytes()
    res = kscan("status", "--db", str(foreign), timeout=60)
    assert res.returncode == 2 and "not a kscan database" in res.stderr
    assert foreign.read_bytes() == before


def test_one_shot_quiet_and_verbose(fleet: dict[str, Any]) -> None:  # noqa: F811
    db = str(fleet["db"])
    vm = str(fleet["tmp"] / "vms" / "ops0")
    res = kscan("check", "--replay", vm, "--db", db, "-q")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""
    tamper(fleet["mems"]["ops0"])
    res = kscan("check", "--replay", vm, "--db", db, "-q")
    assert res.returncode == 1 and res.stdout == ""  # the exit status tells
    res = kscan("status", "--db", db, "-q")
    assert res.returncode == 1 and res.stdout == ""
    res = kscan("check", "--replay", vm, "--db", db, "-v")
    assert res.returncode == 1 and "TAMPERED" in res.stdout
    assert all(STAMP.match(line) for line in res.stderr.splitlines()), res.stderr

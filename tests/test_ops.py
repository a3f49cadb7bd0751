"""Operating `kscan run`: Prometheus metrics, systemd's notify protocol, SIGHUP reload and
the configuration file — on the real command line, over synthetic replayed VMs
(`tests.test_unit_watcher`'s kernel: no guest boots here; `test_ops_live` tampers a
real guest).

The metrics are scraped over HTTP with urllib while `kscan run` watches two replayed
VMs; a tamper is made by writing into one VM's memory file (kscan maps it shared, as it
maps a live guest's RAM). systemd is played by a datagram socket the test binds and
names in NOTIFY_SOCKET.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kscan.shipped import contrib_path
from scanner.check.fastpath import KEYED_EVERY_S
from scanner.commands.cli import build_parser
from scanner.commands.config import (
    NOT_KEYS,
    ConfigError,
    config_keys,
    load_config,
    parse_with_config,
    subparser,
)
from scanner.commands.run_policy import run_config
from scanner.run.metrics import MetricsError, parse_address
from scanner.run.service import Notifier
from tests.kscan_proc import RunProc, kscan
from tests.test_unit_watcher import (
    PAGE,
    SLIDE,
    TAMPER_AT,
    TAMPER_PAGE,
    build_ram,
    golden_db,
    poke,
    write_vm,
)

ROOT = Path(__file__).resolve().parent.parent
LOAD_GPA = 0x10_0000
EXAMPLE = contrib_path("kscan.toml.example")
UNIT = contrib_path("systemd/kscan.service")


# -- helpers ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], float]:
    """Every sample of /metrics, keyed by (name, labels); and the scrape's seconds."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    took = time.perf_counter() - t0
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, took


def scrape_until(port: int, pred: Any, timeout: float = 10.0) -> dict[
        tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape until `pred(samples)` holds (the page is cached for up to a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples, _ = scrape(port)
        if pred(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def make_vm(directory: Path, name: str) -> Path:
    """A clean replayed VM of the synthetic kernel; its memory file."""
    return write_vm(directory, name, build_ram(SLIDE, LOAD_GPA, 0x2222, text_writable=False))


def tamper(mem: Path) -> None:
    poke(mem, LOAD_GPA + TAMPER_PAGE * PAGE + TAMPER_AT, b"\xcc\x90\x90\x90\xcc")


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Any]:
    """A database with the synthetic kernel's profile and golden baseline, and two
    replayed VMs (vms/ops0, vms/ops1) of it."""
    db = golden_db(tmp_path)
    mems = {f"ops{i}": make_vm(tmp_path / "vms" / f"ops{i}", f"ops{i}") for i in range(2)}
    return {"db": db, "tmp": tmp_path, "mems": mems}


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    """systemd's notification socket, played by the test (a short path: AF_UNIX)."""
    d = tempfile.mkdtemp(prefix="kscan-sd-", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(f"{d}/notify")
    sock.settimeout(0.2)
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)


class Notifications:
    """What kscan sent to the socket, read as it comes by a thread (a unix datagram
    queue holds only ~10 messages: unread, later ones would not fit)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait_for(self, line: str, timeout: float, after: int = 0) -> int:
        """Index of the first message from `after` on holding `line`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(list(self.got)[after:], after):
                if line in msg.split("\n"):
                    return i
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line} within {timeout}s; got {self.got[-10:]}")
            time.sleep(0.05)


# -- metrics on a real run -----------------------------------------------------------------

def test_metrics_move_while_run_watches_and_a_tamper_counts(fleet: dict[str, Any]) -> None:
    port = free_port()
    run = RunProc(["--replay", str(fleet["tmp"] / "vms" / "*"), "--interval", "0.2",
                   "--cpu-budget", "100", "--metrics", f"127.0.0.1:{port}",
                   "--keyed-every", "1",
                   "--db", str(fleet["db"])], fleet["tmp"] / "stderr")
    try:
        for vm in ("ops0", "ops1"):
            run.wait_for(lambda e, vm=vm: e["event"] == "vm_clean" and e["vm"] == vm, 60)
        first, _ = scrape(port)
        assert [v for k, v in first.items() if k[0] == "kscan_info"] == [1.0]
        assert value(first, "kscan_vms", state="watching") == 2
        assert value(first, "kscan_cpu_budget_ratio") == 1.0
        assert value(first, "kscan_period_seconds") > 0
        assert value(first, "kscan_events_dropped_total") == 0
        assert value(first, "kscan_metrics_stale") == 0
        assert value(first, "kscan_ready") == 1
        for vm in ("ops0", "ops1"):
            assert value(first, "kscan_vm_tamper_total", vm=vm) == 0
            assert value(first, "kscan_vm_tampered", vm=vm) == 0
            assert value(first, "kscan_vm_scan_cost_seconds", vm=vm) > 0
            assert abs(value(first, "kscan_vm_last_verified_timestamp_seconds", vm=vm)
                       - time.time()) < 30
        time.sleep(2.0)
        second, _ = scrape(port)
        for vm in ("ops0", "ops1"):  # scans move
            assert (value(second, "kscan_vm_scans_total", vm=vm)
                    > value(first, "kscan_vm_scans_total", vm=vm))
            assert (value(second, "kscan_vm_last_verified_timestamp_seconds", vm=vm)
                    > value(first, "kscan_vm_last_verified_timestamp_seconds", vm=vm))
        assert value(second, "kscan_scans_total") > value(first, "kscan_scans_total")
        # --keyed-every 1 at --interval 0.2: each VM's pass keyed about once a second.
        keyed = value(second, "kscan_keyed_scans_total") - value(first, "kscan_keyed_scans_total")
        scans = value(second, "kscan_scans_total") - value(first, "kscan_scans_total")
        assert 2 <= keyed <= scans
        # --interval 0.2: the target; the measured period is what the VMs really got.
        assert value(second, "kscan_period_target_seconds") == pytest.approx(0.2)
        assert 0.1 < value(second, "kscan_period_seconds") < 5
        assert value(second, "kscan_cpu_seconds_total") >= value(first, "kscan_cpu_seconds_total")

        mark = run.mark()
        tamper(fleet["mems"]["ops1"])
        run.wait_for(lambda e: e["event"] == "tamper" and e["vm"] == "ops1", 30, mark)
        # The page is rebuilt at most once a second: the next rebuild shows the tamper.
        after = scrape_until(port, lambda s: value(s, "kscan_vm_tamper_total", vm="ops1") > 0)
        assert value(after, "kscan_vm_tamper_total", vm="ops1") == 1
        assert value(after, "kscan_vm_tampered", vm="ops1") == 1
        assert value(after, "kscan_vm_tamper_total", vm="ops0") == 0
        # The scrape costs the loop little: time 20 of them.
        took = [scrape(port)[1] for _ in range(20)]
        took.sort()
        print(f"scrape: median {took[10] * 1e3:.1f} ms, max {took[-1] * 1e3:.1f} ms")
        assert took[10] < 0.5
    finally:
        assert run.stop() == 0


def test_metrics_bind_failure_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = kscan("run", "--replay", str(tmp_path / "none"), "--metrics",
                    f"127.0.0.1:{port}", "--db", str(tmp_path / "k.db"), timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert f"--metrics 127.0.0.1:{port}: cannot listen" in res.stderr


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("9464", "host:", ":9464", "h:99999", "h:x"):
        with pytest.raises(MetricsError):
            parse_address(bad)


# -- systemd: notify, watchdog, reload --------------------------------------------------------

def test_ready_watchdog_and_reload_keep_vms(fleet: dict[str, Any], notify_socket: socket.socket,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = fleet["tmp"]
    port = free_port()
    conf = tmp / "kscan.toml"
    vms = tmp / "vms"
    conf.write_text(f'db = "{fleet["db"]}"\nreplay = ["{vms}/ops*"]\ninterval = 0.2\n'
                    f'cpu_budget = 50\non_tamper = "report"\nmetrics = "127.0.0.1:{port}"\n')
    # A source that never attaches: READY must still come (it is reported unreachable).
    (vms / "opsbroken").mkdir()
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    note = Notifications(notify_socket)
    run = RunProc(["--config", str(conf)], tmp / "stderr")
    try:
        ready = note.wait_for("READY=1", 60)
        assert any(m.startswith("STATUS=") for m in note.got[ready].split("\n"))
        found = {e["vm"] for e in run.of("vm_found")}
        assert found == {"ops0", "ops1"}, "READY=1 before every source was attached"
        assert run.of("vm_unreachable"), "READY=1 before the broken source was reported"
        w = note.wait_for("WATCHDOG=1", 5, ready)
        note.wait_for("WATCHDOG=1", 5, w + 1)  # and again: pinged from the running loop
        started = run.wait_for(lambda e: e["event"] == "kscan_started", 5)
        assert started["on_tamper"] == "report" and "50%" in started["policy"]
        for vm in ("ops0", "ops1"):
            run.wait_for(lambda e, vm=vm: e["event"] == "vm_clean" and e["vm"] == vm, 60)

        # A new VM, a new glob, another action and budget: reload.
        make_vm(tmp / "more" / "new0", "new0")
        conf.write_text(f'db = "{fleet["db"]}"\nreplay = ["{vms}/ops*", "{tmp}/more/*"]\n'
                        f'interval = 0.2\ncpu_budget = 20\non_tamper = "exec:/bin/true"\n'
                        f'metrics = "127.0.0.1:{port}"\n')
        before, _ = scrape(port)
        mark, sent = run.mark(), len(note.got)
        run.proc.send_signal(signal.SIGHUP)
        reloaded = run.wait_for(lambda e: e["event"] == "reloaded", 30, mark)
        assert reloaded["on_tamper"] == "exec:/bin/true"
        assert "20%" in reloaded["policy"]
        assert {"action", "policy", "replay"} <= set(reloaded["changed"])
        assert reloaded["restart_needed"] == []
        r = note.wait_for("RELOADING=1", 10, sent)
        note.wait_for("READY=1", 10, r)
        run.wait_for(lambda e: e["event"] == "vm_clean" and e["vm"] == "new0", 60, mark)
        time.sleep(1.5)
        after, _ = scrape(port)
        # VM state kept: no new vm_found for ops0/ops1, their scans went on, counters grew.
        assert [e["vm"] for e in run.of("vm_found", after=mark)] == ["new0"]
        assert not [e for e in run.of("vm_lost", after=mark) if e["vm"] in ("ops0", "ops1")]
        for vm in ("ops0", "ops1"):
            assert (value(after, "kscan_vm_scans_total", vm=vm)
                    > value(before, "kscan_vm_scans_total", vm=vm))
        assert value(after, "kscan_cpu_budget_ratio") == pytest.approx(0.2)
        assert value(after, "kscan_reloads_total") == 1
        # The new action is the one applied to the next tamper.
        mark = run.mark()
        tamper(fleet["mems"]["ops0"])
        act = run.wait_for(lambda e: e["event"] == "action" and e["vm"] == "ops0", 30, mark)
        assert act["action"] == "exec:/bin/true" and act["ok"]

        # A broken file: one error event, the configuration in force is kept.
        conf.write_text(conf.read_text() + "cpu_budgte = 5\n")
        mark = run.mark()
        run.proc.send_signal(signal.SIGHUP)
        err = run.wait_for(lambda e: e["event"] == "error" and e.get("source") == "reload",
                           30, mark)
        assert "cpu_budgte" in err["message"]
        time.sleep(0.5)
        assert run.proc.poll() is None
        last, _ = scrape(port)
        assert value(last, "kscan_cpu_budget_ratio") == pytest.approx(0.2)
    finally:
        assert run.stop() == 0
        try:
            note.wait_for("STOPPING=1", 5)
        finally:
            note.close()


def test_reload_drops_sources_no_longer_configured(fleet: dict[str, Any]) -> None:
    tmp = fleet["tmp"]
    conf = tmp / "kscan.toml"
    conf.write_text(f'replay = ["{tmp}/vms/*"]\ninterval = 0.2\n')
    run = RunProc(["--config", str(conf), "--db", str(fleet["db"])], tmp / "stderr")
    try:
        for vm in ("ops0", "ops1"):
            run.wait_for(lambda e, vm=vm: e["event"] == "vm_clean" and e["vm"] == vm, 60)
        conf.write_text(f'replay = ["{tmp}/vms/ops0"]\ninterval = 0.2\n')
        mark = run.mark()
        run.proc.send_signal(signal.SIGHUP)
        ev = run.wait_for(lambda e: e["event"] == "reloaded", 30, mark)
        assert ev["dropped"] == [str(tmp / "vms" / "ops1")]
        lost = run.of("vm_lost", after=mark)
        assert [e["vm"] for e in lost] == ["ops1"]
        time.sleep(3)  # not picked up again by discovery
        assert not run.of("vm_found", after=mark)
    finally:
        assert run.stop() == 0


def test_notifier_speaks_sd_notify(notify_socket: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "2000000",
           "WATCHDOG_PID": str(os.getpid())}
    n = Notifier(env)
    assert n.enabled and n.watchdog_s == 2.0
    assert env == {}  # unset, like sd_notify(unset_environment=1): hooks do not inherit it
    assert n.send("READY=1", "STATUS=hello")
    assert notify_socket.recv(100) == b"READY=1\nSTATUS=hello"
    n.close()
    assert not Notifier({}).send("READY=1")  # outside systemd: a no-op
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_notifier_abstract_socket() -> None:
    name = f"kscan-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.send("WATCHDOG=1")
        assert s.recv(100) == b"WATCHDOG=1"
        n.close()


# -- the configuration file --------------------------------------------------------------------

def _args(argv: list[str]) -> argparse.Namespace:
    return parse_with_config(build_parser, argv)


def test_config_values_and_command_line_override(tmp_path: Path) -> None:
    conf = tmp_path / "k.toml"
    conf.write_text('qmp = ["/run/a/*.sock", "/run/b.sock"]\ncpu_budget = 25\n'
                    'interval = "auto"\non_tamper = "pause"\nstrict = true\nworkers = 3\n'
                    'min_interval = 2\ndb = "/var/lib/kscan/kscan.db"\n'
                    'metrics = "127.0.0.1:9464"\nkeyed_every = 60\n')
    a = _args(["run", "--config", str(conf)])
    assert a.qmp == ["/run/a/*.sock", "/run/b.sock"] and a.cpu_budget == 25.0
    assert a.on_tamper == "pause" and a.strict is True and a.workers == 3
    assert a.min_interval == 2.0 and a.db == "/var/lib/kscan/kscan.db"
    assert a.metrics == "127.0.0.1:9464" and a.config_file == str(conf)
    assert a.keyed_every == 60.0
    b = _args(["run", "--config", str(conf), "--cpu-budget", "5", "--qmp", "/x.sock",
               "--interval", "7", "--db", "/tmp/other.db"])
    assert b.cpu_budget == 5.0 and b.qmp == ["/x.sock"]  # the list is replaced
    assert b.interval == 7.0 and b.db == "/tmp/other.db" and b.on_tamper == "pause"
    assert run_config(b).policy.keyed_every == 60.0   # the file's, into the policy
    c = _args(["run", "--config", "", "--qmp", "/x.sock"])  # no file at all
    assert c.config_file is None and c.cpu_budget == 10.0
    assert c.keyed_every == KEYED_EVERY_S   # the parser's default is the fast path's


@pytest.mark.parametrize(("text", "message"), [
    ("cpu_budgte = 5", "unknown key 'cpu_budgte'"),
    ("cpu-budget = 5", "unknown key 'cpu-budget' (did you mean cpu_budget?)"),
    ('cpu_budget = "ten"', "cpu_budget: 'ten' is not a percentage"),
    ("cpu_budget = 100000", "cpu_budget: 100000%: must be > 0"),
    ("strict = 1", "strict: expected true or false, got an integer"),
    ('workers = "2"', "workers: expected an integer, got a string"),
    ("workers = true", "workers: expected an integer, got a boolean"),
    ("min_interval = [1]", "min_interval: expected a number, got a list"),
    ("qmp = [1]", "qmp: expected a list of strings"),
    ("on_tamper = 3", "on_tamper: expected a string, got an integer"),
    ("interval = -1", "interval: --interval -1: must be 0.05..86400 seconds"),
    ("interval = true", "interval: expected a number or a string, got a boolean"),
    ("[run]\nqmp = []", "unknown key 'run'"),
    ("qmp = [", "not valid TOML"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path: Path, text: str,
                                                   message: str) -> None:
    conf = tmp_path / "k.toml"
    conf.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        _args(["run", "--config", str(conf)])
    assert message in str(err.value)
    assert str(conf) in str(err.value)
    assert "\n" not in str(err.value)


def test_config_error_exits_2_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "k.toml"
    conf.write_text("keep_days = -3\n")
    res = kscan("run", "--config", str(conf), timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"kscan: {conf}: keep_days: -3: must be 0 or more"
    res = kscan("run", "--config", str(tmp_path / "missing.toml"), timeout=60)
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_example_config_has_every_key_and_is_valid() -> None:
    run = subparser(build_parser(), "run")
    keys = set(config_keys(run))
    assert not keys & NOT_KEYS and {"qmp", "strict", "db", "cpu_budget"} <= keys
    text = EXAMPLE.read_text()
    shown = set(re.findall(r"^# (\w+) = ", text, re.M))
    assert shown == keys, f"missing {keys - shown}, unknown {shown - keys}"
    # Uncommented, every example value is accepted.
    live = "\n".join(m.group(1) for m in re.finditer(r"^# (\w+ = .*)$", text, re.M))
    path = Path(tempfile.mkdtemp()) / "k.toml"
    path.write_text(live + "\n")
    settings = load_config(path, run)
    assert set(settings) == keys


def test_unit_file() -> None:
    text = UNIT.read_text()
    directives = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert directives["Type"] == "notify"
    assert directives["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert directives["ExecStart"].endswith("kscan run --config /etc/kscan/kscan.toml")
    assert directives["ProtectSystem"] == "strict" and directives["StateDirectory"] == "kscan"
    assert directives["WatchdogSec"] and directives["NoNewPrivileges"] == "yes"
    assert directives["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    assert "PrivateDevices" not in directives  # it would hide /dev/shm's RAM files
    assert set(directives["CapabilityBoundingSet"].split()) == {
        "CAP_DAC_READ_SEARCH", "CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE"}
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    import subprocess

    res = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True,
                         timeout=60)
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if line.strip() and "is not executable" not in line]
    assert not problems, problems

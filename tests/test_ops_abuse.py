"""`kscan run` against its own operators' tools misbehaving — on the real command line,
over synthetic replayed VMs (`tests.test_ops`'s fleet; no guest boots here):

* a local client scraping `--metrics` in a tight loop (it used to run the scan budget
  into debt: ~7 s without scans per second of scraping) — the VMs keep their rhythm;
* `--metrics unix:PATH`: the socket's mode, a stale socket replaced, a live one or a
  plain file left alone;
* an `exec:` hook that leaves a background child holding its pipes: the `action` event
  and the forensic copy still come (it used to be lost to ProcessLookupError).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kscan_proc import RunProc, kscan
from tests.test_ops import free_port, make_vm, scrape, tamper, value
from tests.test_unit_watcher import golden_db

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Any]:
    db = golden_db(tmp_path)
    mems = {f"ops{i}": make_vm(tmp_path / "vms" / f"ops{i}", f"ops{i}") for i in range(2)}
    return {"db": db, "tmp": tmp_path, "mems": mems}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="kscan-m-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _parse(text: str) -> Samples:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


def scrape_unix(path: str) -> Samples:
    conn = _UnixHTTP(path)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200
        return _parse(r.read().decode())
    finally:
        conn.close()


def _scans(s: Samples, vm: str) -> float:
    return value(s, "kscan_vm_scans_total", vm=vm)


# -- a client scraping in a loop ------------------------------------------------------------

SCRAPE_SECONDS = 6.0
CLIENTS = 4


def test_scraping_in_a_tight_loop_never_delays_scans(fleet: dict[str, Any]) -> None:
    port = free_port()
    run = RunProc(["--replay", str(fleet["tmp"] / "vms" / "*"), "--cpu-budget", "10",
                   "--metrics", f"127.0.0.1:{port}", "--db", str(fleet["db"])],
                  fleet["tmp"] / "stderr")
    try:
        for vm in ("ops0", "ops1"):
            run.wait_for(lambda e, vm=vm: e["event"] == "vm_clean" and e["vm"] == vm, 60)
        before, _ = scrape(port)
        stop = threading.Event()
        served = [0] * CLIENTS
        refused = [0] * CLIENTS

        def hammer(i: int) -> None:
            conn = None
            while not stop.is_set():
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    conn.request("GET", "/metrics")
                    r = conn.getresponse()
                    r.read()
                    if r.status == 200:
                        served[i] += 1
                    else:
                        refused[i] += 1
                except OSError:
                    refused[i] += 1
                finally:
                    if conn is not None:
                        conn.close()

        threads = [threading.Thread(target=hammer, args=(i,), daemon=True)
                   for i in range(CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(SCRAPE_SECONDS)
        stop.set()
        for t in threads:
            t.join(30)
        took = time.monotonic() - t0
        during, _ = scrape(port)
        print(f"{sum(served)} scrapes served, {sum(refused)} refused in {took:.1f} s; "
              f"scans meanwhile: "
              f"{[_scans(during, vm) - _scans(before, vm) for vm in ('ops0', 'ops1')]}")
        # Paced: at most 10 answers a second (plus one in flight per client).
        assert 0 < sum(served) <= 10 * took + CLIENTS + 2
        # The VMs were scanned all along (period 1 s at this budget; ≥ 1 per 3 s) ...
        for vm in ("ops0", "ops1"):
            assert _scans(during, vm) - _scans(before, vm) >= SCRAPE_SECONDS / 3, vm
        # ... and no debt is left to repay: the next scans come at their rhythm
        # (before, scraping for 6 s left them ~40 s without a scan).
        deadline = time.monotonic() + 10
        after = during
        while time.monotonic() < deadline and not all(
                _scans(after, vm) >= _scans(during, vm) + 2 for vm in ("ops0", "ops1")):
            time.sleep(1.0)
            after, _ = scrape(port)
        for vm in ("ops0", "ops1"):
            assert _scans(after, vm) >= _scans(during, vm) + 2, (vm, after)
        assert value(after, "kscan_metrics_cpu_seconds_total") > 0
        assert value(after, "kscan_metrics_stale") == 0
    finally:
        assert run.stop() == 0


# -- a unix socket ---------------------------------------------------------------------------

def test_metrics_on_a_unix_socket_replacing_a_stale_one(fleet: dict[str, Any],
                                                        short_dir: Path) -> None:
    path = short_dir / "metrics.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))          # left behind by a kscan that was killed: nobody listens
    stale.close()
    old = os.umask(0o000)          # even so, the socket is never wider than 0660
    try:
        run = RunProc(["--replay", str(fleet["tmp"] / "vms" / "*"), "--interval", "0.2",
                       "--cpu-budget", "100", "--metrics", f"unix:{path}",
                       "--db", str(fleet["db"])], fleet["tmp"] / "stderr")
    finally:
        os.umask(old)
    try:
        for vm in ("ops0", "ops1"):
            run.wait_for(lambda e, vm=vm: e["event"] == "vm_clean" and e["vm"] == vm, 60)
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o660
        s = scrape_unix(str(path))
        assert value(s, "kscan_vms", state="watching") == 2
        assert value(s, "kscan_metrics_stale") == 0
        # A second kscan does not take over a live socket.
        res = kscan("run", "--replay", str(fleet["tmp"] / "none"), "--metrics",
                    f"unix:{path}", "--db", str(fleet["tmp"] / "k2.db"), timeout=60)
        assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
        assert "another process serves" in res.stderr
        assert value(scrape_unix(str(path)), "kscan_vms", state="watching") == 2
    finally:
        assert run.stop() == 0
    assert not path.exists()       # removed at exit


def test_metrics_unix_path_that_is_a_file_is_left_alone(tmp_path: Path,
                                                        short_dir: Path) -> None:
    path = short_dir / "precious"
    path.write_bytes(b"not a socket")
    res = kscan("run", "--replay", str(tmp_path / "none"), "--metrics", f"unix:{path}",
                "--db", str(tmp_path / "k.db"), timeout=60)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "is not a socket" in res.stderr
    assert path.read_bytes() == b"not a socket"


# -- a hook leaving a child behind ------------------------------------------------------------

def test_a_hook_leaving_a_background_child_still_gives_action_and_forensics(
        fleet: dict[str, Any]) -> None:
    tmp = fleet["tmp"]
    got, pidfile = tmp / "hook.json", tmp / "child.pid"
    hook = tmp / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat > {got}\nsleep 100 &\necho $! > {pidfile}\nexit 0\n")
    hook.chmod(0o755)
    forensics = tmp / "forensics"
    run = RunProc(["--replay", str(tmp / "vms" / "*"), "--interval", "0.2",
                   "--cpu-budget", "100", "--on-tamper", f"exec:{hook}",
                   "--forensics-dir", str(forensics), "--db", str(fleet["db"])],
                  tmp / "stderr")
    try:
        run.wait_for(lambda e: e["event"] == "vm_clean" and e["vm"] == "ops1", 60)
        mark = run.mark()
        tamper(fleet["mems"]["ops1"])
        ev = run.wait_for(lambda e: e["event"] == "tamper" and e["vm"] == "ops1", 30, mark)
        # Well within the hook timeout (30 s): the hook is done when it exits.
        act = run.wait_for(lambda e: e["event"] == "action" and e["vm"] == "ops1", 20, mark)
        assert act["ok"] is True and act["exit_code"] == 0, act
        copy = Path(ev["forensics"])
        deadline = time.monotonic() + 20
        while not (copy / "baseline.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (copy / "report.json").is_file() and (copy / "baseline.json").is_file()
        assert not run.of("forensics_failed")
        for d in (copy.parent, copy, copy / "pages"):
            assert d.stat().st_mode & 0o777 == 0o700, d
        assert b'"tamper"' in got.read_bytes()
    finally:
        assert run.stop() == 0
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), 9)


# -- the page cache and the pacing, alone ---------------------------------------------------

def test_the_page_is_rebuilt_at_most_once_per_period_whatever_the_clients() -> None:
    from scanner.run.metrics_http import CachedPage

    builds = []
    page = CachedPage(lambda: builds.append(1) or b"x" * len(builds), min_age=60.0)
    bodies = []
    threads = [threading.Thread(target=lambda: bodies.extend(page.get() for _ in range(50)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(builds) == 1 and page.rebuilds == 1
    assert bodies == [b"x"] * 400
    fresh = CachedPage(lambda: builds.append(1) or b"y", min_age=0.0)
    fresh.get()
    fresh.get()
    assert fresh.rebuilds == 2


def test_the_pacer_hands_out_turns_in_order_and_refuses_beyond_its_wait() -> None:
    from scanner.run.metrics_http import Pacer

    p = Pacer(rate=0.1, max_wait=25.0)   # a turn every 10 s; nobody waits over 25 s
    waits = [p.reserve() for _ in range(4)]
    assert waits[0] == 0.0
    assert waits[1] is not None and 9.0 < waits[1] <= 10.0
    assert waits[2] is not None and 19.0 < waits[2] <= 20.0
    assert waits[3] is None              # would wait 30 s: refused (503), not queued

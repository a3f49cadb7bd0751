"""One hostile QMP peer (and a FIFO, and a peer that never answers) among real guests:
the real guests keep being scanned, and a tamper on one of them is still found within
two intervals (plus the slow path's time under TCG); then `kscan run` is killed with
SIGKILL and its database opens clean with every event it had printed."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from scanner.image.kernel_profile import KernelProfile
from tests.conftest import GuestPool, run
from tests.fakeqmp import Delay, FakeQmp
from tests.kscan_proc import RunProc, flip_bytes, kscan
from tests.test_watch import quiet_offset
from tools.guests import GuestSpec, ensure_kernel

pytestmark = pytest.mark.guest
INTERVAL = 2.0


def test_hostile_peer_among_real_guests(guests: GuestPool, kernel_profile: KernelProfile,
                                        tmp_path: Path) -> None:
    good, victim = guests.boot(GuestSpec("hgood"), GuestSpec("hvictim"))
    try:
        db = str(tmp_path / "kscan.db")
        assert kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", db
                     ).returncode == 0
        base = kscan("baseline", "--qmp", str(good.qmp), "--db", db)
        assert base.returncode == 0, base.stderr
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        hostile = [
            FakeQmp(tmp_path / "abc.sock", tmp_path / "abc.ram", name="abc",
                    replies={"query-memdev": [{"id": "ram0", "size": "abc"}]}),
            FakeQmp(tmp_path / "fifo.sock", fifo, name="fifo"),
            FakeQmp(tmp_path / "mute.sock", tmp_path / "mute.ram", name="mute",
                    replies={"query-name": Delay(120, {})}),
        ]
        for h in hostile:
            h.start()
        proc = RunProc(["--qmp", str(good.qmp), "--qmp", str(victim.qmp),
                        "--qmp", str(tmp_path / "*.sock"), "--db", db,
                        "--interval", str(INTERVAL), "--stats-every", "2",
                        "--forensics-dir", str(tmp_path / "forensics")],
                       tmp_path / "run.stderr")
        try:
            for name in ("hgood", "hvictim"):
                proc.wait_for(lambda e, n=name: e["event"] == "vm_clean" and e["vm"] == n,
                              240)
            for src in ("abc.sock", "fifo.sock"):
                proc.wait_for(lambda e, s=src: e["event"] == "vm_unreachable"
                              and e["source"].endswith(s), 30)
            # The real guests keep their rhythm: scans in every stats period.
            mark = proc.mark()
            stats = []
            for _ in range(4):
                stats.append(proc.wait_for(lambda e: e["event"] == "stats", 10, mark))
                mark = proc.events.index(stats[-1]) + 1
            # 2 VMs every 2 s over the last three 2 s periods: ~6 scans expected.
            assert sum(s["scans"] for s in stats[1:]) >= 4, stats
            assert all(s["watching"] == 2 for s in stats), stats
            # Of the process's CPU, the scans' own checks: some, never more than all.
            assert sum(s["scan_cpu_percent"] for s in stats[1:]) > 0, stats
            assert all(s["scan_cpu_percent"] <= s["cpu_percent"] + 0.01 for s in stats), stats
            # A tamper on one of them is found within two intervals (+ slow path).
            mark = proc.mark()
            offset = quiet_offset(kernel_profile, ".text", 0x600010)
            t0 = time.monotonic()
            run(flip_bytes(victim.qmp_aux, kernel_profile, ".text", offset, 5))
            ev = proc.wait_for(lambda e: e["event"] == "tamper", 2 * INTERVAL + 5, mark)
            latency = time.monotonic() - t0
            print(f"detection latency with hostile peers: {latency:.2f}s")
            assert ev["vm"] == "hvictim" and ev["mismatches_total"] >= 1
            assert ev["mismatches"][0]["region"] == ".text"
            # SIGKILL mid-stream: the database opens clean and holds what was printed.
            time.sleep(1.0)
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)
            proc.stop()
        finally:
            if proc.proc.poll() is None:
                proc.stop()
            for h in hostile:
                h.stop()
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = {(round(ts, 6), k) for ts, k in con.execute("SELECT ts, event FROM event")}
        printed = [(round(e["ts"], 6), e["event"]) for e in proc.events
                   if e["event"] != "stats"]
        assert ("tamper" in {k for _, k in printed})
        assert [p for p in printed if p not in stored] == []
    finally:
        good.stop()
        victim.stop()

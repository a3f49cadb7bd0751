"""Metrics of `kscan run` over a real guest: one guest (QEMU/TCG, the Debian cloud
kernel) is baselined while clean, watched with `--metrics` under a fake systemd, and
its kernel text is overwritten: the tamper counter of that VM goes to 1 (and READY=1
and the watchdog came as they do for replayed VMs)."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanner.image.kernel_profile import KernelProfile
from tests.conftest import run
from tests.kscan_proc import RunProc, flip_bytes, kscan
from tests.test_ops import Notifications, free_port, scrape, scrape_until, value
from tests.test_watch import quiet_offset
from tools.guests import Guest, GuestSpec, boot, ensure_kernel

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """One guest of this module's own (not the shared pool: it boots four)."""
    (g,) = boot([GuestSpec("opsv")], tmp_path_factory.mktemp("opsguest"), timeout=600)
    try:
        yield g
    finally:
        g.stop()


def test_tamper_on_a_real_guest_counts_in_metrics(guest: Guest, kernel_profile: KernelProfile,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    db = str(tmp_path / "kscan.db")
    assert kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", db).returncode == 0
    base = kscan("baseline", "--qmp", str(guest.qmp_aux), "--db", db)
    assert base.returncode == 0, base.stderr
    port = free_port()
    d = tempfile.mkdtemp(prefix="kscan-sd-", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(f"{d}/notify")
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", f"{d}/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    note = Notifications(sock)
    proc = RunProc(["--qmp", str(guest.qmp), "--db", db, "--interval", "2",
                    "--metrics", f"127.0.0.1:{port}",
                    "--forensics-dir", str(tmp_path / "forensics")], tmp_path / "run.err")
    try:
        note.wait_for("READY=1", 120)
        proc.wait_for(lambda e: e["event"] == "vm_clean" and e["vm"] == "opsv", 120)
        note.wait_for("WATCHDOG=1", 5)
        first, _ = scrape(port)
        assert value(first, "kscan_vm_tamper_total", vm="opsv") == 0
        time.sleep(5)
        second, _ = scrape(port)
        assert (value(second, "kscan_vm_scans_total", vm="opsv")
                > value(first, "kscan_vm_scans_total", vm="opsv"))
        mark = proc.mark()
        run(flip_bytes(guest.qmp_aux, kernel_profile, ".text",
                       quiet_offset(kernel_profile, ".text", 0x600010), 5))
        proc.wait_for(lambda e: e["event"] == "tamper" and e["vm"] == "opsv", 30, mark)
        after = scrape_until(port, lambda s: value(s, "kscan_vm_tamper_total", vm="opsv") > 0)
        assert value(after, "kscan_vm_tamper_total", vm="opsv") == 1
        assert value(after, "kscan_vm_tampered", vm="opsv") == 1
        assert value(after, "kscan_vms", state="watching") == 1
    finally:
        assert proc.stop() == 0
        note.close()
        sock.close()
        shutil.rmtree(d, ignore_errors=True)

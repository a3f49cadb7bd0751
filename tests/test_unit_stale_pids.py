"""Test tooling never signals a stranger: a guest's or daemon's pid saved by an earlier
run may belong to another process by now (pid_max is 32768 on small hosts). A CI run
once lost its `kscan run` to a SIGTERM at a stale pid."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tools.guests import Guest, GuestSpec
from tools.libvirt_host import _pid_alive


def _stranger() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_guest_record_whose_pid_is_now_another_process_does_not_stop_it(
        tmp_path: Path) -> None:
    proc = _stranger()
    try:
        gdir = tmp_path / "g"
        gdir.mkdir()
        (gdir / "cmdline").write_text("\0".join(["qemu-system-x86_64", "-name", "g"]))
        guest = Guest(spec=GuestSpec("g"), dir=gdir, pid=proc.pid)
        assert not guest._is_our_qemu()
        guest.stop(remove=False)
        time.sleep(0.2)
        assert proc.poll() is None, "the stranger was signalled"
        # The same record naming the process as it really runs is stopped.
        cmd = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        (gdir / "cmdline").write_bytes(cmd)
        assert guest.is_running() and guest._is_our_qemu()
        guest.stop(remove=False)
        assert proc.wait(10) is not None
    finally:
        proc.kill()
        proc.wait()


def test_a_daemon_pid_is_alive_only_while_it_is_that_daemon() -> None:
    proc = _stranger()
    try:
        assert _pid_alive(proc.pid)
        assert not _pid_alive(proc.pid, "libvirtd")
        comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        assert _pid_alive(proc.pid, comm)
    finally:
        proc.kill()
        proc.wait()

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


def test_guest_ram_left_by_a_killed_run_is_swept_but_never_one_in_use(tmp_path: Path) -> None:
    """A killed test session leaves its guests' RAM files (hundreds of MB each) in
    /dev/shm. `tools/guests.start` removes those older than STALE_RAM_AGE that no process
    maps or holds open — and nothing else."""
    import mmap
    import os

    from tools.guests import STALE_RAM_AGE, sweep_stale_ram

    def ram(name: str, age: float) -> Path:
        p = tmp_path / name
        p.write_bytes(b"\0" * 8192)
        t = time.time() - age
        os.utime(p, (t, t))
        return p

    stale = ram("kscan-0123abcd-a", 2 * STALE_RAM_AGE)
    fresh = ram("kscan-0123abcd-b", 1 - 2 * STALE_RAM_AGE)  # written a second before `later`
    mapped = ram("kscan-0123abcd-c", 2 * STALE_RAM_AGE)
    held = ram("kscan-0123abcd-d", 2 * STALE_RAM_AGE)
    other = ram("not-ours", 2 * STALE_RAM_AGE)
    named_alike = ram("kscan-scale-fleet", 2 * STALE_RAM_AGE)   # not a guest's RAM name
    (tmp_path / "kscan-0123abcd-dir").mkdir()                   # a directory: never
    # ctime cannot be set back: judge age as if the files were old.
    later = time.time() + 2 * STALE_RAM_AGE
    holder = subprocess.Popen([sys.executable, "-c",
                               f"f = open({str(held)!r}, 'rb'); import time; time.sleep(60)"])
    try:
        with open(mapped, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            deadline = time.monotonic() + 10
            while not any(os.path.realpath(f"/proc/{holder.pid}/fd/{fd}") == str(held)
                          for fd in os.listdir(f"/proc/{holder.pid}/fd")):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            removed = sweep_stale_ram(later, root=tmp_path)
        finally:
            m.close()
    finally:
        holder.kill()
        holder.wait()
    assert removed == [stale] and not stale.exists()
    assert fresh.exists() and mapped.exists() and held.exists() and other.exists()
    assert named_alike.exists() and (tmp_path / "kscan-0123abcd-dir").is_dir()
    # Nothing to do: nothing read, nothing removed.
    assert sweep_stale_ram(time.time(), root=tmp_path) == []

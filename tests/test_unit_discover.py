"""scanner.qemu.discover: QMP sockets from QEMU command lines, --qmp globs and paths, and
finding real (fake-named) QEMU processes in the process table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanner.qemu.discover import QemuProcess, expand_sockets, find_qemu_processes, qmp_socket_of

QEMU = "/usr/bin/qemu-system-x86_64"


@pytest.mark.parametrize(("cmd", "want"), [
    ([QEMU, "-m", "1G", "-qmp", "unix:/run/a.sock,server=on,wait=off"], "/run/a.sock"),
    ([QEMU, "-qmp", "unix:/run/b.sock,server,nowait", "-S"], "/run/b.sock"),
    ([QEMU, "--qmp", "unix:/run/c.sock"], "/run/c.sock"),
    # libvirt: a chardev and a control monitor on it (order of options varies)
    ([QEMU, "-chardev", "socket,id=charmonitor,path=/var/lib/libvirt/qemu/d.monitor,"
      "server=on,wait=off", "-mon", "chardev=charmonitor,id=monitor,mode=control"],
     "/var/lib/libvirt/qemu/d.monitor"),
    ([QEMU, "-mon", "chardev=cm,mode=control,id=m", "-chardev",
      "socket,path=/x/e.sock,id=cm,server=on,wait=off"], "/x/e.sock"),
    # an HMP (readline) monitor is not QMP
    ([QEMU, "-chardev", "socket,id=hmp,path=/x/hmp.sock,server=on,wait=off",
      "-mon", "chardev=hmp,mode=readline"], None),
    ([QEMU, "-chardev", "socket,id=hmp,path=/x/hmp.sock,server=on,wait=off",
      "-mon", "chardev=hmp"], None),
    # a control monitor on a chardev that is not a socket we know
    ([QEMU, "-chardev", "pty,id=p0", "-mon", "chardev=p0,mode=control"], None),
    ([QEMU, "-mon", "chardev=nope,mode=control"], None),
    # no QMP at all, TCP QMP, and -qmp as the very last argument
    ([QEMU, "-m", "1G", "-nographic"], None),
    ([QEMU, "-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"], None),
    ([QEMU, "-m", "1G", "-qmp"], None),
    ([], None),
    # a readline monitor first, then the control one: the control one wins
    ([QEMU, "-chardev", "socket,id=h,path=/x/h.sock,server=on",
      "-chardev", "socket,id=q,path=/x/q.sock,server=on",
      "-mon", "chardev=h,mode=readline", "-mon", "chardev=q,mode=control"], "/x/q.sock"),
])
def test_qmp_socket_of(cmd: list[str], want: str | None) -> None:
    assert qmp_socket_of(cmd) == want


def test_qmp_first_unix_socket_wins_over_tcp() -> None:
    cmd = [QEMU, "-qmp", "tcp:127.0.0.1:4444,server=on", "-qmp", "unix:/u.sock,server=on"]
    assert qmp_socket_of(cmd) == "/u.sock"


def test_qmp_socket_path_with_escaped_comma() -> None:
    assert qmp_socket_of([QEMU, "-qmp", "unix:/run/a,,b.sock,server=on,wait=off"]) \
        == "/run/a,b.sock"


def test_expand_sockets_glob_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    for vm in ("vm1", "vm2", "vm3"):
        (tmp_path / vm).mkdir()
        (tmp_path / vm / "qmp.sock").touch()
    (tmp_path / "vm3" / "other.sock").touch()
    (tmp_path / "single.sock").touch()
    pattern = str(tmp_path / "*" / "qmp.sock")
    missing = str(tmp_path / "later" / "qmp.sock")
    got = expand_sockets([pattern, missing, str(tmp_path / "single.sock")])
    # A literal path that does not exist yet is a source all the same (kscan run reports
    # it unreachable until it appears); a glob names what matches now.
    assert got == {str(tmp_path / v / "qmp.sock") for v in ("vm1", "vm2", "vm3")} | {
        str(tmp_path / "single.sock"), missing}
    # The glob is evaluated again on every call and sees new VMs too.
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "qmp.sock").touch()
    (tmp_path / "vm4").mkdir()
    (tmp_path / "vm4" / "qmp.sock").touch()
    got2 = expand_sockets([pattern, missing])
    assert got2 == {str(tmp_path / v / "qmp.sock") for v in ("vm1", "vm2", "vm3", "vm4",
                                                              "later")}
    # Relative specs come back absolute.
    monkeypatch.chdir(tmp_path)
    assert expand_sockets(["vm1/qmp.sock", "vm[12]/qmp.sock"]) == {
        str(tmp_path / "vm1" / "qmp.sock"), str(tmp_path / "vm2" / "qmp.sock")}
    assert expand_sockets([]) == set()
    assert expand_sockets([str(tmp_path / "nomatch*")]) == set()


def test_a_last_component_glob_is_listed_again_only_when_its_directory_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--replay /fleet/vm*` over hundreds of VMs every 2 s: the directory is listed
    again only when its mtime says an entry came, went or was renamed — and never
    trusted while that mtime is recent (a coarse clock could stamp two changes alike)."""
    import glob as glob_mod
    import time

    import scanner.qemu.discover as discover

    for i in range(3):
        (tmp_path / f"vm{i}").mkdir()
    calls: list[str] = []
    real = glob_mod.glob
    monkeypatch.setattr(discover.glob, "glob", lambda spec: calls.append(spec) or real(spec))
    spec = str(tmp_path / "vm*")
    old = time.time() - 60
    os.utime(tmp_path, (old, old))
    want = {str(tmp_path / f"vm{i}") for i in range(3)}
    assert expand_sockets([spec]) == want and len(calls) == 1
    assert expand_sockets([spec]) == want and len(calls) == 1   # unchanged: not listed
    (tmp_path / "vm3").mkdir()                                    # mtime now: listed,
    assert expand_sockets([spec]) == want | {str(tmp_path / "vm3")} and len(calls) == 2
    assert expand_sockets([spec]) == want | {str(tmp_path / "vm3")} and len(calls) == 3
    os.utime(tmp_path, (old, old + 1))                            # and cached once settled
    (tmp_path / "vm3").rename(tmp_path / "gone")
    os.utime(tmp_path, (old, old + 2))                            # a change in the past
    assert expand_sockets([spec]) == want and len(calls) == 4
    assert expand_sockets([spec]) == want and len(calls) == 4
    # A wildcard in a directory component: always listed (a change below it does not
    # touch the top directory's mtime).
    deep = str(tmp_path / "*" / "qmp.sock")
    expand_sockets([deep])
    expand_sockets([deep])
    assert calls.count(deep) == 2
    # Callers pass their own specs (`kscan run` expands --qmp, often empty, then
    # --replay): one call must not forget the other's listing.
    assert expand_sockets([]) == set()
    assert expand_sockets([spec]) == want and calls.count(spec) == 4
    # Bounded: specs beyond _LISTINGS_MAX (reloads) start the memory afresh.
    for i in range(discover._LISTINGS_MAX + 1):
        expand_sockets([str(tmp_path / f"none{i}*")])
    assert len(discover._listings) <= discover._LISTINGS_MAX


@pytest.fixture
def fake_qemus(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], ...]]:
    """Two processes whose executable is a copy of Python named qemu-system-x86_64-fake
    (Python ignores the QEMU options after -c), one with file-backed RAM, one without; one
    process with an unrelated name but QEMU-like arguments; and an impostor: argv[0] a
    qemu-system-x86_64 *symlink* to Python, so /proc/PID/exe is Python."""
    real = os.path.realpath(sys.executable)
    link = tmp_path / "qemu-system-x86_64-fake"
    shutil.copy2(real, link)
    other = tmp_path / "not-qemu"
    shutil.copy2(real, other)
    impostor = tmp_path / "qemu-system-x86_64"
    impostor.symlink_to(real)
    sleep = "import time; time.sleep(30)"
    procs = (
        subprocess.Popen([str(link), "-c", sleep, "-qmp", "unix:/x/file.sock,server=on",
                          "-object", "memory-backend-file,id=ram0,size=1G,mem-path=/dev/shm/x,"
                          "share=on", "-machine", "q35,memory-backend=ram0"]),
        subprocess.Popen([str(link), "-c", sleep, "-chardev",
                          "socket,id=charmonitor,path=/x/lv.sock,server=on,wait=off",
                          "-mon", "chardev=charmonitor,id=monitor,mode=control",
                          "-object", "memory-backend-ram,id=ram0,size=1G"]),
        subprocess.Popen([str(other), "-c", sleep, "-qmp", "unix:/x/other.sock,server=on",
                          "-object", "memory-backend-file,id=r,mem-path=/dev/shm/y"]),
        subprocess.Popen([str(impostor), "-c", sleep, "-qmp", "unix:/x/evil.sock,server=on",
                          "-object", "memory-backend-file,id=r,mem-path=/dev/shm/z"]),
    )
    try:
        # wait until their command lines are visible
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if all(Path(f"/proc/{p.pid}/cmdline").read_bytes().count(b"\0") > 3
                       for p in procs):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def test_find_qemu_processes(fake_qemus: tuple[subprocess.Popen[bytes], ...]) -> None:
    file_proc, ram_proc, other_proc, impostor = fake_qemus
    found = {p.pid: p for p in find_qemu_processes()}
    uid = os.getuid()
    assert found[file_proc.pid] == QemuProcess(file_proc.pid, "/x/file.sock", True, uid)
    assert found[ram_proc.pid] == QemuProcess(ram_proc.pid, "/x/lv.sock", False, uid)
    assert other_proc.pid not in found
    assert impostor.pid not in found  # argv[0] says QEMU, /proc/PID/exe says Python
    assert os.getpid() not in found
    # Only names asked for.
    assert not {file_proc.pid, ram_proc.pid} & {p.pid for p in find_qemu_processes(["qemu-kvm"])}
    found_other = {p.pid for p in find_qemu_processes(["not-qemu"])}
    assert other_proc.pid in found_other and file_proc.pid not in found_other


def test_find_qemu_processes_gone_after_kill(tmp_path: Path) -> None:
    link = tmp_path / "qemu-system-x86_64-gone"
    shutil.copy2(os.path.realpath(sys.executable), link)
    p = subprocess.Popen([str(link), "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 5
        while p.pid not in {q.pid for q in find_qemu_processes()}:
            assert time.monotonic() < deadline, "fake QEMU process never seen"
            time.sleep(0.02)
        assert next(q for q in find_qemu_processes() if q.pid == p.pid) == \
            QemuProcess(p.pid, None, False, os.getuid())
    finally:
        p.kill()
        p.wait()
    assert p.pid not in {q.pid for q in find_qemu_processes()}


class _Uids:
    def __init__(self, real: int, effective: int) -> None:
        self.real, self.effective = real, effective


class _Proc:
    def __init__(self, pid: int, exe: str, uid: int, euid: int | None = None) -> None:
        self.info = {"pid": pid, "name": "qemu-system-x86_64", "exe": exe,
                     "uids": _Uids(uid, uid if euid is None else euid),
                     "cmdline": ["qemu-system-x86_64", "-qmp", f"unix:/s/{pid}.sock",
                                 "-object", "memory-backend-file,id=r,mem-path=/m"]}


def test_discovery_trusts_only_root_or_named_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local user's QEMU (or a process pretending to be one) is not discovered unless
    its user is named with --discover-user; a setuid switch does not get one in."""
    procs = [_Proc(1, "/usr/bin/qemu-system-x86_64", 0),
             _Proc(2, "/usr/bin/qemu-system-x86_64", 1000),
             _Proc(3, "/usr/bin/qemu-system-x86_64", 1001),
             _Proc(4, "/usr/bin/qemu-system-x86_64", 1000, euid=0),
             _Proc(5, "/home/eve/qemu-system-x86_64 (deleted)", 0),
             _Proc(6, "/usr/bin/python3", 0)]
    monkeypatch.setattr("scanner.qemu.discover.psutil.process_iter", lambda attrs: procs)
    assert [(p.pid, p.uid) for p in find_qemu_processes()] == [(1, 0), (5, 0)]
    assert [(p.pid, p.uid) for p in find_qemu_processes(uids=[1000])] == [
        (1, 0), (2, 1000), (4, 1000), (5, 0)]

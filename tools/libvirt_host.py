"""A libvirt host for tests, the perf runs and trying kscan out: libvirtd without systemd.

Sets up what a Debian 12 container needs to run libvirt's QEMU driver, starts the two
daemons, and stops exactly the processes it started (by PID) at the end:

* Debian's `libvirt-daemon`, `libvirt-daemon-driver-qemu`, `libvirt-clients` (and
  `libvirt-dev`, `pkg-config`, `gcc` for the Python binding), installed when missing;
* a `libvirt-qemu` user and group (the packages expect them; without systemd-sysusers
  nobody creates them);
* `/etc/libvirt/qemu.conf`: QEMU runs as root with `security_driver = "none"` (no
  AppArmor/SELinux, no dynamic ownership in a container); the original is kept as
  `qemu.conf.kscan-orig` and put back by `down`;
* hugetlbfs mounted at /dev/hugepages and `vm.nr_hugepages` raised, **before** libvirtd
  starts (it looks for hugetlbfs mounts once, at start-up);
* `virtlogd -d` and `libvirtd -d`; their PIDs are kept in the state directory.

Test domains are TCG (`type='qemu'`): KVM does not run guests on these machines. They
boot the same kernel and busybox initramfs as `tools.guests` (`ensure_kernel`,
`ensure_initramfs`) with RAM of one of four kinds (`RAM_KINDS`).

    python -m tools.libvirt_host up [--hugepages 512]     # packages, config, daemons
    python -m tools.libvirt_host boot NAME --ram KIND     # a transient TCG domain
    python -m tools.libvirt_host down                     # domains, daemons, config
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.sax.saxutils
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.guests import READY_LINE, ensure_initramfs, ensure_kernel

#: Host packages by the file that proves each is installed.
PACKAGES = {
    "/usr/sbin/libvirtd": "libvirt-daemon",
    "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so":
        "libvirt-daemon-driver-qemu",
    "/usr/bin/virsh": "libvirt-clients",
    "/usr/bin/qemu-system-x86_64": "qemu-system-x86",
    "/usr/include/libvirt/libvirt.h": "libvirt-dev",
    "/usr/bin/pkg-config": "pkg-config",
    "/usr/bin/gcc": "gcc",
}
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_TEXT = """\
# Written by kscan's tools/libvirt_host.py for a test host without systemd.
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
"""
HUGETLBFS = Path("/dev/hugepages")
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
URI = "qemu:///system"
STATE = Path(os.environ.get("KSCAN_LIBVIRT_STATE", "/run/kscan-libvirt"))
#: Domains this tool boots are named with this prefix (and only those are destroyed).
PREFIX = "kscan-"

#: The four ways a domain's RAM can live, by `<memoryBacking>`.
RAM_KINDS = {
    "file": "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>",
    "hugepage": "<memoryBacking><hugepages/><access mode='shared'/></memoryBacking>",
    "memfd": "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>",
    "anonymous": "",  # libvirt's default: anonymous private memory
}


class HostError(RuntimeError):
    """The libvirt host could not be set up; the message says what failed."""


def _run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def ensure_packages() -> None:
    missing = sorted({pkg for probe, pkg in PACKAGES.items() if not Path(probe).exists()})
    if not missing:
        return
    if os.geteuid() != 0:
        raise HostError(f"need root to apt-get install {' '.join(missing)}")
    print(f"[libvirt] installing {' '.join(missing)}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def ensure_user() -> None:
    if subprocess.run(["getent", "group", "libvirt-qemu"], capture_output=True).returncode:
        _run(["groupadd", "--system", "libvirt-qemu"])
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode:
        _run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
              "-g", "libvirt-qemu", "libvirt-qemu"])


def _pid_alive(pid: int, name: str | None = None) -> bool:
    """Whether `pid` runs (not a zombie) — and, with `name`, is still that program: a
    saved pid may belong to another process by now, which must not be signalled."""
    if name is not None:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != name[:15]:
                return False
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "(Z)" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:4] \
            and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _pid_of(name: str) -> int | None:
    """The PID of a daemon from its pid file, if it runs."""
    for path in (Path(f"/run/{name}.pid"), Path(f"/run/libvirt/{name}.pid")):
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(path.read_text().strip())
            if _pid_alive(pid):
                return pid
    return None


@dataclass
class Host:
    """What `up` did, so `down` undoes exactly that."""

    started: dict[str, int] = field(default_factory=dict)  # daemon → PID we started
    hugepages_before: int | None = None
    mounted_hugetlbfs: bool = False
    conf_written: bool = False

    def save(self) -> None:
        STATE.mkdir(parents=True, exist_ok=True)
        lines = [f"{k}={v}" for k, v in self.started.items()]
        if self.hugepages_before is not None:
            lines.append(f"hugepages_before={self.hugepages_before}")
        lines.append(f"mounted_hugetlbfs={int(self.mounted_hugetlbfs)}")
        lines.append(f"conf_written={int(self.conf_written)}")
        (STATE / "host").write_text("\n".join(lines) + "\n")

    @classmethod
    def load(cls) -> Host:
        h = cls()
        with contextlib.suppress(FileNotFoundError):
            for line in (STATE / "host").read_text().splitlines():
                k, _, v = line.partition("=")
                if k in ("virtlogd", "libvirtd"):
                    h.started[k] = int(v)
                elif k == "hugepages_before":
                    h.hugepages_before = int(v)
                elif k == "mounted_hugetlbfs":
                    h.mounted_hugetlbfs = v == "1"
                elif k == "conf_written":
                    h.conf_written = v == "1"
        return h


def up(hugepages_mb: int = 0, timeout: float = 30.0) -> Host:
    """Install, configure and start libvirt (what is already there is reused)."""
    ensure_packages()
    ensure_user()
    host = Host.load()
    if not host.conf_written and QEMU_CONF.exists() and \
            QEMU_CONF.read_text() != QEMU_CONF_TEXT:
        shutil.copy2(QEMU_CONF, QEMU_CONF.with_name("qemu.conf.kscan-orig"))
    if not QEMU_CONF.exists() or QEMU_CONF.read_text() != QEMU_CONF_TEXT:
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        QEMU_CONF.write_text(QEMU_CONF_TEXT)
        host.conf_written = True
    if hugepages_mb:
        if not any(line.split()[2] == "hugetlbfs"
                   for line in Path("/proc/mounts").read_text().splitlines()):
            HUGETLBFS.mkdir(parents=True, exist_ok=True)
            _run(["mount", "-t", "hugetlbfs", "hugetlbfs", str(HUGETLBFS)])
            host.mounted_hugetlbfs = True
        want = hugepages_mb // 2
        have = int(NR_HUGEPAGES.read_text())
        free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
                   .read_text())
        if free < want:
            if host.hugepages_before is None:
                host.hugepages_before = have
            NR_HUGEPAGES.write_text(str(have + want - free))
    host.save()
    for d in ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu", "/run/libvirt"):
        Path(d).mkdir(parents=True, exist_ok=True)
    for daemon in ("virtlogd", "libvirtd"):
        if _pid_of(daemon) is None:
            _run([f"/usr/sbin/{daemon}", "-d"])
            deadline = time.monotonic() + timeout
            while (pid := _pid_of(daemon)) is None:
                if time.monotonic() > deadline:
                    raise HostError(f"{daemon} -d did not write its pid file in {timeout:g}s")
                time.sleep(0.1)
            host.started[daemon] = pid
    host.save()
    # libvirtd answers once its socket is up.
    deadline = time.monotonic() + timeout
    while subprocess.run(["virsh", "-c", URI, "version"], capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise HostError(f"libvirtd does not answer on {URI}")
        time.sleep(0.2)
    return host


def domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", URI, "list", "--name"], capture_output=True,
                         text=True).stdout
    return [n for n in out.split() if n.startswith(PREFIX)]


def destroy(name: str) -> None:
    subprocess.run(["virsh", "-c", URI, "destroy", name], capture_output=True)


def down() -> None:
    """Destroy our domains, stop the daemons we started (by PID), undo the config."""
    host = Host.load()
    if _pid_of("libvirtd") is not None:
        for name in domains():
            destroy(name)
    for daemon in ("libvirtd", "virtlogd"):
        pid = host.started.get(daemon)
        if pid and _pid_alive(pid, daemon):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _pid_alive(pid, daemon) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid, daemon):
                os.kill(pid, signal.SIGKILL)
    if host.hugepages_before is not None:
        with contextlib.suppress(OSError):
            NR_HUGEPAGES.write_text(str(host.hugepages_before))
    if host.mounted_hugetlbfs:
        subprocess.run(["umount", str(HUGETLBFS)], capture_output=True)
    orig = QEMU_CONF.with_name("qemu.conf.kscan-orig")
    if host.conf_written:
        if orig.exists():
            orig.replace(QEMU_CONF)
        else:
            QEMU_CONF.unlink(missing_ok=True)
    shutil.rmtree(STATE, ignore_errors=True)


# --------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class DomainSpec:
    name: str
    ram: str = "anonymous"  # a key of RAM_KINDS
    mem_mb: int = 512
    vcpus: int = 1


def domain_xml(spec: DomainSpec, serial: Path) -> str:
    """A transient TCG domain booting the test kernel and initramfs."""
    if spec.ram not in RAM_KINDS:
        raise HostError(f"unknown RAM kind {spec.ram!r}: one of {', '.join(RAM_KINDS)}")
    kernel, initrd = ensure_kernel().vmlinuz, ensure_initramfs()
    q = xml.sax.saxutils.escape
    return f"""<domain type='qemu'>
  <name>{q(spec.name)}</name>
  <memory unit='MiB'>{spec.mem_mb}</memory>
  <vcpu>{spec.vcpus}</vcpu>
  {RAM_KINDS[spec.ram]}
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{q(str(kernel))}</kernel>
    <initrd>{q(str(initrd))}</initrd>
    <cmdline>console=ttyS0 panic=-1 loglevel=4</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{q(str(serial))}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def serial_path(name: str) -> Path:
    return STATE / "serial" / f"{name}.log"


def boot(spec: DomainSpec) -> Path:
    """Create (start) a transient domain; returns its serial log. Does not wait."""
    serial = serial_path(spec.name)
    serial.parent.mkdir(parents=True, exist_ok=True)
    serial.unlink(missing_ok=True)
    xml_path = STATE / f"{spec.name}.xml"
    xml_path.write_text(domain_xml(spec, serial))
    destroy(spec.name)
    got = subprocess.run(["virsh", "-c", URI, "create", str(xml_path)], capture_output=True,
                         text=True)
    if got.returncode:
        raise HostError(f"virsh create {spec.name}: {got.stderr.strip()}")
    return serial


def wait_ready(names: Sequence[str], timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        for n in list(pending):
            with contextlib.suppress(FileNotFoundError):
                if READY_LINE in serial_path(n).read_text(errors="replace"):
                    pending.remove(n)
        if pending and time.monotonic() > deadline:
            raise HostError(f"domains not ready after {timeout:.0f}s: {', '.join(pending)}")
        if pending:
            time.sleep(0.25)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.libvirt_host", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="install, configure, start virtlogd and libvirtd")
    p.add_argument("--hugepages", type=int, default=0, metavar="MIB",
                   help="mount hugetlbfs and reserve this many MiB of 2 MiB pages")
    p = sub.add_parser("boot", help="start a transient TCG test domain and wait for it")
    p.add_argument("name")
    p.add_argument("--ram", choices=sorted(RAM_KINDS), default="anonymous")
    p.add_argument("--mem", type=int, default=512)
    sub.add_parser("down", help="destroy test domains, stop the daemons started by up")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            h = up(args.hugepages)
            print(f"libvirt up ({URI}); started {h.started or 'nothing'}")
        elif args.cmd == "boot":
            name = args.name if args.name.startswith(PREFIX) else PREFIX + args.name
            boot(DomainSpec(name, args.ram, args.mem))
            wait_ready([name])
            print(name)
        else:
            down()
    except (HostError, subprocess.CalledProcessError) as err:
        print(f"tools.libvirt_host: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

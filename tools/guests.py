"""Real test guests: install QEMU, fetch the Debian cloud kernel, boot tiny busybox VMs.

Tests, the demo and `perf/` all boot their guests through this module, so there is
one place that knows how a kscan test guest looks:

* QEMU under TCG (KVM does not run nested on these hosts; kscan does not care),
* RAM in a `memory-backend-file` on /dev/shm with share=on (what kscan maps); a run
  killed before it could clean up leaves those files behind, so `start` first removes
  the ones no process maps or holds open after STALE_RAM_AGE (`sweep_stale_ram`),
* two QMP unix sockets (QEMU serves one client per monitor: `qmp` for kscan,
  `qmp_aux` for tools and test oracles), the serial console in a log file,
* a Debian cloud kernel (packages pinned in `KERNELS`: "6.1", the default, and Debian's
  "6.12" backport) and a busybox initramfs whose init prints `READY_LINE` once
  userspace runs.

Command line (see `python -m tools.guests --help`):

    python -m tools.guests setup                  # install QEMU/busybox, fetch kernels
    python -m tools.guests up --count 2           # boot two guests, wait until ready
    python -m tools.guests up --kernel 6.12 --smp 4 --prefix k612-
    python -m tools.guests status
    python -m tools.guests down                   # stop them, remove their files

Downloads are cached under $XDG_CACHE_HOME/kscan (default ~/.cache/kscan) so repeat
runs are quick.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The Debian packages of the guest kernels, by short name. Pinned here and nowhere else.
#: 6.1 is Debian 12's own kernel (LZ4 payload); 6.12 is the bookworm backport (zstd
#: payload, runtime constants, 13-byte early exception stubs).
KERNELS = {
    "6.1": "linux-image-6.1.0-56-cloud-amd64",
    "6.12": "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
}
DEFAULT_KERNEL = "6.1"
#: The default kernel's package (kept for callers that predate `KERNELS`).
KERNEL_PACKAGE = KERNELS[DEFAULT_KERNEL]
#: Used only if a pinned package has left the archive (Debian drops old ABIs): the
#: meta-package of the same series, resolved to the kernel package it depends on.
KERNEL_FALLBACK_METAS = {
    "6.1": "linux-image-cloud-amd64",
    "6.12": "linux-image-6.12-cloud-amd64",
}
KERNEL_FALLBACK_META = KERNEL_FALLBACK_METAS[DEFAULT_KERNEL]
#: Host packages the guests need, by the command that proves each is installed.
HOST_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "/bin/busybox": "busybox-static",
    "cpio": "cpio",
    # For the tests only: the reference tools kernel-image tests compare against.
    "readelf": "binutils",
    "lzop": "lzop",
    "/usr/sbin/bpftool": "bpftool",  # the BTF reader's oracle
}
READY_LINE = "KSCAN-GUEST-READY"
QEMU = "qemu-system-x86_64"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "kscan"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_run_dir() -> Path:
    return Path(os.environ.get("KSCAN_GUEST_DIR") or f"/tmp/kscan-guests-{os.getuid()}")


class GuestError(RuntimeError):
    """A guest could not be prepared or booted; the message says what to do."""


# --------------------------------------------------------------------------- host setup


def _missing_host_packages() -> list[str]:
    missing = []
    for probe, package in HOST_PACKAGES.items():
        found = Path(probe).exists() if probe.startswith("/") else shutil.which(probe)
        if not found:
            missing.append(package)
    return missing


def _privileged(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return cmd
    if shutil.which("sudo"):
        return ["sudo", "-n", *cmd]
    raise GuestError(f"need root to run {' '.join(cmd)}: run it yourself or as root")


def ensure_host_packages(log: bool = True) -> None:
    """apt-get install whatever of HOST_PACKAGES is missing."""
    missing = _missing_host_packages()
    if not missing:
        return
    if log:
        print(f"[guests] installing {' '.join(missing)}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(_privileged(["apt-get", "update", "-qq"]), check=True, env=env)
    subprocess.run(
        _privileged(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]),
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    still = _missing_host_packages()
    if still:
        raise GuestError(f"apt-get install did not provide {' '.join(still)}")


@dataclass(frozen=True)
class KernelFiles:
    """The guest kernel as unpacked from its Debian package."""

    package: str
    vmlinuz: Path
    config: Path | None

    @property
    def release(self) -> str:
        return self.vmlinuz.name.removeprefix("vmlinuz-")


def _resolve_fallback_package(meta: str = KERNEL_FALLBACK_META) -> str:
    out = subprocess.run(
        ["apt-cache", "depends", meta], capture_output=True, text=True, check=True,
    ).stdout
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if name.startswith("linux-image-") and name.endswith(
                ("-cloud-amd64", "-cloud-amd64-unsigned")):
            return name
    raise GuestError(f"cannot resolve {meta} to a kernel package")


def kernel_package(kernel: str) -> str:
    """The pinned package of a kernel short name ("6.1", "6.12") or a package name."""
    if kernel in KERNELS:
        return KERNELS[kernel]
    if kernel.startswith("linux-image-"):
        return kernel
    raise GuestError(f"unknown kernel {kernel!r}: one of {', '.join(KERNELS)} "
                     "or a linux-image-* package name")


def ensure_kernel(package: str = KERNEL_PACKAGE) -> KernelFiles:
    """Download (once) and unpack a Debian cloud kernel package; return its files.
    `package` may also be a short name from `KERNELS` ("6.1", "6.12")."""
    package = kernel_package(package)
    root = cache_dir() / "kernel"
    root.mkdir(parents=True, exist_ok=True)
    unpacked = root / package
    vmlinuz = None
    if unpacked.exists():
        vmlinuz = next(iter(sorted((unpacked / "boot").glob("vmlinuz-*"))), None)
    if vmlinuz is None:
        debs = sorted(root.glob(f"{package}_*.deb"))
        if not debs:
            got = subprocess.run(
                ["apt-get", "download", package], cwd=root, capture_output=True, text=True
            )
            if got.returncode != 0:
                subprocess.run(_privileged(["apt-get", "update", "-qq"]), check=False)
                got = subprocess.run(
                    ["apt-get", "download", package], cwd=root, capture_output=True, text=True
                )
            if got.returncode != 0:
                short = next((k for k, p in KERNELS.items() if p == package), None)
                if short is not None:
                    fallback = _resolve_fallback_package(KERNEL_FALLBACK_METAS[short])
                    print(f"[guests] {package} is no longer in the archive; using {fallback}",
                          file=sys.stderr)
                    return ensure_kernel(fallback)
                raise GuestError(f"apt-get download {package} failed: {got.stderr.strip()}")
            debs = sorted(root.glob(f"{package}_*.deb"))
        tmp = root / f".{package}.unpack"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
        # Keep only /boot: the modules tree is large and the guests load no modules.
        keep = tmp / "boot"
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir()
        shutil.move(str(keep), str(unpacked / "boot"))
        shutil.rmtree(tmp, ignore_errors=True)
        vmlinuz = next(iter(sorted((unpacked / "boot").glob("vmlinuz-*"))))
    config = next(iter(sorted((unpacked / "boot").glob("config-*"))), None)
    return KernelFiles(package=package, vmlinuz=vmlinuz, config=config)


# --------------------------------------------------------------------------- initramfs

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Opt-in test oracle (kernel command line `kscan.kallsyms=N`): every Nth line of
# /proc/kallsyms on the serial console, between KALLSYMS_BEGIN/END.
for a in $(cat /proc/cmdline); do case $a in kscan.kallsyms=*)
  echo 0 > /proc/sys/kernel/kptr_restrict; echo KALLSYMS_BEGIN
  awk -v n=${{a#*=}} 'NR % n == 1' /proc/kallsyms; echo KALLSYMS_END;; esac; done
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
# The test command channel on the second serial port (host: Guest.run): one shell
# command per line, answered by its output and a KSCAN-RC line with its exit status.
if [ -c /dev/ttyS1 ]; then
  stty -F /dev/ttyS1 raw -echo 2>/dev/null
  ( while read -r line; do sh -c "$line" > /tmp/kscan-out 2>&1; rc=$?
      cat /tmp/kscan-out; echo "KSCAN-RC $rc"; done ) < /dev/ttyS1 > /dev/ttyS1 2>&1 &
fi
echo {READY_LINE} $(cat /proc/sys/kernel/osrelease)
# Keep a little userspace activity going, like a real guest would.
while true; do sleep 5; done
"""


def _cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """Write a newc cpio archive (the format the kernel unpacks as initramfs)."""
    out = bytearray()
    ino = 1

    def put(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        raw = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        )
        ino += 1
        out.extend(hdr.encode() + raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for name, mode, data in entries:
        put(name, mode, data)
    put("TRAILER!!!", 0, b"")
    return bytes(out)


def ensure_initramfs() -> Path:
    """Build (once per busybox/init version) the busybox initramfs."""
    busybox = Path("/bin/busybox").read_bytes()
    tag = hashlib.sha256(busybox + INIT_SCRIPT.encode()).hexdigest()[:12]
    path = cache_dir() / f"initramfs-{tag}.cpio"
    if path.exists():
        return path
    d = stat.S_IFDIR | 0o755
    entries = [
        ("bin", d, b""), ("dev", d, b""), ("proc", d, b""), ("sys", d, b""),
        ("tmp", d, b""), ("root", d, b""),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox),
        ("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()),
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(_cpio_newc(entries))
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- guests


@dataclass(frozen=True)
class GuestSpec:
    """How to boot one guest."""

    name: str
    mem_mb: int = 512
    smp: int = 1
    cpu: str = "qemu64"
    append: str = ""
    extra: tuple[str, ...] = ()  # more QEMU arguments, e.g. ("-S",) to start paused
    kernel: str = DEFAULT_KERNEL  # a key of KERNELS (or a linux-image-* package name)


@dataclass
class Guest:
    """One booted (or booting) guest and its files."""

    spec: GuestSpec
    dir: Path
    pid: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def qmp_aux(self) -> Path:
        """A second QMP socket: QEMU serves one client per monitor, so tools and test
        oracles use this one while `kscan run` holds `qmp`."""
        return self.dir / "qmp-aux.sock"

    @property
    def serial(self) -> Path:
        return self.dir / "serial.log"

    @property
    def cmd_socket(self) -> Path:
        """The guest's second serial port: a shell command channel for tests."""
        return self.dir / "cmd.sock"

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run a shell command inside the guest (as root): (exit status, output)."""
        import socket

        if "\n" in command:
            raise ValueError("one command line at a time")
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.cmd_socket))
            s.sendall(command.encode() + b"\n")
            buf = b""
            while True:
                at = buf.rfind(b"KSCAN-RC ")
                if at >= 0 and buf.endswith(b"\n") and buf.find(b"\n", at) == len(buf) - 1:
                    rc = int(buf[at + 9:].strip().split()[0])
                    return rc, buf[:at].decode(errors="replace")
                if time.monotonic() > deadline:
                    raise GuestError(f"{self.name}: no answer to {command!r} in {timeout:g} s")
                chunk = s.recv(65536)
                if not chunk:
                    raise GuestError(f"{self.name}: command channel closed")
                buf += chunk

    @property
    def mem_path(self) -> Path:
        # Unique per run directory, so two test runs never share a RAM file.
        tag = hashlib.sha1(str(self.dir.parent.resolve()).encode()).hexdigest()[:8]
        return Path("/dev/shm") / f"kscan-{tag}-{self.name}"

    def is_running(self) -> bool:
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # A zombie child still "exists"; reap it if it is ours.
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done == self.pid:
                return False
        return True

    def _is_our_qemu(self) -> bool:
        """Whether `pid` is still the QEMU this directory started: a pid saved by an
        earlier run may belong to another process by now (pid_max is 32768 on small
        hosts), and `stop` must never signal a stranger (a CI run once lost its `kscan
        run` to a SIGTERM meant for a guest long gone)."""
        try:
            want = (self.dir / "cmdline").read_bytes()
        except OSError:
            return True  # started by an older version: nothing to compare with
        try:
            have = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return have.rstrip(b"\0") == want.rstrip(b"\0")

    def ready(self) -> bool:
        try:
            return READY_LINE in self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return False

    def stop(self, remove: bool = True) -> None:
        # Only what still runs this guest's command line is signalled (not checked in
        # `is_running`: between fork and exec a fresh child still shows its parent's).
        if self.is_running() and self._is_our_qemu():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while self.is_running() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.is_running() and self._is_our_qemu():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.mem_path.unlink()
            shutil.rmtree(self.dir, ignore_errors=True)


def qemu_command(spec: GuestSpec, guest: Guest, kernel: KernelFiles, initrd: Path) -> list[str]:
    size = f"{spec.mem_mb}M"
    append = f"console=ttyS0 panic=-1 loglevel=4 {spec.append}".strip()
    return [
        QEMU,
        "-name", spec.name,
        # One TCG thread for all vCPUs: multi-threaded TCG can livelock a guest that
        # patches its own code (the function tracer's text_poke_bp batches) on a loaded
        # host — a vCPU spinning on a stale int3 with interrupts off never answers the
        # patching CPU's IPI (seen here as a soft lockup in smp_call_function_many_cond).
        "-accel", "tcg,thread=single",
        "-machine", "q35,memory-backend=ram0",
        "-object", f"memory-backend-file,id=ram0,size={size},mem-path={guest.mem_path},share=on",
        "-m", size,
        "-smp", str(spec.smp),
        "-cpu", spec.cpu,
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initrd),
        "-append", append,
        "-display", "none",
        "-vga", "none",
        "-nodefaults",
        "-serial", f"file:{guest.serial}",
        "-chardev", f"socket,id=cmd,path={guest.cmd_socket},server=on,wait=off",
        "-serial", "chardev:cmd",
        "-qmp", f"unix:{guest.qmp},server=on,wait=off",
        "-qmp", f"unix:{guest.qmp_aux},server=on,wait=off",
        "-no-reboot",
        *spec.extra,
    ]


#: A guest RAM file this old that no process maps or holds open is left over from a run
#: that was killed (its guests died with it, their files did not).
STALE_RAM_AGE = 600.0
#: `Guest.mem_path`'s names: kscan-<8 hex digits of the run directory>-<guest>.
_RAM_NAME = re.compile(r"kscan-[0-9a-f]{8}-[^/]+")


def _in_use(prefix: str) -> set[str]:
    """Every path starting with `prefix` a process maps or holds open. Processes whose
    maps cannot be read are passed over (a sandbox's init here, even for root): the
    guests a test run starts are its own processes, and readable."""
    used: set[str] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(line.split(None, 5)[5].strip() for line in f
                            if prefix in line)
            fds = f"/proc/{pid}/fd"
            for fd in os.listdir(fds):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{fds}/{fd}")
                    if target.startswith(prefix):
                        used.add(target)
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue  # ended meanwhile, or not ours to read
    return used


def sweep_stale_ram(now: float | None = None, root: Path = Path("/dev/shm")) -> list[Path]:
    """Remove guest RAM files (`kscan-<run>-<guest>`) that runs killed before they could
    clean up left behind: older than STALE_RAM_AGE and neither mapped nor open by any
    process. Each is as large as its guest's RAM. Returns what was removed."""
    now = time.time() if now is None else now
    old = []
    for path in root.glob("kscan-*-*"):
        if not _RAM_NAME.fullmatch(path.name):
            continue
        with contextlib.suppress(OSError):
            st = path.lstat()
            if (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
                    and now - max(st.st_mtime, st.st_ctime) > STALE_RAM_AGE):
                old.append(path)
    if not old:
        return []
    used = _in_use(str(root / "kscan-"))
    removed = []
    for path in old:
        if str(path) not in used:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def start(specs: Sequence[GuestSpec], run_dir: Path | None = None) -> list[Guest]:
    """Start guests without waiting for them (see `wait_ready`)."""
    run_dir = run_dir or default_run_dir()
    sweep_stale_ram()
    ensure_host_packages()
    kernels = {k: ensure_kernel(k) for k in {s.kernel for s in specs}}
    initrd = ensure_initramfs()
    run_dir.mkdir(parents=True, exist_ok=True)
    guests = []
    for spec in specs:
        gdir = run_dir / spec.name
        old = load(gdir)
        if old is not None:
            old.stop()
        gdir.mkdir(parents=True, exist_ok=True)
        guest = Guest(spec=spec, dir=gdir)
        cmd = qemu_command(spec, guest, kernels[spec.kernel], initrd)
        (gdir / "cmdline").write_text("\0".join(cmd))
        with open(gdir / "qemu.log", "wb") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        guest.pid = proc.pid
        (gdir / "pid").write_text(str(proc.pid))
        (gdir / "spec").write_text(
            f"{spec.name}\n{spec.mem_mb}\n{spec.smp}\n{spec.cpu}\n{spec.append}\n"
            f"{spec.kernel}\n"
        )
        guests.append(guest)
    return guests


def wait_ready(guests: Sequence[Guest], timeout: float = 300.0) -> None:
    """Wait until every guest printed its ready line; raise naming the laggards."""
    deadline = time.monotonic() + timeout
    pending = list(guests)
    while pending:
        for g in list(pending):
            if g.ready():
                pending.remove(g)
            elif not g.is_running():
                log = (g.dir / "qemu.log").read_text(errors="replace")[-2000:]
                raise GuestError(f"guest {g.name} exited before it was ready:\n{log}")
        if pending and time.monotonic() > deadline:
            tails = {g.name: g.serial.read_text(errors="replace")[-500:] for g in pending}
            raise GuestError(f"guests not ready after {timeout:.0f}s: {tails}")
        if pending:
            time.sleep(0.25)


def boot(specs: Sequence[GuestSpec], run_dir: Path | None = None,
         timeout: float = 300.0) -> list[Guest]:
    """Start guests and wait until each runs userspace. Stops them all on failure."""
    guests = start(specs, run_dir)
    try:
        wait_ready(guests, timeout)
    except BaseException:
        for g in guests:
            g.stop()
        raise
    return guests


def load(gdir: Path) -> Guest | None:
    """A guest previously started in `gdir` (None if there is none)."""
    try:
        lines = (gdir / "spec").read_text().split("\n")
        pid = int((gdir / "pid").read_text())
    except (OSError, ValueError):  # not a guest directory (or a file beside them)
        return None
    spec = GuestSpec(name=lines[0], mem_mb=int(lines[1]), smp=int(lines[2]), cpu=lines[3],
                     append=lines[4] if len(lines) > 4 else "",
                     kernel=lines[5] if len(lines) > 5 and lines[5] else DEFAULT_KERNEL)
    return Guest(spec=spec, dir=gdir, pid=pid)


def existing(run_dir: Path | None = None) -> list[Guest]:
    run_dir = run_dir or default_run_dir()
    if not run_dir.exists():
        return []
    return [g for d in sorted(run_dir.iterdir()) if (g := load(d)) is not None]


def stop_all(run_dir: Path | None = None) -> int:
    run_dir = run_dir or default_run_dir()
    guests = existing(run_dir)
    for g in guests:
        g.stop()
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    return len(guests)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.guests",
        description="Boot and stop kscan's test guests (QEMU/TCG, busybox, Debian cloud kernel).",
        epilog="examples:\n"
        "  python -m tools.guests setup\n"
        "  python -m tools.guests up --count 2 --prefix demo\n"
        "  python -m tools.guests up --count 1 --mem 4096 --cpu max --prefix big\n"
        "  python -m tools.guests up --count 2 --kernel 6.12 --smp 4 --prefix k612-\n"
        "  python -m tools.guests down\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--dir", type=Path, default=None,
                    help=f"where guests keep sockets and logs (default {default_run_dir()})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    setup = sub.add_parser("setup", help="install QEMU/busybox, fetch the kernels, build "
                           "initramfs")
    setup.add_argument("--kernel", action="append", choices=sorted(KERNELS),
                       help="fetch only this kernel (repeatable; default: all of "
                            f"{', '.join(KERNELS)})")
    up = sub.add_parser("up", help="boot guests and wait until they are ready")
    up.add_argument("--count", type=int, default=1)
    up.add_argument("--prefix", default="guest")
    up.add_argument("--mem", type=int, default=512, help="RAM in MiB (default 512)")
    up.add_argument("--smp", type=int, default=1, help="vCPUs (default 1)")
    up.add_argument("--kernel", default=DEFAULT_KERNEL,
                    help=f"guest kernel: one of {', '.join(KERNELS)} (default "
                         f"{DEFAULT_KERNEL}) or a linux-image-* package")
    up.add_argument("--append", default="", help="extra kernel command-line options")
    up.add_argument("--cpu", default="qemu64", help="QEMU CPU model (max: 5-level paging)")
    up.add_argument("--timeout", type=float, default=300.0)
    sub.add_parser("status", help="list guests and whether they run")
    sub.add_parser("down", help="stop all guests and remove their files")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "setup":
            ensure_host_packages()
            for name in args.kernel or KERNELS:
                k = ensure_kernel(name)
                print(f"kernel {name} {k.vmlinuz}")
            print(f"initramfs {ensure_initramfs()}")
        elif args.cmd == "up":
            kernel_package(args.kernel)  # fail early on an unknown name
            specs = [GuestSpec(name=f"{args.prefix}{i}", mem_mb=args.mem, smp=args.smp,
                               cpu=args.cpu, kernel=args.kernel, append=args.append)
                     for i in range(args.count)]
            for g in boot(specs, args.dir, args.timeout):
                print(f"{g.name} pid={g.pid} qmp={g.qmp} mem={g.mem_path}")
        elif args.cmd == "status":
            for g in existing(args.dir):
                state = "running" if g.is_running() else "stopped"
                ready = "ready" if g.ready() else "booting"
                print(f"{g.name} {state} {ready} kernel={g.spec.kernel} smp={g.spec.smp} "
                      f"qmp={g.qmp}")
        elif args.cmd == "down":
            print(f"stopped {stop_all(args.dir)} guest(s)")
    except (GuestError, subprocess.CalledProcessError) as err:
        print(f"tools.guests: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

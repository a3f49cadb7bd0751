"""kscan's test kernel modules: build them against a test kernel's headers, load them
into a running test guest.

Each module (C sources in tests/modules/, one per technique; `MODULES` says what each
does) reproduces one way a rootkit uses the kernel's own machinery. They are built
out of tree with Debian's `linux-headers-<release>` package of the pinned test kernel
(gcc, make), unsigned: loading one taints the guest kernel `O` and `E`. Built modules are
cached by source hash under ~/.cache/kscan/modules/<release>/.

A test loads one into a guest with one call:

    loaded = load(guest, "kscan_ftrace_hook")      # builds if needed, insmod over the
    loaded.lines                                    # command channel; its dmesg lines

The .ko travels through the guest's command channel (`Guest.run`) in base64 chunks
(busybox has base64 and insmod). Command line:

    python -m tools.testmodules setup              # install headers, gcc, make; build all
    python -m tools.testmodules build [--kernel 6.1] [NAME ...]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.guests import (
    KERNELS,
    Guest,
    GuestError,
    _privileged,
    cache_dir,
    ensure_kernel,
)

SOURCE_DIR = Path(__file__).resolve().parent.parent / "tests" / "modules"
#: Small static guest programs (tests/guestprogs/*.c: `build_program`, `push`).
PROGRAM_DIR = SOURCE_DIR.parent / "guestprogs"
COMMON = ("kscan_testmod.h",)

#: Every test module, with what it does once loaded (the C file's header says more).
MODULES: dict[str, str] = {
    "kscan_benign": "nothing: listed, unsigned (sig_ok 0, taints O and E)",
    "kscan_ftrace_hook": "ftrace IPMODIFY hook on __x64_sys_getdents64 hiding files "
                         "named kscan_hide*",
    "kscan_kprobe": "kprobe (default __x64_sys_sync+0) whose pre_handler is in the module; "
                    "params sym=, off=; counts hits",
    "kscan_hide": "unlinks itself from the module list, then ftrace-hooks "
                  "__x64_sys_newuname (nodename becomes kscan-ghost)",
    "kscan_sct": "points sys_call_table[nr] (default 110, getppid) into the module",
    "kscan_direct": "ftrace direct call (register_ftrace_direct, 6.1 API) on sym= (default "
                    "__x64_sys_sync) to a trampoline in the module; counts hits",
    "kscan_exec_page": "maps an executable page in vmalloc space and unlinks itself "
                       "(vanish=1: fails init, only the page stays)",
}
CHUNK = 3072  # base64 characters per command line


@dataclass(frozen=True)
class Loaded:
    """A module loaded into a guest: insmod's exit status and output, and the guest's
    kernel log lines that name the module (its addresses are printed with %px)."""

    name: str
    rc: int
    output: str
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.rc == 0


def headers_dir(release: str) -> Path:
    return Path("/usr/src") / f"linux-headers-{release}"


def release_of(kernel: str) -> str:
    """The release string of a test kernel short name ("6.1", "6.12")."""
    return ensure_kernel(kernel).release


def ensure_build_deps(kernels: Sequence[str] = tuple(KERNELS)) -> None:
    """apt-get install the headers of the test kernels (and gcc, make) when missing.
    (Debian's 6.12 backport headers depend on its kernel image package: it is installed
    on the host too, though nothing boots it.)"""
    missing = [f"linux-headers-{release_of(k)}" for k in kernels
               if not (headers_dir(release_of(k)) / "Makefile").exists()]
    missing += [tool for tool in ("gcc", "make") if not shutil.which(tool)]
    if not missing:
        return
    print(f"[testmodules] installing {' '.join(missing)}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    got = subprocess.run(_privileged(["apt-get", "install", "-y", "-qq",
                                      "--no-install-recommends", *missing]),
                         env=env, stdout=subprocess.DEVNULL, check=False)
    if got.returncode != 0:
        subprocess.run(_privileged(["apt-get", "update", "-qq"]), env=env, check=True)
        subprocess.run(_privileged(["apt-get", "install", "-y", "-qq",
                                    "--no-install-recommends", *missing]),
                       env=env, stdout=subprocess.DEVNULL, check=True)


def _source_hash(name: str, release: str) -> str:
    h = hashlib.sha256(release.encode())
    for f in (f"{name}.c", *COMMON):
        h.update(f.encode() + b"\0" + (SOURCE_DIR / f).read_bytes())
    return h.hexdigest()[:16]


def build(name: str, kernel: str = "6.1") -> Path:
    """The .ko of test module `name` for test kernel `kernel` (built once per source)."""
    if name not in MODULES:
        raise GuestError(f"unknown test module {name!r}: one of {', '.join(MODULES)}")
    release = release_of(kernel)
    kdir = headers_dir(release)
    if not (kdir / "Makefile").exists():
        raise GuestError(f"no kernel headers at {kdir}: run `python -m tools.testmodules "
                         "setup` (installs linux-headers-" + release + ")")
    out = cache_dir() / "modules" / release / f"{name}-{_source_hash(name, release)}.ko"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="kscan-mod-") as tmp:
        work = Path(tmp)
        for f in (f"{name}.c", *COMMON):
            shutil.copy(SOURCE_DIR / f, work / f)
        (work / "Kbuild").write_text(f"obj-m := {name}.o\n")
        got = subprocess.run(["make", "-C", str(kdir), f"M={work}", "modules"],
                             capture_output=True, text=True, check=False)
        ko = work / f"{name}.ko"
        if got.returncode != 0 or not ko.exists():
            raise GuestError(f"building {name} for {release} failed:\n"
                             f"{(got.stdout + got.stderr)[-3000:]}")
        # Debug info is most of the file; the guest needs none of it.
        subprocess.run(["strip", "--strip-debug", str(ko)], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".tmp")
        shutil.copy(ko, tmp_out)
        tmp_out.replace(out)
    return out


def push(guest: Guest, src: Path, path: str, timeout: float = 120.0) -> None:
    """Copy a host file to `path` in the guest over its command channel."""
    b64 = base64.b64encode(src.read_bytes()).decode()
    rc, out = guest.run(f"rm -f {path}.b64 {path}", timeout)
    for i in range(0, len(b64), CHUNK):
        rc, out = guest.run(f"printf %s '{b64[i:i + CHUNK]}' >> {path}.b64", timeout)
        if rc != 0:
            raise GuestError(f"{guest.name}: sending {src.name} failed: {out}")
    rc, out = guest.run(f"base64 -d {path}.b64 > {path} && wc -c < {path}", timeout)
    if rc != 0 or out.strip() != str(src.stat().st_size):
        raise GuestError(f"{guest.name}: {src.name} arrived damaged ({out.strip()!r} bytes "
                         f"of {src.stat().st_size})")


def build_program(name: str) -> Path:
    """A static, libc-free x86-64 guest program from tests/guestprogs/NAME.c (built once
    per source; the guests have only busybox)."""
    src = PROGRAM_DIR / f"{name}.c"
    if not src.exists():
        raise GuestError(f"no guest program {src}")
    h = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = cache_dir() / "programs" / f"{name}-{h}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    got = subprocess.run(["gcc", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin",
                          "-fno-stack-protector", "-fno-pie", "-no-pie", "-Os", "-s",
                          "-o", str(tmp), str(src)], capture_output=True, text=True,
                         check=False)
    if got.returncode != 0:
        raise GuestError(f"building {name} failed:\n{got.stderr[-3000:]}")
    tmp.replace(out)
    return out


def load(guest: Guest, name: str, params: str = "", timeout: float = 120.0) -> Loaded:
    """Build (if needed) and insmod test module `name` into a running test guest."""
    ko = build(name, guest.spec.kernel)
    path = f"/tmp/{name}.ko"
    push(guest, ko, path, timeout)
    safe = "".join(c for c in params if c.isalnum() or c in "=_ ,.-")
    rc, out = guest.run(f"insmod {path} {safe}".strip(), timeout)
    return Loaded(name, rc, out, dmesg(guest, name))


def dmesg(guest: Guest, name: str) -> tuple[str, ...]:
    """The guest's kernel log lines that start with `name:` (after the timestamp)."""
    _, log = guest.run("dmesg")
    return tuple(line for line in log.splitlines() if f"] {name}: " in line)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.testmodules",
                                 description="Build kscan's test kernel modules.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    setup = sub.add_parser("setup", help="install headers, gcc and make; build every module")
    setup.add_argument("--kernel", action="append", choices=sorted(KERNELS))
    b = sub.add_parser("build", help="build modules (all by default)")
    b.add_argument("--kernel", default="6.1", choices=sorted(KERNELS))
    b.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(MODULES)}")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "setup":
            kernels = args.kernel or list(KERNELS)
            ensure_build_deps(kernels)
            for k in kernels:
                for name in MODULES:
                    print(f"{k} {build(name, k)}")
        else:
            for name in args.names or MODULES:
                print(build(name, args.kernel))
    except (GuestError, subprocess.CalledProcessError) as err:
        print(f"tools.testmodules: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

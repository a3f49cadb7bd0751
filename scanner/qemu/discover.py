"""Finding VMs to watch: QMP socket paths and globs, and running QEMU processes.

`--qmp PATH` may name a socket that does not exist yet (it is watched for) or a glob
(`/run/vms/*/qmp.sock`) evaluated again on every pass, so VMs that appear are picked
up. `--discover` scans the process table for QEMU system emulators and reads their
command lines for a QMP socket (`-qmp unix:PATH,...`, or libvirt's
`-chardev socket,id=X,path=PATH,... -mon chardev=X,mode=control`); processes whose RAM
is not in a `memory-backend-file` are reported once and skipped.

Any local user can start a process and name it `qemu-system-x86_64`, so neither the
process name nor argv[0] is trusted: a process is taken only if its executable
(`/proc/PID/exe`, which the kernel sets and the process cannot fake) is a QEMU system
emulator, and it runs as root or as one of the users named with `--discover-user`.
Attaching then requires the QMP socket and the memory files to be owned by that same
user (`QemuProcess.uid`, enforced in `scanner.vm.live`).
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil

__all__ = ["QemuProcess", "expand_sockets", "find_qemu_processes", "qmp_socket_of"]

_GLOB_CHARS = set("*?[")
#: A directory whose mtime is at least this old when it is listed is taken as listed
#: completely (file systems stamp mtimes with a clock that may lag by a tick).
_SETTLED_NS = 1_000_000_000
#: Per glob whose wildcards are all in its last component: the directory's identity
#: and mtime at its last listing, and the matches then. Not pruned per call (each
#: caller passes its own specs: `--qmp`'s and `--replay`'s), only bounded: specs come
#: from the configuration, so more than this means reloads, and it starts afresh.
_listings: dict[str, tuple[tuple[int, int, int], list[str]]] = {}
_LISTINGS_MAX = 64


def expand_sockets(specs: Sequence[str]) -> set[str]:
    """Socket paths named by --qmp arguments: a glob's matches now, and every literal
    path whether it exists or not (a source of its own: `kscan run` reports it
    unreachable until it appears, rather than saying nothing)."""
    out: set[str] = set()
    for spec in specs:
        if _GLOB_CHARS & set(spec):
            out.update(_matches(spec))
        else:
            out.add(os.path.abspath(spec))
    return out


def _matches(spec: str) -> list[str]:
    """A glob's matches, as absolute paths. Discovery runs every couple of seconds over
    directories of hundreds of VMs, so a glob whose wildcards are all in its last
    component (`/run/vms/vm*`) is listed again only when its directory changed: an
    entry created, removed or renamed there changes the directory's mtime."""
    head = os.path.dirname(spec)
    if _GLOB_CHARS & set(head):  # matches in several directories: list them all
        return [os.path.abspath(p) for p in glob.glob(spec)]
    try:
        st = os.stat(head or ".")
    except OSError:
        _listings.pop(spec, None)
        return []
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    hit = _listings.get(spec)
    if hit is not None and hit[0] == key:
        return hit[1]
    found = [os.path.abspath(p) for p in glob.glob(spec)]
    if time.time_ns() - st.st_mtime_ns >= _SETTLED_NS:
        if spec not in _listings and len(_listings) >= _LISTINGS_MAX:
            _listings.clear()
        _listings[spec] = (key, found)
    else:  # changed just now: it may change again within the same mtime tick
        _listings.pop(spec, None)
    return found


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    qmp: str | None
    file_backed: bool
    uid: int | None = None  # the process's real uid (None: not read)


def _split_opts(arg: str) -> list[str]:
    """Split a QEMU option string on commas; `,,` is a literal comma."""
    parts, cur, i = [], [], 0
    while i < len(arg):
        if arg[i] == ",":
            if arg[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(arg[i])
        i += 1
    parts.append("".join(cur))
    return parts


def _opts(arg: str) -> dict[str, str]:
    out = {}
    for part in _split_opts(arg):
        key, _, val = part.partition("=")
        out[key] = val
    return out


def qmp_socket_of(cmdline: Sequence[str]) -> str | None:
    """The QMP unix socket a QEMU command line opens, if any."""
    args = list(cmdline)
    chardevs: dict[str, str] = {}
    control: list[str] = []
    for i, a in enumerate(args[:-1]):
        nxt = args[i + 1]
        if a in ("-qmp", "--qmp") and nxt.startswith("unix:"):
            return _split_opts(nxt[5:])[0]
        if a in ("-chardev", "--chardev") and nxt.startswith("socket,"):
            o = _opts(nxt)
            if o.get("id") and o.get("path"):
                chardevs[o["id"]] = o["path"]
        if a in ("-mon", "--mon"):
            o = _opts(nxt)
            if o.get("mode") == "control" and o.get("chardev"):
                control.append(o["chardev"])
    for cid in control:
        if cid in chardevs:
            return chardevs[cid]
    return None


def find_qemu_processes(names: Iterable[str] = ("qemu-system-x86_64", "qemu-kvm"),
                        uids: Iterable[int] = ()) -> list[QemuProcess]:
    """QEMU processes whose executable is named like one of `names` and whose owner is
    root or one of `uids`."""
    wanted = tuple(names)
    allowed = {0, *uids}
    out = []
    for proc in psutil.process_iter(["pid", "name", "exe", "uids", "cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            exe = proc.info["exe"] or ""
            uids_info = proc.info["uids"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        # /proc/PID/exe, not argv[0] or the process name: those are the process's say.
        base = os.path.basename(exe.removesuffix(" (deleted)"))
        if not exe or not any(base.startswith(n) for n in wanted):
            continue
        if uids_info is None or uids_info.real not in allowed \
                or uids_info.effective not in allowed:
            continue
        out.append(QemuProcess(proc.info["pid"], qmp_socket_of(cmd),
                               any("memory-backend-file" in a for a in cmd),
                               uids_info.real))
    return out

"""Which VM a source is, for keeping its state: not the name its QEMU reports.

A VM's name is whatever `-name` its QEMU was started with: a `--discover-user` QEMU
started with `-name victim` reports the victim's name. Per-VM state (per-boot pages,
accepted pages) and resume records are therefore keyed by `state_key`:

* a libvirt domain: its UUID (libvirt's own, unique on that host);
* a QMP socket: the UUID its QEMU reports (`-uuid`), or else the socket's absolute
  path — and, either way, the uid that owns the socket, so that a QEMU of another user
  can never reach a state written for a VM of another owner (it can choose any `-uuid`,
  but not who owns its socket);
* a replay directory: its absolute path.

The name stays what events show (`vm`); `scanner.run.engine` refuses to watch a second
VM under a name (or state key) that is being watched.
"""

from __future__ import annotations

import os

from scanner.vm.source import SourceKind, VmSource

__all__ = ["state_key"]


def state_key(source: VmSource | str | os.PathLike[str], uuid: str | None) -> str:
    """The key of a VM's per-VM state and resume record (see the module docstring).
    `uuid`: what QEMU (or libvirt) reports, None when it has none."""
    src = source if isinstance(source, VmSource) else VmSource.parse(source)
    if src.kind is SourceKind.LIBVIRT:
        return f"libvirt:{uuid}" if uuid else f"libvirt:{src.connect}#{src.path}"
    path = os.path.abspath(src.path)
    if src.kind is SourceKind.REPLAY:
        return f"replay:{path}"
    try:
        owner: int | None = os.stat(path).st_uid
    except OSError:
        owner = src.owner
    base = f"uuid:{uuid}" if uuid else f"qmp:{path}"
    return base if owner is None else f"{base}@uid={owner}"

"""Where a VM comes from: a QMP socket (given, or found by discovery), a replay directory
or a memory image (core file).

A libvirt domain is a source too (`SourceKind.LIBVIRT`: its name and connection URI).
A typed source instead of string prefixes: `VmSource.parse("replay:DIR")` is the one
place that reads the command-line spelling, and `open_vm` the one place that turns a
source into a `VmHandle`.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from scanner.vm.core import CoreVm
from scanner.vm.handle import VmHandle
from scanner.vm.live import AttachedVm
from scanner.vm.replay import ReplayVm

__all__ = ["SourceKind", "VmSource", "open_vm"]

_REPLAY_PREFIX = "replay:"
_CORE_PREFIX = "core:"


class SourceKind(enum.StrEnum):
    QMP = "qmp"  # a QMP socket named on the command line (or matched by a glob)
    DISCOVER = "discover"  # a QMP socket found on a QEMU process's command line
    REPLAY = "replay"  # a recorded VM (see scanner.vm.replay)
    LIBVIRT = "libvirt"  # a libvirt domain, by name (path) on connection URI (connect)
    CORE = "core"  # an ELF memory image from QEMU's dump-guest-memory (see scanner.vm.core)


@dataclass(frozen=True)
class VmSource:
    kind: SourceKind
    path: str
    connect: str = ""  # LIBVIRT: the libvirt connection URI (default qemu:///system)
    #: DISCOVER: the uid of the QEMU process; its socket and memory files must be its.
    owner: int | None = None

    @classmethod
    def parse(cls, text: str | os.PathLike[str]) -> VmSource:
        """A QMP socket path, `replay:DIR` for a recorded VM, `core:FILE` for an image."""
        s = os.fspath(text)
        if s.startswith(_REPLAY_PREFIX):
            return cls(SourceKind.REPLAY, s[len(_REPLAY_PREFIX):])
        if s.startswith(_CORE_PREFIX):
            return cls(SourceKind.CORE, s[len(_CORE_PREFIX):])
        return cls(SourceKind.QMP, s)

    def __str__(self) -> str:
        return self.path


async def open_vm(source: VmSource | str | os.PathLike[str]) -> VmHandle:
    """Attach to a live VM or open a replayed one."""
    src = source if isinstance(source, VmSource) else VmSource.parse(source)
    if src.kind is SourceKind.REPLAY:
        return await ReplayVm.open(src.path)
    if src.kind is SourceKind.CORE:
        return await CoreVm.open(src.path)
    if src.kind is SourceKind.LIBVIRT:
        from scanner.vm.domain import attach_domain

        return await attach_domain(src.path, src.connect or "qemu:///system")
    return await AttachedVm.attach(src.path, owner=src.owner)

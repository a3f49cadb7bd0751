"""Per-VM state: what one VM's checks remember between scans and across kscan restarts.

Per boot of a VM (its `BootIdentity`), kscan keeps the VM's own reading of the per-boot
pages (taken at the first check after that boot) and the pages an operator accepted
(`kscan accept`), and what the patch verifiers pinned at its first check
(`scanner.check.patch_state`). Stored in the database as plain JSON-able data (`to_plain`/
`from_plain`: page numbers become string keys, records {"hash", "data"}); anything
unreadable there is treated as no state (the next check takes a fresh one) rather
than trusted.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["BootIdentity", "PageRecord", "VmState"]


@dataclass(frozen=True)
class BootIdentity:
    """What identifies one boot of a VM, as far as guest memory can tell: the kernel
    build and its KASLR slide (a reboot re-randomizes it).

    Deliberately not where the kernel's pages sit physically: a guest can remap a
    protected virtual page to an identical copy elsewhere, and must not reset its
    per-boot baseline that way. A reboot that keeps the slide (about 1 in 500) is told
    by QEMU (a RESET event: `kscan run` then drops the VM's state); missed, it shows as
    changed per-boot pages, never as a reset of what is checked."""

    build_id: str
    slide: int

    def to_plain(self) -> dict[str, Any]:
        return {"build_id": self.build_id, "slide": self.slide}

    @classmethod
    def from_plain(cls, d: Any) -> BootIdentity:
        return cls(str(d["build_id"]), int(d["slide"]))


@dataclass(frozen=True)
class PageRecord:
    """One page as this VM had it: its hash, and its bytes (zstd) to show a change."""

    hash: int
    data: bytes

    def to_plain(self) -> dict[str, Any]:
        return {"hash": self.hash, "data": self.data}

    @classmethod
    def from_plain(cls, d: Any) -> PageRecord:
        data = d["data"]
        if not isinstance(data, bytes):
            raise TypeError("page data is not bytes")
        return cls(int(d["hash"]), data)


Pages = dict[str, dict[int, PageRecord]]  # region → page index → record


def _pages_to_plain(pages: Pages) -> dict[str, dict[str, Any]]:
    return {region: {str(p): r.to_plain() for p, r in sorted(recs.items())}
            for region, recs in pages.items()}


def _pages_from_plain(d: Any) -> Pages:
    return {str(region): {int(p): PageRecord.from_plain(r) for p, r in recs.items()}
            for region, recs in d.items()}


@dataclass
class VmState:
    """One VM's per-boot and accepted pages, for one boot."""

    boot: BootIdentity
    boot_profile: str
    per_boot: Pages = field(default_factory=dict)
    accepted: Pages = field(default_factory=dict)
    taken_at: float = field(default_factory=time.time)
    #: The patch verifiers' memory of this boot (`PatchMemory.to_plain()`).
    patching: dict[str, Any] = field(default_factory=dict)

    def to_plain(self) -> dict[str, Any]:
        return {"boot": self.boot.to_plain(), "boot_profile": self.boot_profile,
                "per_boot": _pages_to_plain(self.per_boot),
                "accepted": _pages_to_plain(self.accepted), "taken_at": self.taken_at,
                "patching": self.patching}

    def digest(self) -> bytes:
        """sha256 of what a check compares with: the boot, the boot profile, the hash of
        every per-boot and accepted page, and when the state was taken (a state taken
        again, or a page accepted since, gives another digest)."""
        def hashes(pages: Pages) -> list[Any]:
            return [[r, [[p, rec.hash] for p, rec in sorted(recs.items())]]
                    for r, recs in sorted(pages.items()) if recs]

        return hashlib.sha256(orjson.dumps(
            [self.boot.build_id, self.boot.slide, self.boot_profile, hashes(self.per_boot),
             hashes(self.accepted), self.taken_at])).digest()

    @classmethod
    def from_plain(cls, d: Any) -> VmState | None:
        """The state stored as `d`, or None if it is missing or not of this shape."""
        if d is None:
            return None
        try:
            patching = d.get("patching", {})
            return cls(BootIdentity.from_plain(d["boot"]), str(d["boot_profile"]),
                       _pages_from_plain(d.get("per_boot", {})),
                       _pages_from_plain(d.get("accepted", {})), float(d["taken_at"]),
                       patching if isinstance(patching, dict) else {})
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

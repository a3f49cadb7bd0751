"""The store's records: frozen dataclasses of plain data (str, int, float, bytes, dict).

Golden region layout (what `page_hashes` and `per_boot` hold):

- `page_hashes`: one 64-bit hash per 4 KiB page of the region (keyed under the host key,
  `scanner.hashing`; the `hash_key` table names the key), packed little-endian
  (`struct` format `<Q`), page 0 first. The number of pages is `len(page_hashes) // 8`.
- `per_boot`: a bitmap with one bit per page, LSB first: page i is bit `i % 8` of byte
  `i // 8`. A set bit marks a page that legitimately differs per boot (e.g. the
  `__ro_after_init` tail of `.rodata`); it is checked against the VM's own per-boot
  baseline, not the golden hash. Its length is exactly `ceil(pages / 8)` bytes and the
  padding bits of the last byte are zero.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EventRow", "GoldenInfo", "GoldenRecord", "GoldenRegion", "ImportOutcome",
           "ProfileInfo", "ProfileRow"]

PAGE_SIZE = 4096
REGION_HASH_SIZE = 16
_PAGE_HASH = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class ProfileRow:
    """A stored kernel profile; `data` is the profile as its producer serialized it."""

    build_id: str
    release: str
    version: str
    data: bytes
    added_at: float   # Unix time


@dataclass(frozen=True, slots=True)
class ProfileInfo:
    """A profile as listed by `Store.list_profiles`: everything but `data` (its size only)."""

    build_id: str
    release: str
    version: str
    added_at: float
    size: int         # len(data)


@dataclass(frozen=True, slots=True)
class GoldenRegion:
    """Golden hashes of one protected region (".text", ".rodata", "__ex_table", "idt")."""

    size: int               # region size in bytes
    region_hash: bytes      # 16-byte hash of the whole region
    page_hashes: bytes      # packed <Q, one per 4 KiB page
    per_boot: bytes         # bitmap, one bit per page (see module doc)
    boots: int              # verified boots merged into this baseline
    meta: dict[str, Any] = field(default_factory=dict)   # plain data (store.codec)

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"size must be an int >= 0, got {self.size!r}")
        if isinstance(self.boots, bool) or not isinstance(self.boots, int) or self.boots < 1:
            raise ValueError(f"boots must be an int >= 1, got {self.boots!r}")
        for name in ("region_hash", "page_hashes", "per_boot"):
            if not isinstance(getattr(self, name), bytes):
                raise TypeError(f"{name} must be bytes, got {type(getattr(self, name)).__name__}")
        if len(self.region_hash) != REGION_HASH_SIZE:
            raise ValueError(f"region_hash must be {REGION_HASH_SIZE} bytes, "
                             f"got {len(self.region_hash)}")
        if len(self.page_hashes) % _PAGE_HASH.size:
            raise ValueError(f"page_hashes length {len(self.page_hashes)} is not a multiple "
                             f"of {_PAGE_HASH.size}")
        pages = self.pages
        if len(self.per_boot) != (pages + 7) // 8:
            raise ValueError(f"per_boot must be {(pages + 7) // 8} bytes for {pages} pages, "
                             f"got {len(self.per_boot)}")
        if pages % 8 and self.per_boot[-1] >> (pages % 8):
            raise ValueError(f"per_boot has bits set past page {pages - 1}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got {type(self.meta).__name__}")

    @classmethod
    def build(cls, *, size: int, region_hash: bytes, page_hashes: Sequence[int],
              per_boot_pages: Iterable[int] = (), boots: int = 1,
              meta: dict[str, Any] | None = None) -> GoldenRegion:
        """Pack page hashes (ints < 2**64) and per-boot page numbers into a region."""
        pages = len(page_hashes)
        bitmap = bytearray((pages + 7) // 8)
        for page in per_boot_pages:
            if not 0 <= page < pages:
                raise ValueError(f"per-boot page {page} outside 0..{pages - 1}")
            bitmap[page // 8] |= 1 << (page % 8)
        return cls(size=size, region_hash=region_hash,
                   page_hashes=struct.pack(f"<{pages}Q", *page_hashes),
                   per_boot=bytes(bitmap), boots=boots, meta=dict(meta or {}))

    @property
    def pages(self) -> int:
        """Number of 4 KiB pages with a hash."""
        return len(self.page_hashes) // _PAGE_HASH.size

    def page_hash(self, page: int) -> int:
        """The 64-bit hash of page `page`."""
        if not 0 <= page < self.pages:
            raise IndexError(f"page {page} outside 0..{self.pages - 1}")
        return int(_PAGE_HASH.unpack_from(self.page_hashes, page * _PAGE_HASH.size)[0])

    def page_hash_list(self) -> list[int]:
        """All page hashes as ints, page 0 first."""
        return [h for (h,) in _PAGE_HASH.iter_unpack(self.page_hashes)]

    def is_per_boot(self, page: int) -> bool:
        """Whether page `page` legitimately differs per boot."""
        if not 0 <= page < self.pages:
            raise IndexError(f"page {page} outside 0..{self.pages - 1}")
        return bool(self.per_boot[page // 8] >> (page % 8) & 1)

    def per_boot_pages(self) -> list[int]:
        """Page numbers marked per-boot, ascending."""
        return [i * 8 + bit for i, byte in enumerate(self.per_boot) if byte
                for bit in range(8) if byte >> bit & 1]


@dataclass(frozen=True, slots=True)
class GoldenInfo:
    """A stored golden baseline as listed by `Store.list_golden` (no hashes)."""

    build_id: str
    boot_profile: str
    source_vm: str          # the verified VM the baseline was last taken from
    created_at: float       # Unix time of the `put_golden` that wrote it
    regions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EventRow:
    """One entry of the append-only event log. `detail` is every other key of the event."""

    id: int                 # increasing, never reused; pass as `since_id` to page on
    ts: float
    event: str
    vm: str
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The event as it was appended (without `id`)."""
        return {"ts": self.ts, "event": self.event, "vm": self.vm, **self.detail}


@dataclass(frozen=True, slots=True)
class GoldenRecord:
    """A whole golden baseline as one record: what `Store.get_golden_record` reads in one
    snapshot, what a baseline bundle carries, what `Store.import_records` writes."""

    build_id: str
    boot_profile: str
    source_vm: str
    created_at: float                   # Unix time
    regions: dict[str, GoldenRegion]
    contents: dict[str, bytes]          # region name → stored content (may be empty)

    def same_hashes(self, other: GoldenRecord) -> bool:
        """Whether both give every page the same verdict: the same regions with the same
        size, hashes and per-boot pages (boot counts, metadata and contents aside)."""
        if self.regions.keys() != other.regions.keys():
            return False
        return all((a.size, a.region_hash, a.page_hashes, a.per_boot)
                   == (b.size, b.region_hash, b.page_hashes, b.per_boot)
                   for a, b in ((r, other.regions[n]) for n, r in self.regions.items()))


@dataclass(frozen=True, slots=True)
class ImportOutcome:
    """What `Store.import_records` did with each record, by build id (profiles) or
    (build id, boot profile) (golden baselines)."""

    profiles_added: tuple[str, ...] = ()
    profiles_upgraded: tuple[str, ...] = ()
    profiles_kept: tuple[str, ...] = ()          # already stored, left as they were
    golden_added: tuple[tuple[str, str], ...] = ()
    golden_unchanged: tuple[tuple[str, str], ...] = ()   # the same hashes already stored
    golden_replaced: tuple[tuple[str, str], ...] = ()    # a different one, replaced
    golden_kept_local: tuple[tuple[str, str], ...] = ()  # a different one, kept
    #: Not stored here, not re-added: the bundle is not newer than the newest imported
    #: from its key (deleted here since, most likely), and no --replace.
    golden_not_restored: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"profiles": {"added": list(self.profiles_added),
                             "upgraded": list(self.profiles_upgraded),
                             "kept": list(self.profiles_kept)},
                "golden": {k: [list(x) for x in v] for k, v in (
                    ("added", self.golden_added), ("unchanged", self.golden_unchanged),
                    ("replaced", self.golden_replaced),
                    ("kept_local", self.golden_kept_local),
                    ("not_restored", self.golden_not_restored))}}

"""`kscan export` and `kscan import`: share verified baselines across a fleet.

Export writes the stored kernel profiles and golden baselines (all, or those of the
build ids asked for) into one bundle signed with an Ed25519 key (`store.bundle` has the
format). Import verifies a bundle against one trusted public key before it opens the
database, checks that what it carries is usable (every profile reads as a profile of
its build id; every baseline's regions are the four kscan checks, with a page hash per
page and content of the region's size), then merges it in one transaction:

* rollback: a bundle whose sequence number is older than the newest imported from the
  same signing key, or a format-1 bundle (no sequence), is refused unless
  `allow_older`; a bundle not newer than that newest one does not bring back golden
  baselines missing here (deleted since) unless `replace`;
* profiles: a build id not stored is added; a stored one is kept — with `replace`,
  upgraded when the bundle's knows more (`richer`, e.g. the CLI's "stored by an older
  kscan" test) or the stored one does not read; a stored profile that differs is
  reported (`ImportResult.profiles_differ`);
* golden baselines, by (build id, boot profile): added when there is none; left alone
  when the stored one has the same hashes; a different local one is kept (reported),
  unless `replace`;
* an `imported` event with the bundle's key id and what was done, in the same
  transaction.

Importing the same bundle twice changes nothing the second time (but logs it again).

No hash travels: every hash kscan compares is keyed under the host's secret key
(`scanner.hashing`), which never leaves the host. An exported bundle carries each golden
region's content (its normalized bytes) with the hash fields of the format zeroed, and
refuses a baseline stored without content; import requires the content of every region
and makes the hashes from it under the local key before merging.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from kscan.errors import KscanError
from scanner.check.locate import REGIONS
from scanner.errors import KernelImageError
from scanner.examine.keying import keyed_store
from scanner.hashing import page_hashes, region_hash
from scanner.image.kernel_profile import KernelProfile
from store import default_db_path
from store.bundle import (
    Bundle,
    encode_bundle,
    key_id,
    load_private_key,
    load_public_key,
    read_bundle_file,
    write_bundle_file,
)
from store.errors import BundleError
from store.models import GoldenRecord, ImportOutcome, ProfileRow

__all__ = ["ExportResult", "ImportResult", "export_bundle", "import_bundle"]

PAGE = 4096

#: (stored profile, the bundle's) → whether the bundle's should replace the stored one.
Richer = Callable[[KernelProfile, KernelProfile], bool]


@dataclass(frozen=True)
class ExportResult:
    path: str
    key_id: str
    profiles: tuple[ProfileRow, ...]
    goldens: tuple[GoldenRecord, ...]
    size: int
    seconds: float
    sequence: int = 0


@dataclass(frozen=True)
class ImportResult:
    path: str
    bundle: Bundle
    outcome: ImportOutcome
    seconds: float
    #: Stored profiles whose data differ from the bundle's, kept (no `replace`).
    profiles_differ: tuple[str, ...] = ()


async def export_bundle(out: str | os.PathLike[str], key_path: str | os.PathLike[str],
                        db: str | None, build_ids: Sequence[str] = ()) -> ExportResult:
    """Write the profiles and golden baselines of `build_ids` (all when empty) to `out`,
    signed with the Ed25519 private key in `key_path`."""
    t0 = time.perf_counter()
    key = load_private_key(key_path)
    db_path = Path(db) if db is not None else default_db_path()
    if not db_path.exists():
        raise KscanError(f"database {db_path} does not exist: nothing to export",
                         hint="export on the host that made the baselines, or pass --db")
    async with keyed_store(db_path) as st:
        stored = {p.build_id for p in await st.list_profiles()}
        wanted = list(dict.fromkeys(build_ids)) if build_ids else sorted(stored)
        unknown = [b for b in wanted if b not in stored]
        if unknown:
            raise KscanError(f"no stored profile with build id {', '.join(unknown)}",
                             hint="`kscan profile list` shows the stored build ids")
        if not wanted:
            raise KscanError(f"database {db_path} holds no profiles: nothing to export",
                             hint="add a kernel with `kscan profile add` and baseline it")
        profiles = []
        for b in wanted:
            row = await st.get_profile(b)
            if row is not None:
                profiles.append(row)
        goldens = []
        for info in await st.list_golden():
            if info.build_id in wanted:
                rec = await st.get_golden_record(info.build_id, info.boot_profile)
                if rec is not None:
                    goldens.append(_without_hashes(rec))
        kid = key_id(key)
        sequence = await st.next_export_sequence(kid, int(time.time()))
        blob = encode_bundle(profiles, goldens, key, sequence=sequence)
        write_bundle_file(out, blob)
        await st.append_event({
            "ts": time.time(), "event": "exported", "vm": "", "bundle": str(out),
            "key_id": kid, "sequence": sequence, "size": len(blob),
            "profiles": [p.build_id for p in profiles],
            "golden": [[g.build_id, g.boot_profile] for g in goldens]})
    return ExportResult(str(out), kid, tuple(profiles), tuple(goldens), len(blob),
                        time.perf_counter() - t0, sequence)


async def import_bundle(path: str | os.PathLike[str], trust_path: str | os.PathLike[str],
                        db: str | None, *, replace: bool = False,
                        richer: Richer | None = None,
                        allow_older: bool = False) -> ImportResult:
    """Verify the bundle at `path` with the Ed25519 public key in `trust_path`, check its
    records, and merge them into the database (see the module doc). Raises BundleError
    or KeyFileError, with the database untouched (not even created), if anything is
    wrong with the bundle or the key."""
    t0 = time.perf_counter()
    where = str(path)
    trusted = load_public_key(trust_path)
    bundle = read_bundle_file(path, trusted)
    if bundle.sequence is None and not allow_older:   # refused before the database opens
        raise BundleError("a format-1 bundle has no sequence number: kscan cannot tell it "
                          "from an old bundle replayed", path=where,
                          hint="re-export it with this kscan, or import with --allow-older")
    new_profiles = {p.build_id: _usable_profile(p, where) for p in bundle.profiles}
    contents = [_check_golden(g, where) for g in bundle.goldens]
    async with keyed_store(db, announce=True) as st:
        goldens = [_hashed(g, c) for g, c in zip(bundle.goldens, contents, strict=True)]
        pairs = []
        differ = []
        for row in bundle.profiles:
            upgrade = False
            old = await st.get_profile(row.build_id)
            if old is not None and old.data != row.data:
                differ.append(row.build_id)
                # What the stored profile says is where kscan looks: the bundle's
                # replaces it only when asked (--replace), and only when it knows more.
                if replace and richer is not None:
                    try:
                        upgrade = richer(KernelProfile.from_bytes(old.data),
                                         new_profiles[row.build_id])
                    except KernelImageError:
                        upgrade = True   # the stored one does not even read: take ours
            pairs.append((row, upgrade))
        outcome = await st.import_records(
            pairs, goldens, replace_golden=replace,
            signer=(bundle.key_id, bundle.sequence, where), allow_older=allow_older,
            event={"ts": time.time(), "event": "imported", "vm": "", "bundle": where,
                   "key_id": bundle.key_id, "bundle_created": bundle.created,
                   "sequence": bundle.sequence, "producer": bundle.producer,
                   "replace": replace, "allow_older": allow_older})
    kept_differ = tuple(b for b in differ if b not in outcome.profiles_upgraded)
    return ImportResult(where, bundle, outcome, time.perf_counter() - t0, kept_differ)


def _usable_profile(row: ProfileRow, where: str) -> KernelProfile:
    try:
        prof = KernelProfile.from_bytes(row.data)
    except KernelImageError as err:
        raise BundleError(f"profile {row.build_id} cannot be read by this kscan "
                          f"({err.message})", path=where,
                          hint="export with a kscan no newer than this one") from err
    if prof.build_id != row.build_id:
        raise BundleError(f"profile filed under {row.build_id} is the profile of "
                          f"{prof.build_id}", path=where)
    return prof


def _without_hashes(rec: GoldenRecord) -> GoldenRecord:
    """`rec` as exported: its keyed hashes zeroed (they would say something about the
    key and are of no use elsewhere); its content is what the importer hashes."""
    missing = sorted(n for n in rec.regions if not rec.contents.get(n))
    if missing:
        raise KscanError(f"golden baseline {rec.build_id} {rec.boot_profile!r} has no stored "
                         f"content for {', '.join(missing)}: it cannot be exported",
                         hint="take the baseline again with `kscan baseline`")
    regions = {n: dataclasses.replace(r, region_hash=bytes(len(r.region_hash)),
                                      page_hashes=bytes(len(r.page_hashes)))
               for n, r in rec.regions.items()}
    return dataclasses.replace(rec, regions=regions)


def _hashed(g: GoldenRecord, contents: dict[str, bytes]) -> GoldenRecord:
    """`g` with hashes made under the installed (local) key from its content."""
    regions = {}
    for name, r in g.regions.items():
        pages = page_hashes(contents[name])
        regions[name] = dataclasses.replace(
            r, region_hash=region_hash(contents[name]),
            page_hashes=struct.pack(f"<{len(pages)}Q", *pages))
    return dataclasses.replace(g, regions=regions)


def _check_golden(g: GoldenRecord, where: str) -> dict[str, bytes]:
    """Check a bundle's golden baseline; its regions' content, decompressed."""
    what = f"golden baseline {g.build_id} {g.boot_profile!r}"
    dctx = zstandard.ZstdDecompressor()
    out: dict[str, bytes] = {}
    unknown = sorted(set(g.regions) - set(REGIONS))
    if unknown:
        raise BundleError(f"{what}: unknown regions {', '.join(unknown)}", path=where)
    for name, r in g.regions.items():
        if r.pages != (r.size + PAGE - 1) // PAGE:
            raise BundleError(f"{what}: {name} has {r.pages} page hashes for {r.size} bytes",
                              path=where)
        content = g.contents.get(name)
        if content is None:
            raise BundleError(f"{what}: no content for {name}: its hashes cannot be made "
                              "under this host's key", path=where,
                              hint="export it again with this kscan")
        try:
            framed = zstandard.frame_content_size(content)
            data = dctx.decompress(content, max_output_size=max(r.size, 1)) \
                if framed == r.size else b""
        except zstandard.ZstdError:
            framed, data = -1, b""
        if framed != r.size or len(data) != r.size:
            raise BundleError(f"{what}: the content of {name} is not a zstd frame of "
                              f"{r.size} bytes", path=where)
        out[name] = data
    return out

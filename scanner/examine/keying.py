"""The database opened under the host key: every hash read from it or written to it is
keyed under the key beside it (`store.keyfile`, `scanner.hashing`).

`keyed_store(db)` opens the database, makes the key at first use (one line on stderr
from `kscan baseline` and `kscan import`: where it is and how to rotate it), installs it
for this process's hashes, and makes the stored hashes match it: a database from before
keyed hashes, or one whose key was rotated, has its golden baselines re-hashed from their
stored content (a baseline without content is dropped: it cannot be re-hashed and its
old hashes are not trusted); each VM's per-VM state has its page hashes made again
from the page bytes it keeps (per-boot readings, accepted pages: re-taking them from the
VM now would trust whatever it holds now), or is dropped if they do not read; resume
records are dropped (re-taken at the VM's next clean check). Said once on stderr, by
the process that did it.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import zstandard

from scanner import hashing
from scanner.check.state import PageRecord, VmState
from store import GoldenRegion, Store
from store.keyfile import key_path, load_or_create, rotate
from translate import PAGE

__all__ = ["RekeyOutcome", "keyed_store", "rekey", "rotate_key", "use_host_key"]

_ZSTD_MAX = 64 << 20


@dataclasses.dataclass(frozen=True)
class RekeyOutcome:
    rehashed: tuple[tuple[str, str], ...]
    dropped: tuple[tuple[str, str], ...]   # golden baselines without usable content
    states: int = 0                         # per-VM states re-hashed
    states_dropped: int = 0                 # per-VM states that did not read


def rehash_state(plain: dict[str, Any] | None,
                 dctx: zstandard.ZstdDecompressor) -> dict[str, Any] | None:
    """A stored per-VM state with every page record's hash made again, under the
    installed key, from the record's own bytes; None if it does not read."""
    state = VmState.from_plain(plain)
    if state is None:
        return None
    try:
        for pages in (state.per_boot, state.accepted):
            for recs in pages.values():
                for p, rec in recs.items():
                    data = dctx.decompress(rec.data, max_output_size=PAGE)
                    recs[p] = PageRecord(hashing.page_hash(data), rec.data)
    except (zstandard.ZstdError, IndexError):
        return None
    return state.to_plain()


def rehash_region(r: GoldenRegion, content: bytes | None,
                  dctx: zstandard.ZstdDecompressor) -> GoldenRegion | None:
    """`r` with its hashes made again, under the installed key, from its stored content
    (compressed normalized bytes); None if the content is missing or not `r`'s."""
    if not content:
        return None
    try:
        data = dctx.decompress(content, max_output_size=_ZSTD_MAX)
    except zstandard.ZstdError:
        return None
    if len(data) != r.size:
        return None
    pages = hashing.page_hashes(data)
    if len(pages) != r.pages:
        return None
    return dataclasses.replace(r, region_hash=hashing.region_hash(data),
                               page_hashes=struct.pack(f"<{len(pages)}Q", *pages))


async def rekey(st: Store, keys: hashing.Keys, stored: str | None) -> RekeyOutcome | None:
    """Re-hash the golden baselines under `keys` and drop per-VM state (see the module
    doc); None if another process did it meanwhile."""
    dctx = zstandard.ZstdDecompressor()
    goldens: dict[tuple[str, str], dict[str, GoldenRegion]] = {}
    dropped: list[tuple[str, str]] = []
    for info in await st.list_golden():
        key = (info.build_id, info.boot_profile)
        rec = await st.get_golden_record(*key)
        if rec is None:
            continue
        regions = {n: rehash_region(r, rec.contents.get(n), dctx)
                   for n, r in rec.regions.items()}
        if all(r is not None for r in regions.values()):
            goldens[key] = {n: r for n, r in regions.items() if r is not None}
        else:
            dropped.append(key)
    states: dict[str, dict[str, Any]] = {}
    ids = await st.list_vm_ids()
    for vm in ids:
        plain = rehash_state(await st.get_vm_state(vm), dctx)
        if plain is not None:
            states[vm] = plain
    if not await st.rekey(keys.key_id, expect=stored, goldens=goldens, drop_golden=dropped,
                          vm_states=states):
        return None
    return RekeyOutcome(tuple(goldens), tuple(dropped), len(states), len(ids) - len(states))


async def use_host_key(st: Store, *, announce: bool = False) -> hashing.Keys:
    """Install the key of `st`'s database (made if there is none) and bring the stored
    hashes under it. `announce`: say on stderr where a key made just now is (the commands
    that store baselines do; an error elsewhere stays the one line it is)."""
    key, created = load_or_create(st.path)
    if created and announce:
        print(f"kscan: made the secret hash key {key_path(st.path)} (keep it private; "
              f"`kscan key rotate` replaces it)", file=sys.stderr)
    keys = hashing.install(key)
    stored = await st.get_key_id()
    if stored != keys.key_id:
        out = await rekey(st, keys, stored)
        if out is not None and (stored is not None or out.rehashed or out.dropped):
            why = "stored before keyed hashes" if stored is None else "made under another key"
            print(f"kscan: database {st.path}: hashes {why}: re-hashed "
                  f"{len(out.rehashed)} golden baselines from their content"
                  + (f", dropped {len(out.dropped)} without content (baseline them again)"
                     if out.dropped else "")
                  + f"; re-hashed {out.states} per-VM states from their page bytes"
                  + (f" ({out.states_dropped} unreadable, dropped)" if out.states_dropped
                     else "")
                  + "; resume records are re-taken at each VM's next check", file=sys.stderr)
    return keys


@asynccontextmanager
async def keyed_store(path: str | Path | None = None, *,
                      announce: bool = False) -> AsyncIterator[Store]:
    """`Store.open(path)` with the host key installed and the stored hashes under it."""
    async with Store.open(path) as st:
        await use_host_key(st, announce=announce)
        yield st


async def rotate_key(path: str | Path | None = None) -> tuple[Path, RekeyOutcome | None]:
    """Replace the host key of the database at `path`, then re-hash under the new one."""
    async with Store.open(path) as st:
        load_or_create(st.path)        # so a first rotate has something to replace
        stored = await st.get_key_id()
        keys = hashing.install(rotate(st.path))
        return key_path(st.path), await rekey(st, keys, stored)

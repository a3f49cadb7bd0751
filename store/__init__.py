"""kscan's database: kernel profiles, golden baselines, per-VM state and the event log.

`store` keeps plain data (str, int, float, bytes, dicts of those) in one SQLite file,
through aiosqlite, and hands back frozen dataclasses. It knows nothing of page tables,
QMP or hashing: `scanner` decides what the bytes mean, `store` keeps them safe.

    async with Store.open() as st:          # $XDG_STATE_HOME/kscan/kscan.db
        await st.add_profile(build_id, release, version, data)
        await st.put_golden(build_id, boot_profile, {".text": region, ...}, source_vm,
                            contents={".text": compressed_bytes})   # contents optional
        blob = await st.get_golden_content(build_id, boot_profile, ".text")
        await st.append_event({"ts": time.time(), "event": "mismatch", "vm": "vm-a"})

The file is private (0600, directory 0700), in WAL mode so several kscan processes can
share it, versioned with `PRAGMA user_version` and migrated forward on open. The event
log is append-only, enforced by SQLite triggers. Failures raise `StoreError`.

Baselines travel between hosts as signed bundles (`store.bundle`: one file of profiles
and golden baselines, Ed25519-signed, verified and bounded before anything is believed;
`Store.import_records` merges one in a single transaction).

Modules: `db` (Store), `models` (records), `schema` (migrations), `codec` (JSON with
bytes), `paths` (XDG default path, private file creation), `bundle` (signed bundles),
`keyfile` (the host's secret hash key beside the database; the hashes themselves are
`scanner`'s), `errors`.
"""

from store.db import Store
from store.errors import BundleError, KeyFileError, SchemaError, StoreError
from store.models import (
    EventRow,
    GoldenInfo,
    GoldenRecord,
    GoldenRegion,
    ImportOutcome,
    ProfileInfo,
    ProfileRow,
)
from store.paths import default_db_path
from store.schema import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION",
    "BundleError",
    "EventRow",
    "GoldenInfo",
    "GoldenRecord",
    "GoldenRegion",
    "ImportOutcome",
    "KeyFileError",
    "ProfileInfo",
    "ProfileRow",
    "SchemaError",
    "Store",
    "StoreError",
    "default_db_path",
]

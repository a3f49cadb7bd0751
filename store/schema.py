"""The database schema as an ordered list of migrations.

`PRAGMA user_version` holds the number of the last migration applied; `PRAGMA
application_id` marks the file as kscan's. `Store.open` applies every migration newer
than the file's version, in order, in one `BEGIN IMMEDIATE` transaction, and refuses a
file whose version is newer than `SCHEMA_VERSION`.

To change the schema, append a `Migration` with the next version number; never edit
one that has shipped. Statements run one by one inside the transaction (so no
`executescript`, which would commit), with foreign keys enforced: a migration that
rebuilds a table must keep the references valid (`PRAGMA foreign_key_check` runs
before the commit).

Tables (v6):
    profile         build_id → release, version, data (opaque profile bytes)
    golden          (build_id, boot_profile) → source_vm, created_at; FK → profile
    golden_region   (build_id, boot_profile, name) → size, hashes, per_boot, boots, meta
    golden_content  (build_id, boot_profile, name) → data (opaque, e.g. compressed
                    normalized region bytes; optional, read only on demand);
                    FK → golden, ON DELETE CASCADE                              [v2]
    vm_state        vm_id → state (JSON, store.codec); vm_id is the VM's identity
                    (`scanner.vm.identity.state_key`), not its name            [v5]
    vm_resume       vm_id → state (opaque bytes: what a fast pass needs to resume the VM
                    after a restart, `scanner.check.resume`); FK → vm_state,
                    ON DELETE CASCADE                                            [v3]
    bundle_key      key_id → newest sequence imported from that signing key, last
                    sequence this database exported with it (rollback protection of
                    baseline bundles, `store.bundle`)                            [v4]
    hash_key        one row: the id of the host key the stored hashes are keyed under [v6]
    event           append-only log; UPDATE and DELETE are refused by triggers (only
                    `Store.prune_events` removes old rows, by age, keeping the last
                    tamper of each VM)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["APPLICATION_ID", "EVENT_NO_DELETE", "MIGRATIONS", "SCHEMA_VERSION", "Migration"]

#: "kscn" as a big-endian int32, in the SQLite header at offset 68.
APPLICATION_ID = 0x6B73636E


@dataclass(frozen=True, slots=True)
class Migration:
    """Statements taking the schema from `version - 1` to `version`."""

    version: int
    summary: str
    statements: tuple[str, ...]
    #: Said once on stderr (a warning) when applied to a file where `notice_if` (a
    #: SELECT of one count, run before the statements) is not 0.
    notice: str = ""
    notice_if: str = ""


#: The trigger that keeps the event log append-only against DELETE. `Store.prune_events`
#: drops and re-creates it inside its own transaction (no other connection ever sees
#: the log without it), so this text must stay exactly the one v1 created.
EVENT_NO_DELETE = """CREATE TRIGGER event_no_delete BEFORE DELETE ON event
       BEGIN SELECT RAISE(ABORT, 'event log is append-only: DELETE refused'); END"""

_V1 = Migration(1, "initial schema", (
    """CREATE TABLE profile (
        build_id  TEXT PRIMARY KEY NOT NULL CHECK (length(build_id) > 0),
        release   TEXT NOT NULL,
        version   TEXT NOT NULL,
        data      BLOB NOT NULL CHECK (typeof(data) = 'blob'),
        added_at  REAL NOT NULL
    )""",
    "CREATE INDEX profile_by_release ON profile (release)",
    """CREATE TABLE golden (
        build_id      TEXT NOT NULL REFERENCES profile (build_id),
        boot_profile  TEXT NOT NULL,
        source_vm     TEXT NOT NULL,
        created_at    REAL NOT NULL,
        PRIMARY KEY (build_id, boot_profile)
    )""",
    """CREATE TABLE golden_region (
        build_id      TEXT NOT NULL,
        boot_profile  TEXT NOT NULL,
        name          TEXT NOT NULL,
        size          INTEGER NOT NULL CHECK (typeof(size) = 'integer' AND size >= 0),
        region_hash   BLOB NOT NULL
                      CHECK (typeof(region_hash) = 'blob' AND length(region_hash) = 16),
        page_hashes   BLOB NOT NULL
                      CHECK (typeof(page_hashes) = 'blob' AND length(page_hashes) % 8 = 0),
        per_boot      BLOB NOT NULL CHECK (typeof(per_boot) = 'blob'),
        boots         INTEGER NOT NULL CHECK (typeof(boots) = 'integer' AND boots >= 1),
        meta          TEXT NOT NULL,
        PRIMARY KEY (build_id, boot_profile, name),
        FOREIGN KEY (build_id, boot_profile) REFERENCES golden (build_id, boot_profile)
            ON DELETE CASCADE
    )""",
    """CREATE TABLE vm_state (
        vm_id       TEXT PRIMARY KEY NOT NULL,
        state       TEXT NOT NULL,
        updated_at  REAL NOT NULL
    )""",
    """CREATE TABLE event (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        ts      REAL NOT NULL,
        event   TEXT NOT NULL,
        vm      TEXT NOT NULL,
        detail  TEXT NOT NULL
    )""",
    "CREATE INDEX event_by_vm ON event (vm, id)",
    """CREATE TRIGGER event_no_update BEFORE UPDATE ON event
       BEGIN SELECT RAISE(ABORT, 'event log is append-only: UPDATE refused'); END""",
    EVENT_NO_DELETE,
))

# Kept apart from golden_region so that `get_golden` never reads these multi-MB blobs.
_V2 = Migration(2, "golden_content: stored region bytes of golden baselines", (
    """CREATE TABLE golden_content (
        build_id      TEXT NOT NULL,
        boot_profile  TEXT NOT NULL,
        name          TEXT NOT NULL,
        data          BLOB NOT NULL CHECK (typeof(data) = 'blob'),
        PRIMARY KEY (build_id, boot_profile, name),
        FOREIGN KEY (build_id, boot_profile) REFERENCES golden (build_id, boot_profile)
            ON DELETE CASCADE
    )""",
))

# Kept apart from vm_state: written after every clean full check, read once per VM at
# start, and dropped with the VM's per-VM state (a reset, a re-baseline of the VM).
_V3 = Migration(3, "vm_resume: the fast-pass state a restarted kscan resumes a VM from", (
    """CREATE TABLE vm_resume (
        vm_id       TEXT PRIMARY KEY NOT NULL REFERENCES vm_state (vm_id) ON DELETE CASCADE,
        state       BLOB NOT NULL CHECK (typeof(state) = 'blob'),
        updated_at  REAL NOT NULL
    )""",
))

# A table of its own, no reference to the others: importing refuses a bundle older
# than the newest one imported from its signing key (replaying an old signed bundle
# would bring back baselines deleted since).
_V4_BUNDLE_KEYS = Migration(4, "bundle_key: bundle sequence numbers per signing key", (
    """CREATE TABLE bundle_key (
        key_id        TEXT PRIMARY KEY NOT NULL CHECK (length(key_id) = 64),
        imported_seq  INTEGER CHECK (imported_seq IS NULL OR (typeof(imported_seq) =
                                     'integer' AND imported_seq >= 0)),
        exported_seq  INTEGER CHECK (exported_seq IS NULL OR (typeof(exported_seq) =
                                     'integer' AND exported_seq >= 0)),
        updated_at    REAL NOT NULL
    )""",
))

# Per-VM state was keyed by the name QEMU reports, which any QEMU can claim; it is now
# keyed by the VM's identity (`scanner.vm.identity`). Which VM a name-keyed row was
# written for cannot be told, so those rows are dropped: each VM's per-VM baseline is
# taken again at its next full check (and no resume until then).
_V5 = Migration(5, "per-VM state keyed by VM identity, not by name", (
    "DELETE FROM vm_resume",
    "DELETE FROM vm_state",
), notice="per-VM state of an older kscan (keyed by VM name) dropped: each VM's per-VM "
          "baseline is taken again at its next full check",
   notice_if="SELECT count(*) FROM vm_state")

# Every hash stored is keyed under the host key (`store.keyfile`); this row names the key
# they were made under. None (a database from before v6) or another key id: the hashes
# are stale, and `scanner.examine.keying` re-hashes or drops them before any is used.
_V6 = Migration(6, "hash_key: the id of the host key the stored hashes were made under", (
    """CREATE TABLE hash_key (
        one     INTEGER PRIMARY KEY CHECK (one = 1),
        key_id  TEXT NOT NULL,
        set_at  REAL NOT NULL
    )""",
))

#: In order, versions 1, 2, 3, ... with no gaps (checked by the tests).
MIGRATIONS: tuple[Migration, ...] = (_V1, _V2, _V3, _V4_BUNDLE_KEYS, _V5, _V6)

#: The newest schema this code knows.
SCHEMA_VERSION = MIGRATIONS[-1].version

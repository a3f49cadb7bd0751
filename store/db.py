"""`Store`: kscan's SQLite database, through one aiosqlite connection.

    async with Store.open(path) as st:      # None: the XDG default path
        await st.add_profile(build_id, release, version, data)
        await st.put_golden(build_id, boot_profile, regions, source_vm="vm-a")
        golden = await st.get_golden(build_id, boot_profile)
        blob = await st.get_golden_content(build_id, boot_profile, ".text")  # slow path

One connection, one worker thread (aiosqlite's), in autocommit mode: every write runs
in an explicit `BEGIN IMMEDIATE ... COMMIT`, so it takes the write lock up front and
waits up to `busy_timeout` for another process instead of failing mid-transaction.
WAL journal mode lets readers in other processes run while one process writes.

Calls from several tasks on one `Store` are serialized by an asyncio lock, so a
transaction never interleaves with another task's statements. If a caller is cancelled
during a write, the statements already queued to the worker thread finish, the
transaction is rolled back, and the CancelledError propagates (it is never wrapped).

Run states: OPEN after `Store.open` succeeds, CLOSED after the context exits; any call
on a closed store raises StoreError naming the operation.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import aiosqlite

from store import codec, schema
from store.errors import BundleError, SchemaError, StoreError
from store.models import (
    EventRow,
    GoldenInfo,
    GoldenRecord,
    GoldenRegion,
    ImportOutcome,
    ProfileInfo,
    ProfileRow,
)
from store.paths import default_db_path, prepare_db_file

__all__ = ["Store"]

DEFAULT_BUSY_TIMEOUT = 10.0   # seconds


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


log = logging.getLogger("kscan.store")

def _check_str(name: str, value: object, *, empty_ok: bool = False) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")
    if not empty_ok and not value:
        raise ValueError(f"{name} must not be empty")


class Store:
    """The kscan database. Create with `Store.open(...)`, not directly."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, schema_version: int) -> None:
        self._conn = conn
        self._path = path
        self._schema_version = schema_version
        self._state = _State.OPEN
        self._lock = asyncio.Lock()

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str | Path | None = None, *,
                   busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> AsyncIterator[Store]:
        """Open (creating and migrating as needed) the database at `path`.

        `None` means `default_db_path()`. `busy_timeout` (seconds) is how long a
        statement waits for another process's lock before failing with SQLITE_BUSY.
        Raises StoreError (SchemaError for a newer or foreign schema).
        """
        st = await cls._connect(default_db_path() if path is None else Path(path),
                                busy_timeout)
        try:
            yield st
        finally:
            await st.close()

    @classmethod
    async def _connect(cls, path: Path, busy_timeout: float) -> Store:
        where = str(path)
        with cls._guard_at(where, "open"):
            prepare_db_file(path)
            conn = aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
            try:
                await conn      # starts the worker thread
            except BaseException:
                # aiosqlite queues the thread's stop without waiting for it; wait here, or
                # the thread may report to an event loop that has closed meanwhile.
                conn._thread.join(timeout=5.0)
                raise
        try:
            with cls._guard_at(where, "open"):
                await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
                await conn.execute("PRAGMA foreign_keys = ON")
                # The first read of the file: a non-SQLite file fails here (NOTADB),
                # and a newer or foreign schema is refused before anything is written.
                # One read transaction, so the checks see one snapshot even while
                # another process is creating the schema.
                try:
                    await conn.execute("BEGIN")
                    version = await cls._check_schema(conn, where)
                finally:
                    with suppress(sqlite3.Error):
                        await conn.execute("ROLLBACK")
                mode = await cls._wal(conn, busy_timeout)
                if mode != "wal":
                    raise StoreError(f"cannot switch to WAL journal mode (got {mode!r})",
                                     path=where, operation="open",
                                     hint="put the database on a local file system")
            if version < schema.MIGRATIONS[-1].version:
                with cls._guard_at(where, "migrate"):
                    version = await cls._migrate(conn, where)
        except BaseException:
            with suppress(Exception):
                await conn.close()
            raise
        return cls(conn, path, version)

    @staticmethod
    async def _wal(conn: aiosqlite.Connection, busy_timeout: float) -> str:
        """Put the database in WAL mode (persistent: once set, every later open finds it)
        and return the mode. Switching needs the database to itself for a moment, and
        SQLite does not wait for that through the busy timeout: when processes open a new
        database at once, retry within the same timeout."""
        deadline = time.monotonic() + max(busy_timeout, 0.1)
        delay = 0.005
        while True:
            rows = list(await conn.execute_fetchall("PRAGMA journal_mode"))
            if rows and str(rows[0][0]).lower() == "wal":
                return "wal"
            try:
                rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
                return str(rows[0][0]).lower() if rows else "?"
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def close(self) -> None:
        """Close the connection and stop its thread. Idempotent."""
        if self._state is _State.CLOSED:
            return
        async with self._lock:
            if self.closed:   # closed by another task while we waited
                return
            self._state = _State.CLOSED
            with self._guard("close"):
                await self._conn.close()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def schema_version(self) -> int:
        """The schema version of the file (after migrations)."""
        return self._schema_version

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    # ------------------------------------------------------- schema and migrations

    @staticmethod
    async def _check_schema(conn: aiosqlite.Connection, where: str) -> int:
        """Return the file's schema version; refuse newer or foreign databases.

        Run inside a transaction: its reads must come from one snapshot.
        """
        supported = schema.MIGRATIONS[-1].version
        version = await _pragma_int(conn, "user_version")
        app_id = await _pragma_int(conn, "application_id")
        if app_id not in (0, schema.APPLICATION_ID):
            raise SchemaError(f"not a kscan database (application_id {app_id:#x})",
                              path=where, found=version, supported=supported,
                              hint="choose another database path")
        if version == 0 or app_id == 0:
            # A kscan database always has both set (by the same transaction); a file
            # with tables but without them belongs to something else: leave it alone.
            tables = [str(r[0]) for r in await conn.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            if tables:
                shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
                raise SchemaError(
                    f"not a kscan database (tables {shown}; user_version {version}, "
                    f"application_id {app_id:#x})", path=where, found=version,
                    supported=supported, hint="choose another database path")
        if version > supported:
            raise SchemaError(
                f"database schema version {version} is newer than this kscan supports "
                f"({supported})", path=where, found=version, supported=supported,
                hint="upgrade kscan to open this database")
        return version

    @classmethod
    async def _migrate(cls, conn: aiosqlite.Connection, where: str) -> int:
        """Apply pending migrations in one transaction; return the resulting version."""
        migrations = schema.MIGRATIONS
        try:
            await conn.execute("BEGIN IMMEDIATE")
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = await cls._check_schema(conn, where)
            pending = [m for m in migrations if m.version > version]
            notices = []
            for m in pending:
                if m.notice and m.notice_if:
                    (count,), = await conn.execute_fetchall(m.notice_if)
                    if count:
                        notices.append(m.notice)
                for statement in m.statements:
                    await conn.execute(statement)
            if pending:
                violations = list(await conn.execute_fetchall("PRAGMA foreign_key_check"))
                if violations:
                    raise StoreError(f"migration to v{pending[-1].version} leaves "
                                     f"{len(violations)} broken references",
                                     path=where, operation="migrate",
                                     hint="report this as a kscan bug")
                await conn.execute(f"PRAGMA user_version = {int(pending[-1].version)}")
                await conn.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
                version = pending[-1].version
            await conn.execute("COMMIT")
            for notice in notices:
                log.warning("%s: %s", where, notice)
        except BaseException:
            with suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise
        return version

    # ------------------------------------------------ the one error conversion

    @staticmethod
    @contextmanager
    def _guard_at(where: str, operation: str) -> Iterator[None]:
        """Convert sqlite3 and OS errors into StoreError. The only place that does."""
        try:
            yield
        except (sqlite3.Error, OSError) as err:
            raise StoreError.from_exception(err, path=where, operation=operation) from err

    def _guard(self, operation: str) -> AbstractContextManager[None]:
        return self._guard_at(str(self._path), operation)

    def _require_open(self, operation: str) -> aiosqlite.Connection:
        if self._state is not _State.OPEN:
            raise StoreError(f"store is {self._state.value}, needs to be open",
                             path=str(self._path), operation=operation,
                             hint="use the store inside its `async with Store.open(...)`")
        return self._conn

    @asynccontextmanager
    async def _reading(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        conn = self._require_open(operation)
        async with self._lock:
            conn = self._require_open(operation)
            with self._guard(operation):
                yield conn

    @asynccontextmanager
    async def _writing(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction: BEGIN IMMEDIATE, body, COMMIT; ROLLBACK on any error."""
        conn = self._require_open(operation)
        async with self._lock:
            conn = self._require_open(operation)
            with self._guard(operation):
                try:
                    # Inside the try: a caller cancelled while BEGIN is queued still gets
                    # its transaction begun by the worker thread, and must roll it back.
                    await conn.execute("BEGIN IMMEDIATE")
                    yield conn
                    await conn.execute("COMMIT")
                except BaseException:
                    # Queued behind any statement still running for a cancelled caller.
                    with suppress(sqlite3.Error):
                        await conn.execute("ROLLBACK")
                    raise

    # ----------------------------------------------------------------- profiles

    async def add_profile(self, build_id: str, release: str, version: str,
                          data: bytes, *, replace: bool = False) -> bool:
        """Store a kernel profile. False (and no change) if `build_id` is already stored,
        unless `replace` (a newer kscan read more out of the same image)."""
        _check_str("build_id", build_id)
        _check_str("release", release, empty_ok=True)
        _check_str("version", version, empty_ok=True)
        if not isinstance(data, bytes):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        async with self._writing("add_profile") as conn:
            cur = await conn.execute(
                "INSERT INTO profile (build_id, release, version, data, added_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (build_id) "
                + ("DO UPDATE SET data = excluded.data, release = excluded.release,"
                   " version = excluded.version" if replace else "DO NOTHING"),
                (build_id, release, version, data, time.time()))
            added = cur.rowcount == 1
            await cur.close()
        return added

    async def get_profile(self, build_id: str) -> ProfileRow | None:
        """The profile with this build id, or None."""
        async with self._reading("get_profile") as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT build_id, release, version, data, added_at FROM profile"
                " WHERE build_id = ?", (build_id,)))
        return _profile_row(rows[0]) if rows else None

    async def list_profiles(self) -> list[ProfileInfo]:
        """Every profile without its data (`size` gives its length), oldest first."""
        async with self._reading("list_profiles") as conn:
            rows = await conn.execute_fetchall(
                "SELECT build_id, release, version, added_at, length(data) FROM profile"
                " ORDER BY added_at, build_id")
        return [ProfileInfo(str(r[0]), str(r[1]), str(r[2]), float(r[3]), int(r[4]))
                for r in rows]

    async def profile_size(self, build_id: str) -> int | None:
        """The length of the stored profile's data (None if none): changes when the
        profile is replaced by a richer one (`add_profile(..., replace=True)`)."""
        async with self._reading("profile_size") as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT length(data) FROM profile WHERE build_id = ?", (build_id,)))
        return int(rows[0][0]) if rows else None

    async def find_profiles_by_release(self, release: str) -> list[ProfileRow]:
        """Profiles (with data) whose release (`uname -r`) equals `release`, oldest first."""
        async with self._reading("find_profiles_by_release") as conn:
            rows = await conn.execute_fetchall(
                "SELECT build_id, release, version, data, added_at FROM profile"
                " WHERE release = ? ORDER BY added_at, build_id", (release,))
        return [_profile_row(r) for r in rows]

    # ----------------------------------------------------------- golden baselines

    async def put_golden(self, build_id: str, boot_profile: str,
                         regions: Mapping[str, GoldenRegion], source_vm: str,
                         contents: Mapping[str, bytes] | None = None) -> None:
        """Store the golden baseline of (build_id, boot_profile), replacing any old one.

        `contents` optionally maps region names (each one a key of `regions`, ValueError
        otherwise) to opaque bytes, e.g. the compressed normalized bytes of the region;
        read them back one at a time with `get_golden_content` (`get_golden` never
        does). Regions without an entry have no stored content. The old baseline's
        contents are always dropped, even when `contents` is None, so a baseline is never
        paired with another one's bytes.

        Atomic: readers see the old baseline or the new one, never a mix. The profile of
        `build_id` must be stored first (StoreError otherwise). Arguments are checked
        before anything is written.
        """
        region_params, content_params = self._golden_params(
            build_id, boot_profile, source_vm, regions, contents)
        async with self._writing("put_golden") as conn:
            await self._write_golden(conn, (build_id, boot_profile), source_vm,
                                     time.time(), region_params, content_params)

    @staticmethod
    def _golden_params(build_id: str, boot_profile: str, source_vm: str,
                       regions: Mapping[str, GoldenRegion],
                       contents: Mapping[str, bytes] | None,
                       ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Check a golden baseline's fields; its golden_region and golden_content rows."""
        _check_str("build_id", build_id)
        _check_str("boot_profile", boot_profile, empty_ok=True)
        _check_str("source_vm", source_vm, empty_ok=True)
        if not regions:
            raise ValueError("a golden baseline needs at least one region")
        params = []
        for name, region in regions.items():
            _check_str("region name", name)
            if not isinstance(region, GoldenRegion):
                raise TypeError(f"region {name!r} must be a GoldenRegion, "
                                f"got {type(region).__name__}")
            params.append((build_id, boot_profile, name, region.size, region.region_hash,
                           region.page_hashes, region.per_boot, region.boots,
                           codec.encode(region.meta, f"regions[{name!r}].meta")))
        content_params = []
        if contents is not None:
            if not isinstance(contents, Mapping):
                raise TypeError(f"contents must be a mapping, got {type(contents).__name__}")
            unknown = sorted(repr(k) for k in contents if k not in regions)
            if unknown:
                raise ValueError(f"contents for regions not in the baseline: "
                                 f"{', '.join(unknown)}")
            for name, data in contents.items():
                if not isinstance(data, bytes):
                    raise TypeError(f"contents[{name!r}] must be bytes, "
                                    f"got {type(data).__name__}")
                content_params.append((build_id, boot_profile, name, data))
        return params, content_params

    @staticmethod
    async def _write_golden(conn: aiosqlite.Connection, key: tuple[str, str], source_vm: str,
                            created_at: float, region_params: list[tuple[Any, ...]],
                            content_params: list[tuple[Any, ...]]) -> None:
        """Replace the golden baseline `key`, inside the caller's transaction."""
        for table in ("golden_content", "golden_region", "golden"):
            await conn.execute(f"DELETE FROM {table} WHERE build_id = ?"
                               " AND boot_profile = ?", key)
        await conn.execute("INSERT INTO golden (build_id, boot_profile, source_vm,"
                           " created_at) VALUES (?, ?, ?, ?)", (*key, source_vm, created_at))
        await conn.executemany(
            "INSERT INTO golden_region (build_id, boot_profile, name, size, region_hash,"
            " page_hashes, per_boot, boots, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            region_params)
        if content_params:
            await conn.executemany(
                "INSERT INTO golden_content (build_id, boot_profile, name, data)"
                " VALUES (?, ?, ?, ?)", content_params)

    async def get_golden(self, build_id: str,
                         boot_profile: str) -> dict[str, GoldenRegion] | None:
        """The regions of the golden baseline, by region name; None if there is none."""
        async with self._reading("get_golden") as conn:
            regions = await _golden_regions(conn, build_id, boot_profile)
        return regions or None

    async def get_golden_record(self, build_id: str, boot_profile: str) -> GoldenRecord | None:
        """The whole golden baseline — regions, contents, source VM, time — read in one
        snapshot (never half of an old baseline and half of a new one); None if none."""
        async with self._reading("get_golden_record") as conn:
            try:
                await conn.execute("BEGIN")
                return await _golden_record(conn, build_id, boot_profile)
            finally:
                with suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")

    async def get_golden_content(self, build_id: str, boot_profile: str,
                                 name: str) -> bytes | None:
        """The bytes stored for region `name` by `put_golden(..., contents=...)`, as given;
        None if the baseline, the region or its content is not stored."""
        async with self._reading("get_golden_content") as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT data FROM golden_content WHERE build_id = ? AND boot_profile = ?"
                " AND name = ?", (build_id, boot_profile, name)))
        return bytes(rows[0][0]) if rows else None

    async def list_golden(self) -> list[GoldenInfo]:
        """Every stored golden baseline, without hashes, by build id and boot profile."""
        async with self._reading("list_golden") as conn:
            rows = await conn.execute_fetchall(
                "SELECT g.build_id, g.boot_profile, g.source_vm, g.created_at, r.name"
                " FROM golden g JOIN golden_region r"
                " ON r.build_id = g.build_id AND r.boot_profile = g.boot_profile"
                " ORDER BY g.build_id, g.boot_profile, r.name")
        grouped: dict[tuple[str, str], tuple[str, float, list[str]]] = {}
        for r in rows:
            entry = grouped.setdefault((str(r[0]), str(r[1])), (str(r[2]), float(r[3]), []))
            entry[2].append(str(r[4]))
        return [GoldenInfo(build_id=b, boot_profile=p, source_vm=vm, created_at=at,
                           regions=tuple(names))
                for (b, p), (vm, at, names) in grouped.items()]

    # --------------------------------------------------------------- per-VM state

    async def delete_golden(self, build_id: str, boot_profile: str | None,
                            event: Mapping[str, Any]) -> list[str]:
        """Remove the golden baseline (`build_id`, `boot_profile`), or every one of
        `build_id` when `boot_profile` is None, with their regions and content; append
        `event` (extended with `removed`) to the log in the same transaction. Returns the
        boot profiles removed (none: nothing was written)."""
        _event_row(event)
        async with self._writing("delete_golden") as conn:
            sql, params = "SELECT boot_profile FROM golden WHERE build_id = ?", [build_id]
            if boot_profile is not None:
                sql += " AND boot_profile = ?"
                params.append(boot_profile)
            keys = [str(r[0]) for r in await conn.execute_fetchall(sql, params)]
            for key in keys:
                await conn.execute("DELETE FROM golden WHERE build_id = ? AND "
                                   "boot_profile = ?", (build_id, key))
            if keys:
                await self._insert_event(conn, _event_row({**event, "removed": keys}),
                                         "delete_golden")
        return keys

    async def delete_profile(self, build_id: str, event: Mapping[str, Any], *,
                             with_golden: bool = False) -> list[str] | None:
        """Remove the profile `build_id`; None if it is not stored. Its golden baselines
        need it: StoreError while any is stored, unless `with_golden` (then they go in
        the same transaction). `event` (extended with `golden_removed`) is appended to
        the log in that transaction. Returns the boot profiles of the baselines removed."""
        _event_row(event)
        async with self._writing("delete_profile") as conn:
            if not list(await conn.execute_fetchall(
                    "SELECT 1 FROM profile WHERE build_id = ?", (build_id,))):
                return None
            keys = [str(r[0]) for r in await conn.execute_fetchall(
                "SELECT boot_profile FROM golden WHERE build_id = ? ORDER BY boot_profile",
                (build_id,))]
            if keys and not with_golden:
                raise StoreError(f"profile {build_id} is needed by {len(keys)} golden "
                                 f"baseline(s) ({', '.join(keys[:3])}"
                                 + (", ..." if len(keys) > 3 else "") + ")",
                                 path=str(self._path), operation="delete_profile",
                                 hint="remove them first (kscan baseline rm), or pass "
                                      "--force to remove them with it")
            await conn.execute("DELETE FROM golden WHERE build_id = ?", (build_id,))
            await conn.execute("DELETE FROM profile WHERE build_id = ?", (build_id,))
            await self._insert_event(conn, _event_row({**event, "golden_removed": keys}),
                                     "delete_profile")
        return keys

    async def put_vm_state(self, vm_id: str, state: Mapping[str, Any]) -> None:
        """Replace the state of VM `vm_id` (plain data, bytes allowed; see store.codec)."""
        _check_str("vm_id", vm_id)
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        text = codec.encode(dict(state), f"state of {vm_id}")
        async with self._writing("put_vm_state") as conn:
            await conn.execute(
                "INSERT INTO vm_state (vm_id, state, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (vm_id) DO UPDATE SET state = excluded.state,"
                " updated_at = excluded.updated_at", (vm_id, text, time.time()))

    async def get_vm_state(self, vm_id: str) -> dict[str, Any] | None:
        """The state last put for `vm_id`, or None."""
        async with self._reading("get_vm_state") as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT state FROM vm_state WHERE vm_id = ?", (vm_id,)))
        if not rows:
            return None
        state = codec.decode(rows[0][0])
        if not isinstance(state, dict):
            raise StoreError(f"state of VM {vm_id} is not a JSON object", path=str(self._path),
                             operation="get_vm_state", hint="delete the VM's state")
        return state

    async def delete_vm_state(self, vm_id: str) -> bool:
        """Forget the state of `vm_id`; True if there was one."""
        async with self._writing("delete_vm_state") as conn:
            cur = await conn.execute("DELETE FROM vm_state WHERE vm_id = ?", (vm_id,))
            deleted = cur.rowcount > 0
            await cur.close()
        return deleted

    async def put_resume(self, vm_id: str, state: bytes) -> None:
        """Replace what VM `vm_id` resumes from after a restart (opaque bytes). The VM's
        per-VM state must be stored (StoreError otherwise); deleting it deletes this."""
        _check_str("vm_id", vm_id)
        if not isinstance(state, bytes):
            raise TypeError(f"state must be bytes, got {type(state).__name__}")
        async with self._writing("put_resume") as conn:
            await conn.execute(
                "INSERT INTO vm_resume (vm_id, state, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (vm_id) DO UPDATE SET state = excluded.state,"
                " updated_at = excluded.updated_at", (vm_id, state, time.time()))

    async def get_resume(self, vm_id: str) -> bytes | None:
        """What `put_resume` stored for `vm_id`, or None."""
        async with self._reading("get_resume") as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT state FROM vm_resume WHERE vm_id = ?", (vm_id,)))
        return bytes(rows[0][0]) if rows else None

    async def delete_resume(self, vm_id: str) -> bool:
        """Forget what `vm_id` resumes from; True if there was something."""
        async with self._writing("delete_resume") as conn:
            cur = await conn.execute("DELETE FROM vm_resume WHERE vm_id = ?", (vm_id,))
            deleted = cur.rowcount > 0
            await cur.close()
        return deleted

    # ------------------------------------------------------------ hash key id

    async def get_key_id(self) -> str | None:
        """The id of the host key the stored hashes were made under (None: never set,
        e.g. a database from before keyed hashes)."""
        async with self._reading("get_key_id") as conn:
            rows = list(await conn.execute_fetchall("SELECT key_id FROM hash_key"))
        return str(rows[0][0]) if rows else None

    async def list_vm_ids(self) -> list[str]:
        """The VMs with a stored per-VM state."""
        async with self._reading("list_vm_ids") as conn:
            rows = await conn.execute_fetchall("SELECT vm_id FROM vm_state ORDER BY vm_id")
        return [str(r[0]) for r in rows]

    async def rekey(self, key_id: str, *, expect: str | None,
                    goldens: Mapping[tuple[str, str], Mapping[str, GoldenRegion]],
                    drop_golden: Sequence[tuple[str, str]] = (),
                    vm_states: Mapping[str, Mapping[str, Any]] | None = None) -> bool:
        """In one transaction, if the stored key id is still `expect`: replace the hashes
        of the golden baselines in `goldens` ((build id, boot profile) → regions; their
        contents, source and time stay), delete those of `drop_golden`, replace the
        per-VM states in `vm_states` and delete every other one, delete every resume
        record (they hold hashes), and record `key_id`. False (nothing written) if
        another process re-keyed meanwhile."""
        _check_str("key_id", key_id)
        states = {vm: codec.encode(dict(s), f"state of {vm}")
                  for vm, s in (vm_states or {}).items()}
        async with self._writing("rekey") as conn:
            rows = list(await conn.execute_fetchall("SELECT key_id FROM hash_key"))
            if (str(rows[0][0]) if rows else None) != expect:
                return False
            for (build_id, boot_profile), regions in goldens.items():
                for name, r in regions.items():
                    await conn.execute(
                        "UPDATE golden_region SET region_hash = ?, page_hashes = ?"
                        " WHERE build_id = ? AND boot_profile = ? AND name = ?",
                        (r.region_hash, r.page_hashes, build_id, boot_profile, name))
            for key in drop_golden:
                for table in ("golden_content", "golden_region", "golden"):
                    await conn.execute(f"DELETE FROM {table} WHERE build_id = ?"
                                       " AND boot_profile = ?", key)
            await conn.execute("DELETE FROM vm_resume")
            for (vm_id,) in list(await conn.execute_fetchall("SELECT vm_id FROM vm_state")):
                if vm_id in states:
                    await conn.execute("UPDATE vm_state SET state = ? WHERE vm_id = ?",
                                       (states[vm_id], vm_id))
                else:
                    await conn.execute("DELETE FROM vm_state WHERE vm_id = ?", (vm_id,))
            await conn.execute(
                "INSERT INTO hash_key (one, key_id, set_at) VALUES (1, ?, ?)"
                " ON CONFLICT (one) DO UPDATE SET key_id = excluded.key_id,"
                " set_at = excluded.set_at", (key_id, time.time()))
        return True

    # ------------------------------------------------------------------ event log

    async def append_event(self, event: Mapping[str, Any]) -> int:
        """Append an event (needs `ts` float, `event` str, `vm` str); return its id."""
        row = _event_row(event)
        async with self._writing("append_event") as conn:
            row_id = await self._insert_event(conn, row, "append_event")
        return row_id

    async def _insert_event(self, conn: aiosqlite.Connection,
                            row: tuple[float, str, str, str], operation: str) -> int:
        cur = await conn.execute(
            "INSERT INTO event (ts, event, vm, detail) VALUES (?, ?, ?, ?)", row)
        row_id = cur.lastrowid
        await cur.close()
        if row_id is None:   # pragma: no cover - SQLite always sets it after an INSERT
            raise StoreError("INSERT gave no row id", path=str(self._path),
                             operation=operation)
        return row_id

    # ------------------------------------------------------------------ import

    async def bundle_sequences(self, key_id: str) -> tuple[int | None, int | None]:
        """(newest sequence imported, last sequence exported) with signing key `key_id`."""
        async with self._reading("bundle_sequences") as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT imported_seq, exported_seq FROM bundle_key WHERE key_id = ?",
                (key_id,)))
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    async def next_export_sequence(self, key_id: str, floor: int) -> int:
        """The sequence number of a new bundle signed with `key_id`: above every one this
        database exported with it, and at least `floor`; recorded at once."""
        async with self._writing("next_export_sequence") as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT exported_seq FROM bundle_key WHERE key_id = ?", (key_id,)))
            last = rows[0][0] if rows and rows[0][0] is not None else -1
            seq = max(int(floor), last + 1)
            await conn.execute(
                "INSERT INTO bundle_key (key_id, exported_seq, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key_id) DO UPDATE SET exported_seq = excluded.exported_seq,"
                " updated_at = excluded.updated_at", (key_id, seq, time.time()))
        return seq

    async def import_records(self, profiles: Sequence[tuple[ProfileRow, bool]],
                             goldens: Sequence[GoldenRecord], *, replace_golden: bool,
                             event: Mapping[str, Any],
                             signer: tuple[str, int | None, str] | None = None,
                             allow_older: bool = False) -> ImportOutcome:
        """Merge records from elsewhere (a verified baseline bundle) in ONE transaction,
        with `event` (its `ts`, `event`, `vm` as for `append_event`) appended to the event
        log in that same transaction, its detail extended with `outcome`
        (`ImportOutcome.to_json()`): all of it is written, or none.

        `profiles`: (row, upgrade) pairs; a build id not stored is added; one stored is
        kept, or replaced by `row` when `upgrade` (the caller judged it richer).
        `goldens`: merged by (build id, boot profile): added when none is stored; left
        alone when the stored one has the same hashes (`GoldenRecord.same_hashes`);
        otherwise replaced if `replace_golden`, else the stored one is kept. The decisions
        are taken inside the transaction, so a baseline written meanwhile by another
        process is never overwritten unseen. Each golden's profile must be stored or
        among `profiles` (StoreError otherwise, and nothing is written).

        `signer`: (key id, sequence, name for messages) of the bundle (sequence None: a
        format-1 bundle, which has none). A bundle older than the newest imported from that key, or
        without a sequence, is refused (BundleError, nothing written) unless
        `allow_older`. A bundle not newer than that (the same one again, or an older one
        let in) adds no golden baseline missing here unless `replace_golden`: those are
        `golden_not_restored` (deleted here since, as far as kscan can tell). The newest
        sequence imported from the key is kept.
        """
        for row, _ in profiles:
            if not isinstance(row, ProfileRow):
                raise TypeError(f"profiles must hold ProfileRow, got {type(row).__name__}")
        golden_params = [(g, self._golden_params(g.build_id, g.boot_profile, g.source_vm,
                                                 g.regions, g.contents)) for g in goldens]
        _event_row(event)   # checked before anything is written
        p_added: list[str] = []
        p_upgraded: list[str] = []
        p_kept: list[str] = []
        g_out: dict[str, list[tuple[str, str]]] = {
            "added": [], "unchanged": [], "replaced": [], "kept_local": [],
            "not_restored": []}
        async with self._writing("import_records") as conn:
            restore_missing = True
            if signer is not None:
                restore_missing = await self._check_sequence(conn, *signer, allow_older)
                restore_missing = restore_missing or replace_golden
            for row, upgrade in profiles:
                cur = await conn.execute(
                    "INSERT INTO profile (build_id, release, version, data, added_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (build_id) DO NOTHING",
                    (row.build_id, row.release, row.version, row.data, time.time()))
                added = cur.rowcount == 1
                await cur.close()
                if added:
                    p_added.append(row.build_id)
                elif upgrade:
                    await conn.execute(
                        "UPDATE profile SET data = ?, release = ?, version = ?"
                        " WHERE build_id = ?",
                        (row.data, row.release, row.version, row.build_id))
                    p_upgraded.append(row.build_id)
                else:
                    p_kept.append(row.build_id)
            for g, (region_params, content_params) in golden_params:
                key = (g.build_id, g.boot_profile)
                local = await _golden_record(conn, *key)
                if local is None and not restore_missing:
                    g_out["not_restored"].append(key)
                    continue
                if local is None:
                    verdict = "added"
                elif local.same_hashes(g):
                    g_out["unchanged"].append(key)
                    continue
                elif replace_golden:
                    verdict = "replaced"
                else:
                    g_out["kept_local"].append(key)
                    continue
                await self._write_golden(conn, key, g.source_vm, g.created_at,
                                         region_params, content_params)
                g_out[verdict].append(key)
            outcome = ImportOutcome(
                tuple(p_added), tuple(p_upgraded), tuple(p_kept),
                *(tuple(g_out[k]) for k in ("added", "unchanged", "replaced", "kept_local",
                                             "not_restored")))
            await self._insert_event(conn, _event_row({**event, "outcome": outcome.to_json()}),
                                     "import_records")
        return outcome

    async def _check_sequence(self, conn: aiosqlite.Connection, key_id: str,
                              sequence: int | None, name: str, allow_older: bool) -> bool:
        """Inside `import_records`' transaction: refuse a bundle older than the newest
        imported from `key_id` (or without a sequence) unless `allow_older`; record a
        newer one. Whether the bundle is newer than every one imported before."""
        rows = list(await conn.execute_fetchall(
            "SELECT imported_seq FROM bundle_key WHERE key_id = ?", (key_id,)))
        newest: int | None = rows[0][0] if rows else None
        if sequence is None:
            if not allow_older:
                raise BundleError(
                    "a format-1 bundle has no sequence number: kscan cannot tell it from "
                    "an old bundle replayed", path=name,
                    hint="re-export it with this kscan, or import with --allow-older")
            return False
        if newest is not None and sequence < newest and not allow_older:
            raise BundleError(
                f"bundle sequence {sequence} is older than the newest imported from key "
                f"{key_id[:16]} ({newest}): an old bundle replayed would bring back what "
                "was replaced or deleted since", path=name,
                hint="import the newest bundle of that signer, or --allow-older")
        if newest is None or sequence > newest:
            await conn.execute(
                "INSERT INTO bundle_key (key_id, imported_seq, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key_id) DO UPDATE SET imported_seq = excluded.imported_seq,"
                " updated_at = excluded.updated_at", (key_id, sequence, time.time()))
            return True
        return False

    async def prune_events(self, before: float,
                           keep_last_of: tuple[str, ...] = ("tamper",)) -> int:
        """Delete events older than `before` (Unix time), except the newest event of
        each type in `keep_last_of` per VM (the last tamper of a VM is never pruned);
        return how many were deleted. The append-only trigger is lifted only inside
        this one transaction."""
        if not math.isfinite(before):
            raise ValueError(f"before must be finite, got {before!r}")
        marks = ",".join("?" * len(keep_last_of)) or "NULL"
        async with self._writing("prune_events") as conn:
            await conn.execute("DROP TRIGGER event_no_delete")
            cur = await conn.execute(
                f"""DELETE FROM event WHERE ts < ? AND id NOT IN (
                        SELECT max(id) FROM event WHERE event IN ({marks})
                        GROUP BY vm, event)""",
                (float(before), *keep_last_of))
            deleted = cur.rowcount
            await cur.close()
            await conn.execute(schema.EVENT_NO_DELETE)
        return max(0, deleted)

    async def events(self, vm: str | None = None, since_id: int = 0,
                     limit: int = 1000) -> list[EventRow]:
        """Events with id > `since_id` (of `vm` only, if given), oldest first, at most
        `limit`. Page on with `since_id=rows[-1].id`."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        sql = "SELECT id, ts, event, vm, detail FROM event WHERE id > ?"
        params: tuple[Any, ...] = (since_id,)
        if vm is not None:
            sql += " AND vm = ?"
            params += (vm,)
        async with self._reading("events") as conn:
            rows = await conn.execute_fetchall(sql + " ORDER BY id LIMIT ?", (*params, limit))
        return [EventRow(id=int(r[0]), ts=float(r[1]), event=str(r[2]), vm=str(r[3]),
                         detail=codec.decode(r[4])) for r in rows]


async def _pragma_int(conn: aiosqlite.Connection, name: str) -> int:
    rows = list(await conn.execute_fetchall(f"PRAGMA {name}"))
    return int(rows[0][0])


def _event_row(event: Mapping[str, Any]) -> tuple[float, str, str, str]:
    """An event's (ts, event, vm, detail) columns; TypeError/ValueError if malformed."""
    ts = event.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise TypeError(f"event['ts'] must be a float (Unix time), got {ts!r}")
    if not math.isfinite(ts):
        raise ValueError(f"event['ts'] must be finite, got {ts!r}")
    kind, vm = event.get("event"), event.get("vm")
    _check_str("event['event']", kind)
    _check_str("event['vm']", vm, empty_ok=True)
    assert isinstance(kind, str) and isinstance(vm, str)
    detail = {k: v for k, v in event.items() if k not in ("ts", "event", "vm")}
    return float(ts), kind, vm, codec.encode(detail, "event")


async def _golden_regions(conn: aiosqlite.Connection, build_id: str,
                          boot_profile: str) -> dict[str, GoldenRegion]:
    rows = await conn.execute_fetchall(
        "SELECT name, size, region_hash, page_hashes, per_boot, boots, meta"
        " FROM golden_region WHERE build_id = ? AND boot_profile = ?"
        " ORDER BY name", (build_id, boot_profile))
    return {str(r[0]): GoldenRegion(size=int(r[1]), region_hash=bytes(r[2]),
                                    page_hashes=bytes(r[3]), per_boot=bytes(r[4]),
                                    boots=int(r[5]), meta=codec.decode(r[6]))
            for r in rows}


async def _golden_record(conn: aiosqlite.Connection, build_id: str,
                         boot_profile: str) -> GoldenRecord | None:
    """The golden baseline `(build_id, boot_profile)`, read with `conn` (the caller holds
    the transaction that makes the reads one snapshot)."""
    rows = list(await conn.execute_fetchall(
        "SELECT source_vm, created_at FROM golden WHERE build_id = ? AND boot_profile = ?",
        (build_id, boot_profile)))
    if not rows:
        return None
    regions = await _golden_regions(conn, build_id, boot_profile)
    contents = {str(r[0]): bytes(r[1]) for r in await conn.execute_fetchall(
        "SELECT name, data FROM golden_content WHERE build_id = ? AND boot_profile = ?"
        " ORDER BY name", (build_id, boot_profile))}
    return GoldenRecord(build_id, boot_profile, str(rows[0][0]), float(rows[0][1]),
                        regions, contents)


def _profile_row(r: Any) -> ProfileRow:
    return ProfileRow(build_id=str(r[0]), release=str(r[1]), version=str(r[2]),
                      data=bytes(r[3]), added_at=float(r[4]))

"""Reading kscan's database without writing a byte: `kscan status` and `kscan events`.

`Store.open` creates, migrates and takes locks; an operator's look at the database
must do none of that, must work while `kscan run` writes it, and must never leave the
service waiting. `Reader` opens the file through a read-only SQLite URI
(`file:...?mode=ro`): WAL lets it read a consistent snapshot while `run` commits, and
it never takes the write lock. A file that does not exist is not created
(StoreError, naming the path); a file of a newer or foreign schema is refused as
`Store.open` would.

Synchronous (sqlite3): these commands read a few thousand rows and exit; the one
`--follow` loop polls with `after_id`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from store import codec, schema
from store.errors import SchemaError, StoreError
from store.models import EventRow, GoldenInfo, ProfileInfo
from store.paths import default_db_path

__all__ = ["Reader"]

#: Seconds a read waits for a lock (a checkpoint of `run`) before failing.
BUSY_TIMEOUT = 5.0


class Reader:
    """A read-only view of the database; use `with Reader.open(path) as r:`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    @contextmanager
    def open(cls, path: str | Path | None) -> Iterator[Reader]:
        """`path`: None for `default_db_path()` (KSCAN_DB, the service's, XDG)."""
        p = default_db_path() if path is None else Path(path)
        where = str(p)
        if not p.is_file():
            raise StoreError("no such database", path=where, operation="open read-only",
                             hint="kscan run creates it; pass --db or set KSCAN_DB to "
                                  "the service's database")
        uri = f"file:{quote(str(p.resolve()))}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT,
                                   check_same_thread=False)
        except sqlite3.Error as err:
            raise StoreError.from_exception(err, path=where,
                                            operation="open read-only") from err
        with closing(conn):
            reader = cls(conn, p)
            with reader._guard("open read-only"):
                reader._check_schema()
            yield reader

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one snapshot of the database (a read transaction: keep it
        short, it holds back `run`'s WAL checkpoints while open)."""
        with self._guard("snapshot"):
            self._conn.execute("BEGIN")
        try:
            yield
        finally:
            with self._guard("snapshot"):
                self._conn.execute("ROLLBACK")

    @contextmanager
    def _guard(self, operation: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            raise StoreError.from_exception(err, path=str(self.path),
                                            operation=operation) from err

    def _check_schema(self) -> None:
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        app_id = int(self._conn.execute("PRAGMA application_id").fetchone()[0])
        supported = schema.SCHEMA_VERSION
        if app_id != schema.APPLICATION_ID or version == 0:
            raise SchemaError(f"not a kscan database (application_id {app_id:#x}, "
                              f"user_version {version})", path=str(self.path),
                              found=version, supported=supported,
                              hint="choose another database path")
        if version > supported:
            raise SchemaError(f"database schema version {version} is newer than this "
                              f"kscan supports ({supported})", path=str(self.path),
                              found=version, supported=supported,
                              hint="upgrade kscan to read this database")
        self.version = version

    def _rows(self, operation: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._guard(operation):
            return list(self._conn.execute(sql, tuple(params)))

    # ------------------------------------------------------------------ reads

    def event_vms(self) -> list[str]:
        """Every VM name the event log holds events of."""
        return [str(r[0]) for r in self._rows(
            "event_vms", "SELECT DISTINCT vm FROM event WHERE vm != '' ORDER BY vm")]

    def last_events(self, vm: str, types: Sequence[str], limit: int = 1) -> list[EventRow]:
        """The newest events of `vm` among `types`, newest first."""
        marks = ",".join("?" * len(types)) or "NULL"
        rows = self._rows("last_events", "SELECT id, ts, event, vm, detail FROM event "
                          f"WHERE vm = ? AND event IN ({marks}) ORDER BY id DESC LIMIT ?",
                          (vm, *types, limit))
        return [_event(r) for r in rows]

    def events(self, *, vm: str | None = None, since: float | None = None,
               types: Sequence[str] = (), after_id: int = 0,
               limit: int = 1000, newest: bool = False) -> list[EventRow]:
        """Events oldest first: with id > `after_id`, of `vm` ('' for kscan's own), at
        or after `since` (Unix time), of one of `types` (all when empty); at most
        `limit` — the first ones, or with `newest` the last ones."""
        sql = "SELECT id, ts, event, vm, detail FROM event WHERE id > ?"
        params: list[Any] = [after_id]
        if vm is not None:
            sql += " AND vm = ?"
            params.append(vm)
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        if types:
            sql += f" AND event IN ({','.join('?' * len(types))})"
            params.extend(types)
        order = "DESC" if newest else "ASC"
        rows = [_event(r) for r in self._rows("events", f"{sql} ORDER BY id {order} LIMIT ?",
                                              (*params, max(1, limit)))]
        return rows[::-1] if newest else rows

    def last_event_id(self) -> int:
        rows = self._rows("last_event_id", "SELECT max(id) FROM event")
        return int(rows[0][0] or 0)

    def profiles(self) -> list[ProfileInfo]:
        return [ProfileInfo(build_id=str(r[0]), release=str(r[1]), version=str(r[2]),
                            added_at=float(r[3]), size=int(r[4])) for r in self._rows(
            "profiles", "SELECT build_id, release, version, added_at, length(data)"
            " FROM profile ORDER BY release, build_id")]

    def goldens(self) -> list[GoldenInfo]:
        grouped: dict[tuple[str, str], tuple[str, float, list[str]]] = {}
        for r in self._rows("goldens", "SELECT g.build_id, g.boot_profile, g.source_vm,"
                            " g.created_at, r.name FROM golden g JOIN golden_region r"
                            " ON r.build_id = g.build_id AND r.boot_profile = g.boot_profile"
                            " ORDER BY g.build_id, g.boot_profile, r.name"):
            entry = grouped.setdefault((str(r[0]), str(r[1])), (str(r[2]), float(r[3]), []))
            entry[2].append(str(r[4]))
        return [GoldenInfo(b, k, src, at, tuple(names))
                for (b, k), (src, at, names) in grouped.items()]

    def golden_boots(self) -> dict[tuple[str, str], int]:
        """Verified boots merged into each golden baseline (its regions' most)."""
        return {(str(r[0]), str(r[1])): int(r[2]) for r in self._rows(
            "golden_boots", "SELECT build_id, boot_profile, max(boots) FROM golden_region"
            " GROUP BY build_id, boot_profile")}


def _event(r: Any) -> EventRow:
    try:
        detail = codec.decode(r[4])
    except (ValueError, TypeError):
        detail = {"undecodable_detail": True}
    if not isinstance(detail, dict):
        detail = {"detail": detail}
    return EventRow(id=int(r[0]), ts=float(r[1]), event=str(r[2]), vm=str(r[3]),
                    detail=detail)

"""Errors of the store: the database cannot be opened, migrated, read or written.

    KscanError
    ├── StoreError                 path, operation, sqlite_error (e.g. "SQLITE_NOTADB")
    │   └── SchemaError            found / supported schema versions, foreign databases
    ├── BundleError                a baseline bundle is refused (store.bundle): path, why
    └── KeyFileError               a signing or trusted key file cannot be used: path, why

Third-party errors (`sqlite3.Error`, which aiosqlite re-raises unchanged, and `OSError`
from creating the file) are converted in exactly one place, `StoreError.from_exception`,
called only by `store.db.Store._guard`, always as `raise ... from err`.

Caller mistakes (a value that cannot be stored, a bad argument) are not StoreErrors:
they raise `TypeError`/`ValueError` at the call, before anything touches the database.
"""

from __future__ import annotations

import errno
import sqlite3

from kscan.errors import KscanError

# What the operator should do, by SQLite (extended) error name. The first prefix that
# matches wins, so the extended names come before their primary code.
_SQLITE_HINTS: tuple[tuple[str, str], ...] = (
    ("SQLITE_NOTADB", "the file is not an SQLite database: choose another database path "
                      "or move the file aside"),
    ("SQLITE_CORRUPT", "the database is damaged: restore it from a backup or move it aside "
                       "to start a new one"),
    ("SQLITE_BUSY", "another process kept the database locked longer than the busy "
                    "timeout: retry, or open the store with a longer busy_timeout"),
    ("SQLITE_LOCKED", "the database is locked by another statement: retry"),
    ("SQLITE_READONLY", "the database file or its directory is not writable by this user"),
    ("SQLITE_CANTOPEN", "check that the directory exists and is writable by this user"),
    ("SQLITE_PERM", "check the permissions of the database file and its directory"),
    ("SQLITE_FULL", "the disk is full: free some space"),
    ("SQLITE_IOERR", "the disk reported an I/O error: check the file system"),
    ("SQLITE_CONSTRAINT_FOREIGNKEY", "store the kernel profile of this build id before "
                                     "its golden baseline"),
    ("SQLITE_CONSTRAINT_TRIGGER", "the event log is append-only"),
)


class StoreError(KscanError):
    """The database at `path` failed during `operation` (open, migrate, put_golden, ...)."""

    def __init__(self, message: str, *, path: str, operation: str,
                 sqlite_error: str | None = None, hint: str = "") -> None:
        self.path = path
        self.operation = operation
        #: SQLite's (extended) error name when SQLite raised it, e.g. "SQLITE_BUSY".
        self.sqlite_error = sqlite_error
        super().__init__(f"store {path}: {operation}: {message}", hint=hint)

    @classmethod
    def from_exception(cls, err: sqlite3.Error | OSError, *, path: str,
                       operation: str) -> StoreError:
        """Convert a sqlite3 or OS error; the caller raises the result `from err`."""
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            if err.filename is not None and str(err.filename) != path:
                reason = f"{err.filename}: {reason}"
            hint = ""
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                hint = "check the permissions of the database file and its directory"
            elif err.errno == errno.ENOSPC:
                hint = "the disk is full: free some space"
            elif err.errno == errno.EISDIR:
                hint = "the database path names a directory: give a file path"
            return cls(reason, path=path, operation=operation, hint=hint)
        name = getattr(err, "sqlite_errorname", None)
        hint = ""
        if isinstance(name, str):
            hint = next((h for prefix, h in _SQLITE_HINTS if name.startswith(prefix)), "")
        else:
            name = None
        return cls(str(err), path=path, operation=operation, sqlite_error=name, hint=hint)


class SchemaError(StoreError):
    """The file's schema cannot be used: newer than this kscan, or not a kscan database.

    `found` is the file's `PRAGMA user_version`; `supported` the newest version this
    code knows.
    """

    def __init__(self, message: str, *, path: str, found: int, supported: int,
                 hint: str = "") -> None:
        self.found = found
        self.supported = supported
        super().__init__(message, path=path, operation="open", hint=hint)


class BundleError(KscanError):
    """A baseline bundle (`store.bundle`) is refused: unreadable, malformed, over a limit,
    signed by another key, or modified. Nothing has been written when it is raised."""

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        self.path = path
        super().__init__(f"bundle {path}: {message}", hint=hint)


class KeyFileError(KscanError):
    """An Ed25519 key file (PEM) cannot be used: missing, not PEM, another algorithm."""

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        self.path = path
        super().__init__(f"key {path}: {message}", hint=hint)

"""The host's secret hash key: 32 random bytes in a file beside the database.

Everything kscan compares is keyed under it (`scanner.hashing`). The file is `<db>.key`
(for `kscan.db`, `kscan.db.key`), created at first use with O_CREAT|O_EXCL|O_NOFOLLOW
and mode 0600 (owned like the database file when kscan runs as root), and only ever
read by kscan: never printed, logged, exported in a bundle or sent anywhere. A key file
that is not a regular file of exactly `KEY_SIZE` bytes, or that others can read, is
refused rather than used. `kscan key rotate` replaces it (`rotate`), then re-hashes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from store.errors import KeyFileError
from store.paths import DB_FILE_MODE

__all__ = ["KEY_SIZE", "key_path", "load_or_create", "rotate"]

KEY_SIZE = 32


def key_path(db_path: Path) -> Path:
    """Where the key of the database at `db_path` lives."""
    return db_path.with_name(db_path.name + ".key")


def _owner_like(fd: int, db_path: Path) -> None:
    """As root, give the key file the database file's owner and group."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(db_path)
    except FileNotFoundError:
        return
    os.fchown(fd, st.st_uid, st.st_gid)


def _create(path: Path, db_path: Path, key: bytes, *, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    fd = os.open(path, flags, DB_FILE_MODE)
    try:
        os.fchmod(fd, DB_FILE_MODE)
        _owner_like(fd, db_path)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise KeyFileError(f"cannot open the hash key: {err.strerror}", path=str(path),
                           hint="it must be a regular file readable by kscan") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError("the hash key is not a regular file", path=str(path))
        if st.st_mode & 0o077:
            raise KeyFileError(f"the hash key is readable by others (mode "
                               f"{stat.S_IMODE(st.st_mode):04o})", path=str(path),
                               hint="chmod 600 it, then `kscan key rotate`: it may be known")
        data = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:
        raise KeyFileError(f"the hash key is {len(data)} bytes, not {KEY_SIZE}",
                           path=str(path), hint="`kscan key rotate` makes a new one")
    return data


def load_or_create(db_path: Path) -> tuple[bytes, bool]:
    """The key of the database at `db_path`, made if there is none; and whether it was
    made just now. Raises KeyFileError."""
    path = key_path(db_path)
    try:
        _create(path, db_path, os.urandom(KEY_SIZE), exclusive=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as err:
        raise KeyFileError(f"cannot create the hash key: {err.strerror}",
                           path=str(path)) from err
    return _read(path), created


def rotate(db_path: Path) -> bytes:
    """Replace the key with a new random one (written beside it, then renamed over it,
    so a reader sees the old key or the new one); return it."""
    path = key_path(db_path)
    tmp = path.with_name(path.name + f".new.{os.getpid()}")
    key = os.urandom(KEY_SIZE)
    try:
        _create(tmp, db_path, key, exclusive=True)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write a new hash key: {err.strerror}",
                           path=str(path)) from err
    return key

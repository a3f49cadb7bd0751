"""Where the database lives, and creating it private to its owner.

The default follows the XDG Base Directory specification: kscan's database is state
(it survives restarts, is not configuration and is not a cache), so it lives at
`$XDG_STATE_HOME/kscan/kscan.db`, or `~/.local/state/kscan/kscan.db` when the variable
is unset, empty or not an absolute path (the spec says to ignore relative paths).

Golden hashes and the event log are security data: directories we create get mode 0700
and the database file 0600, whatever the umask. SQLite gives the `-wal` and `-shm`
files it creates the permissions of the database file, so they are 0600 too.
Directories and files that already exist are left as they are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["DB_FILE_MODE", "DIR_MODE", "default_db_path", "prepare_db_file"]

DIR_MODE = 0o700
DB_FILE_MODE = 0o600


def default_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME/kscan/kscan.db`, else `~/.local/state/kscan/kscan.db`."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME", "")
    base = Path(state) if state and os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "kscan" / "kscan.db"


def _make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700 (umask ignored)."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:   # created meanwhile by another process: theirs to keep
            continue
        os.chmod(d, DIR_MODE)


def prepare_db_file(path: Path) -> None:
    """Make sure `path` exists; a new file is created empty with mode 0600.

    SQLite treats an empty file as a new database. Raises OSError.
    """
    _make_private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DB_FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, DB_FILE_MODE)
    finally:
        os.close(fd)

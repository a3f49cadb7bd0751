"""Where the database lives, and creating it private to its owner.

Without `--db`, the first of these (so that one-shot commands an operator types find
the database the service writes):

1. `$KSCAN_DB`, when set to an absolute path;
2. `$STATE_DIRECTORY/kscan.db`: systemd sets `STATE_DIRECTORY` for a unit with
   `StateDirectory=` (kscan.service: /var/lib/kscan; the first one when it lists several);
3. for root, the unit's database `/var/lib/kscan/kscan.db` when that file exists;
4. the XDG Base Directory default: kscan's database is state (it survives restarts, is
   not configuration and is not a cache), so it lives at
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

__all__ = ["DB_FILE_MODE", "DIR_MODE", "SERVICE_DB", "default_db_path", "prepare_db_file"]

DIR_MODE = 0o700
DB_FILE_MODE = 0o600


#: The database of the systemd unit (`StateDirectory=kscan`).
SERVICE_DB = Path("/var/lib/kscan/kscan.db")


def default_db_path(environ: Mapping[str, str] | None = None, *,
                    service_db: Path = SERVICE_DB) -> Path:
    """The database to use without `--db` (the module's docstring gives the order)."""
    env = os.environ if environ is None else environ
    given = env.get("KSCAN_DB", "")
    if given and os.path.isabs(given):
        return Path(given)
    unit = env.get("STATE_DIRECTORY", "").split(":")[0]
    if unit and os.path.isabs(unit):
        return Path(unit) / "kscan.db"
    if os.geteuid() == 0 and service_db.is_file():
        return service_db
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

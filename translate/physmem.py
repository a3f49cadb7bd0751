"""Guest physical memory: QEMU memory-backend files mapped read-only into kscan.

This is the patent's "EPT step" done on the host side. QEMU places each guest-physical
RAM range at an offset of a memory-backend file (`info mtree -f` tells where); kscan
mmaps each file once, PROT_READ + MAP_SHARED, so it sees the guest's writes as they
happen and can never write back. `view(gpa, size)` returns a zero-copy memoryview
into the mapping: no dump to disk, no copy on the hot path.

Everything about the layout comes from QEMU (trusted host side) but the addresses we
are asked to read come from guest page tables (hostile): every read is range-checked
and a GPA in a hole or past RAM raises `PhysicalAddressError` naming it.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import mmap
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

from translate.errors import BackendError, PhysicalAddressError

__all__ = ["GuestMemory", "RamRange", "append_ram"]

_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class RamRange:
    """A guest-physical range [gpa, gpa+size) stored at `offset` in backend file `path`."""

    gpa: int
    size: int
    path: str
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def append_ram(ranges: list[RamRange], r: RamRange) -> None:
    """Append `r`, merged into the last range when it continues it both in guest-physical
    addresses and in the same file (QEMU's flat view splits RAM at region boundaries)."""
    if ranges:
        last = ranges[-1]
        if last.path == r.path and last.end == r.gpa and last.offset + last.size == r.offset:
            ranges[-1] = RamRange(last.gpa, last.size + r.size, last.path, last.offset)
            return
    ranges.append(r)


class _Mapping:
    """One backend file, mapped read-only in full.

    Only a regular file is accepted: it is opened with O_NONBLOCK so that a FIFO or a
    device named by a hostile peer cannot block the caller (an event loop) in open(),
    and then refused by its type. The descriptor stays open so that `shrunk` can ask
    the very file that is mapped (not whatever the path names now) for its size."""

    def __init__(self, path: str, owner: int | None = None) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as err:
            raise BackendError(path, f"cannot open: {err.strerror}",
                               hint="run kscan as a user that can read QEMU's memory file") from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BackendError(path, f"not a regular file ({_kind(st.st_mode)})",
                                   hint="guest RAM must be a memory-backend-file on a "
                                        "regular file (e.g. in /dev/shm or hugetlbfs)")
            if owner is not None and st.st_uid != owner:
                raise BackendError(path, f"owned by uid {st.st_uid}, not by the QEMU "
                                   f"process's uid {owner}",
                                   hint="kscan reads only memory files of the VM's own user")
            size = st.st_size
            if size <= 0:
                raise BackendError(path, "file is empty")
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as err:
            os.close(fd)
            raise BackendError(path, f"cannot mmap read-only: {err}") from err
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.path = path
        self.size = size
        self.view = memoryview(self.mm)

    def current_size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.view.release()
        # Views handed out to callers keep the buffer exported; then the mapping is
        # freed when the last of them goes away.
        with contextlib.suppress(BufferError):
            self.mm.close()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return f"mode {mode:#o}"


class GuestMemory:
    """Read-only, zero-copy access to a VM's RAM by guest-physical address."""

    #: `view()` returns windows onto the live mapping. A subclass that copies
    #: (`translate.procmem.HostMemory` over /proc/PID/mem) sets it False: its views are
    #: snapshots, and whoever wants to see later writes must call `view()` again.
    zero_copy: bool = True

    def __init__(self, ranges: Iterable[RamRange], *, name: str = "vm",
                 owner: int | None = None) -> None:
        self.name = name
        self._maps: dict[str, _Mapping] = {}
        rs = sorted(ranges, key=lambda r: r.gpa)
        try:
            for prev, cur in itertools.pairwise(rs):
                if cur.gpa < prev.end:
                    raise BackendError(cur.path, f"RAM ranges overlap at gpa {cur.gpa:#x}")
            for r in rs:
                if r.size <= 0 or r.gpa < 0 or r.offset < 0:
                    raise BackendError(r.path, f"bad RAM range gpa={r.gpa:#x} size={r.size:#x}")
                m = self._maps.get(r.path)
                if m is None:
                    m = self._maps[r.path] = _Mapping(r.path, owner)
                if r.offset + r.size > m.size:
                    raise BackendError(
                        r.path,
                        f"RAM range gpa {r.gpa:#x}+{r.size:#x} at file offset {r.offset:#x} "
                        f"ends past the file's size {m.size:#x}",
                    )
        except BaseException:
            self.close()
            raise
        self.ranges: tuple[RamRange, ...] = tuple(rs)
        self._starts = [r.gpa for r in rs]
        # Per range: (host memoryview of the whole file, file offset of range start).
        self._slots = [(self._maps[r.path], r.offset) for r in rs]

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def shrunk(self) -> str | None:
        """Why reading could fault (SIGBUS): a backing file now smaller than its mapping.
        None if every file still covers what was mapped. Callers check this before each
        pass; a file truncated between this check and a read still faults (the process
        gets SIGBUS): that window is documented, not closed."""
        for m in self._maps.values():
            now = m.current_size()
            if now < m.size:
                return f"{m.path} shrank from {m.size:#x} to {now:#x} bytes"
        return None

    # -- lookups ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Total bytes of RAM (sum of ranges)."""
        return sum(r.size for r in self.ranges)

    @property
    def top(self) -> int:
        """One past the highest RAM GPA."""
        return self.ranges[-1].end if self.ranges else 0

    def _locate(self, gpa: int, size: int) -> tuple[_Mapping, int]:
        """The mapping and host offset of [gpa, gpa+size), which must be in one range."""
        i, delta = self._range_of(gpa, size)
        m, off = self._slots[i]
        return m, off + delta

    def _range_of(self, gpa: int, size: int) -> tuple[int, int]:
        """The index of the RAM range holding all of [gpa, gpa+size), and gpa's offset in
        it; PhysicalAddressError naming the hole or the crossed boundary otherwise."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa < 0:
            raise PhysicalAddressError(gpa, size, "below the first RAM range")
        r = self.ranges[i]
        if gpa >= r.end:
            raise PhysicalAddressError(gpa, size, f"not RAM on {self.name} (in a hole or past "
                                       f"the top of RAM {self.top:#x})")
        if size < 0 or gpa + size > r.end:
            raise PhysicalAddressError(gpa, size, f"crosses the end of RAM range "
                                       f"{r.gpa:#x}-{r.end - 1:#x}")
        return i, gpa - r.gpa

    def contains(self, gpa: int, size: int = 1) -> bool:
        try:
            self._locate(gpa, size)
        except PhysicalAddressError:
            return False
        return True

    def view(self, gpa: int, size: int) -> memoryview:
        """Zero-copy read-only view of guest RAM [gpa, gpa+size) (one RAM range)."""
        m, off = self._locate(gpa, size)
        return m.view[off:off + size]

    def read_u64(self, gpa: int) -> int:
        m, off = self._locate(gpa, 8)
        return int(_U64.unpack_from(m.mm, off)[0])

    def find(self, needle: bytes, gpa: int, size: int) -> int | None:
        """GPA of the first `needle` within [gpa, gpa+size) (one RAM range), or None.
        Searches the mapping in place (no copy)."""
        m, off = self._locate(gpa, size)
        at = m.mm.find(needle, off, off + size)
        return None if at < 0 else gpa + (at - off)

    def host_range(self, gpa: int, size: int) -> tuple[str, int]:
        """(backend file, file offset) of a GPA range: where the bytes live on the host."""
        m, off = self._locate(gpa, size)
        return m.path, off

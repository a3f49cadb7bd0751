"""Guest RAM that has no file: read by copying from the QEMU process's /proc/PID/mem.

A libvirt domain without `<memoryBacking>` (libvirt's default, most OpenStack Nova VMs)
keeps its RAM in anonymous private memory of the QEMU process. There is nothing to
mmap: kscan reads it with `pread` of `/proc/PID/mem` at the host virtual address QEMU
reports for each RAM range (HMP `gpa2hva`). Such a range is a `RamRange` whose `path`
is `/proc/PID/mem` and whose `offset` is that host virtual address; everything else
about it (bounds, range checks, error messages) is as for a file.

`HostMemory` is a `GuestMemory` whose ranges may be of either kind: file ranges are
mapped read-only and zero-copy as before (the base class maps them), process ranges
are read on demand. The cost, which the fast path pays on every pass:

* `view()` of a process range returns a **copy**, read fresh at each call (one `pread`
  of the range asked for, at most `MAX_READ` bytes): it is a snapshot, not a window,
  so a caller that wants to see later writes must call `view()` again (the fast path
  does, see `zero_copy`). Reading is ~5 GB/s here (256 MiB in 48 ms), so one VM's
  ~19 MB of protected regions costs ~4 ms per pass more than hashing a mapping.
* `read_u64()` is one 8-byte `pread` (a system call per page-table entry).
* `find()` scans in `FIND_CHUNK` pieces (bounded buffers, never the whole range).

Reading another process's memory needs ptrace-read access: the same user as QEMU (and
not blocked by Yama's `ptrace_scope` ≥ 2) or CAP_SYS_PTRACE.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import struct
from collections.abc import Iterable

from translate.errors import BackendError, PhysicalAddressError
from translate.physmem import GuestMemory, RamRange, _Mapping

__all__ = ["FIND_CHUNK", "MAX_READ", "HostMemory", "ProcessReader", "is_process_memory"]

#: The largest single copy `view()` makes of a process range (the biggest protected
#: region, .text, is ~15 MB on Debian 6.1 and read run by run).
MAX_READ = 64 << 20
#: `find()` reads this much at a time.
FIND_CHUNK = 4 << 20

_PROC_MEM = re.compile(r"^/proc/(\d+)/mem$")
_U64 = struct.Struct("<Q")


def is_process_memory(path: str) -> bool:
    """Is `path` a process's memory file (`/proc/PID/mem`), read by copying?"""
    return _PROC_MEM.match(path) is not None


class ProcessReader:
    """One `/proc/PID/mem`, opened read-only; reads copies at host virtual addresses."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise BackendError(path, f"cannot open: {err.strerror}",
                               hint="anonymous guest RAM is read through the QEMU process: "
                                    "run kscan as QEMU's user or with CAP_SYS_PTRACE") from err
        self.path = path

    def read(self, addr: int, size: int) -> bytes:
        if size > MAX_READ:
            raise BackendError(self.path, f"read of {size:#x} bytes at {addr:#x} exceeds the "
                               f"copy limit {MAX_READ:#x}")
        try:
            data = os.pread(self.fd, size, addr)
        except OSError as err:
            gone = err.errno in (errno.ESRCH, errno.EIO)
            raise BackendError(self.path, f"cannot read {size:#x} bytes at host address "
                               f"{addr:#x}: {err.strerror}",
                               hint="the QEMU process may have exited" if gone else "") from err
        if len(data) != size:
            # A short read: the process's mapping shrank, or it exited.
            raise BackendError(self.path, f"short read at host address {addr:#x}: "
                               f"{len(data):#x} of {size:#x} bytes",
                               hint="the QEMU process may have exited")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class HostMemory(GuestMemory):
    """Guest RAM whose ranges live in backend files (mapped, zero-copy) or in a QEMU
    process's anonymous memory (`/proc/PID/mem`, copied at each read)."""

    def __init__(self, ranges: Iterable[RamRange], *, name: str = "vm") -> None:
        rs = sorted(ranges, key=lambda r: r.gpa)
        super().__init__([r for r in rs if not is_process_memory(r.path)], name=name)
        self._readers: dict[str, ProcessReader] = {}
        try:
            for prev, cur in itertools.pairwise(rs):
                if cur.gpa < prev.end:
                    raise BackendError(cur.path, f"RAM ranges overlap at gpa {cur.gpa:#x}")
            for r in rs:
                if not is_process_memory(r.path):
                    continue
                if r.size <= 0 or r.gpa < 0 or r.offset <= 0:
                    raise BackendError(r.path, f"bad RAM range gpa={r.gpa:#x} "
                                       f"size={r.size:#x} at host address {r.offset:#x}")
                if r.path not in self._readers:
                    self._readers[r.path] = ProcessReader(r.path)
        except BaseException:
            self.close()
            raise
        self.ranges = tuple(rs)
        self._starts = [r.gpa for r in rs]
        self._host: list[tuple[_Mapping | ProcessReader, int]] = [
            (self._readers[r.path] if is_process_memory(r.path) else self._maps[r.path],
             r.offset) for r in rs]
        #: False when any range is copied: views are snapshots (see the module doc).
        self.zero_copy = not self._readers

    def close(self) -> None:
        super().close()
        for r in getattr(self, "_readers", {}).values():
            r.close()

    def _where(self, gpa: int, size: int) -> tuple[_Mapping | ProcessReader, int]:
        i, delta = self._range_of(gpa, size)
        backend, off = self._host[i]
        return backend, off + delta

    def contains(self, gpa: int, size: int = 1) -> bool:
        try:
            self._where(gpa, size)
        except PhysicalAddressError:
            return False
        return True

    def view(self, gpa: int, size: int) -> memoryview:
        """A read-only view of guest RAM [gpa, gpa+size): zero-copy for file ranges; for
        process ranges a fresh copy (one pread, at most `MAX_READ` bytes)."""
        b, off = self._where(gpa, size)
        if isinstance(b, ProcessReader):
            if size > MAX_READ:
                raise PhysicalAddressError(gpa, size, f"larger than the copy limit "
                                           f"{MAX_READ:#x} of process memory")
            return memoryview(b.read(off, size))
        return b.view[off:off + size]

    def read_u64(self, gpa: int) -> int:
        b, off = self._where(gpa, 8)
        if isinstance(b, ProcessReader):
            return int(_U64.unpack(b.read(off, 8))[0])
        return int(_U64.unpack_from(b.mm, off)[0])

    def find(self, needle: bytes, gpa: int, size: int) -> int | None:
        b, off = self._where(gpa, size)
        if not isinstance(b, ProcessReader):
            at = b.mm.find(needle, off, off + size)
            return None if at < 0 else gpa + (at - off)
        if not needle:
            return gpa
        step = max(FIND_CHUNK, 2 * len(needle))
        pos = 0
        while pos < size:
            n = min(step + len(needle) - 1, size - pos)
            at = b.read(off + pos, n).find(needle)
            if at >= 0:
                return gpa + pos + at
            pos += step
        return None

    def host_range(self, gpa: int, size: int) -> tuple[str, int]:
        """(file, offset) of a GPA range; for process memory (`/proc/PID/mem`, host
        virtual address)."""
        b, off = self._where(gpa, size)
        return b.path, off

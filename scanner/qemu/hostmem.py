"""Where a QEMU process keeps guest RAM, for every kind of memory backend.

For each guest-physical RAM range QEMU tells the host virtual address it maps it at
(HMP `gpa2hva`); `/proc/PID/maps` then says what is mapped there, and that decides how
kscan reads it (`ram_source`):

* shared mapping of a file that still has its name — `<source type='file'/>`: that
  file, mmap'd (zero-copy);
* shared mapping of an unlinked file (`... (deleted)`) — `<hugepages/>` with shared
  access, `<source type='memfd'/>`: `/proc/PID/fd/N`, mmap'd (zero-copy);
* private or anonymous mapping — libvirt's default (no `<memoryBacking>`), private
  hugepages; or shared memory without an open fd (`memory-backend-ram,share=on`):
  `/proc/PID/mem`, copied (`translate.procmem`).

The address comes from QEMU, never from a guess: under TCG QEMU also maps a 1 GiB
rwx code buffer, bigger than a small guest's RAM. A private file mapping is read through
/proc/PID/mem too: the guest's writes are in the process's copy-on-write pages, not in
the file. The unlinked file is found as the fd whose (device, inode) is the mapping's.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from scanner.errors import VmStateError
from scanner.qemu.hmp import FlatRange
from scanner.qemu.qmp import QmpVm
from translate.physmem import RamRange, append_ram

__all__ = ["Vma", "parse_gpa2hva", "parse_maps", "process_layout", "ram_source", "read_maps"]

_MAPS_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+)\s+([rwxsp-]{4})\s+([0-9a-f]+)\s+([0-9a-f]+):([0-9a-f]+)"
    r"\s+(\d+)\s*(.*)$")
_GPA2HVA = re.compile(r"Host virtual address for (0x[0-9a-fA-F]+) \(([^)]*)\) is "
                      r"(0x[0-9a-fA-F]+)")
_DELETED = " (deleted)"
MAX_MAPS_LINES = 1_000_000


@dataclass(frozen=True)
class Vma:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def anonymous(self) -> bool:
        return self.inode == 0


def parse_maps(text: str) -> list[Vma]:
    lines = text.splitlines()
    if len(lines) > MAX_MAPS_LINES:
        raise ValueError("implausibly many mappings")
    out = []
    for line in lines:
        m = _MAPS_LINE.match(line)
        if m:
            out.append(Vma(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16),
                           (int(m[5], 16), int(m[6], 16)), int(m[7]), m[8].strip()))
    return sorted(out, key=lambda v: v.start)


def read_maps(pid: int) -> list[Vma]:
    with open(f"/proc/{pid}/maps") as f:
        return parse_maps(f.read())


def parse_gpa2hva(text: str) -> int | None:
    """The host address in HMP `gpa2hva` output, or None (not RAM)."""
    m = _GPA2HVA.search(text)
    return int(m[3], 16) if m else None


def _covering(vmas: Sequence[Vma], hva: int, size: int) -> list[Vma]:
    """The mappings that together cover [hva, hva+size) without a gap, or []."""
    starts = [v.start for v in vmas]
    i = bisect.bisect_right(starts, hva) - 1
    out: list[Vma] = []
    at, end = hva, hva + size
    while at < end:
        if i < 0 or i >= len(vmas) or not vmas[i].start <= at < vmas[i].end:
            return []
        out.append(vmas[i])
        at = vmas[i].end
        i += 1
    return out


def _fd_of(pid: int, vma: Vma) -> str | None:
    """/proc/PID/fd/N of the open file with the mapping's device and inode."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in sorted(fds, key=lambda s: int(s) if s.isdigit() else 0):
        path = f"{fd_dir}/{fd}"
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_ino == vma.inode and (os.major(st.st_dev), os.minor(st.st_dev)) == vma.dev:
            return path
    return None


def ram_source(pid: int, vmas: Sequence[Vma], fr: FlatRange, hva: int, *,
               vm: str) -> RamRange:
    """How to read one RAM range of the guest: a file (its name, or /proc/PID/fd/N for an
    unlinked one) at an offset, or /proc/PID/mem at the host address."""
    cover = _covering(vmas, hva, fr.size)
    if not cover:
        raise VmStateError(f"RAM {fr.start:#x}+{fr.size:#x} ({fr.name}) at host address "
                           f"{hva:#x} is not wholly mapped in QEMU process {pid}", vm=vm)
    first = cover[0]
    file_backed = first.shared and not first.anonymous and all(
        v.shared and v.inode == first.inode and v.dev == first.dev
        and v.offset == first.offset + (v.start - first.start) for v in cover)
    if not file_backed:
        # Anonymous, or a private mapping (copy-on-write): only the process sees it.
        return RamRange(fr.start, fr.size, f"/proc/{pid}/mem", hva)
    offset = first.offset + (hva - first.start)
    path = first.path
    if path and not path.endswith(_DELETED) and path.startswith("/"):
        try:
            st = os.stat(path)
            if st.st_ino == first.inode and \
                    (os.major(st.st_dev), os.minor(st.st_dev)) == first.dev:
                return RamRange(fr.start, fr.size, path, offset)
        except OSError:
            pass
    fd = _fd_of(pid, first)
    if fd is None:
        # Shared anonymous memory (`/dev/zero (deleted)`: memory-backend-ram,share=on),
        # or an unlinked file QEMU closed after mapping it: only the process reaches it.
        return RamRange(fr.start, fr.size, f"/proc/{pid}/mem", hva)
    return RamRange(fr.start, fr.size, fd, offset)


async def process_layout(mon: QmpVm, pid: int, *, vm: str) -> list[RamRange]:
    """GPA → where the bytes live on the host, for all of a QEMU process's RAM backends
    (file, unlinked file, memfd, anonymous): asks QEMU where each flat-view range of a
    memory backend is mapped (HMP `gpa2hva`) and reads /proc/PID/maps (`ram_source`)."""
    devs = {d.id: d for d in await mon.memdevs()}
    if not devs:
        raise VmStateError("QEMU reports no memory backends (query-memdev)", vm=vm,
                           hint="kscan needs -machine memory-backend=... (libvirt ≥ 7 with "
                                "QEMU ≥ 5 uses one for every domain)")
    vmas = read_maps(pid)
    out: list[RamRange] = []
    for fr in await mon.flatview():
        dev = devs.get(fr.name)
        if dev is None:
            continue
        if fr.offset + fr.size > dev.size:
            raise VmStateError(f"flat view maps {fr.name}+{fr.offset:#x} past its size "
                               f"{dev.size:#x}", vm=vm)
        hva = parse_gpa2hva(await mon.hmp(f"gpa2hva {fr.start:#x}"))
        if hva is None:
            raise VmStateError(f"QEMU gives no host address for RAM at {fr.start:#x}", vm=vm)
        r = ram_source(pid, vmas, fr, hva, vm=vm)
        append_ram(out, r)
    if not out:
        raise VmStateError("no RAM of a memory backend in QEMU's flat view", vm=vm)
    return out

"""Guest RAM of every backend kind, without a guest: this process's own mappings stand in
for QEMU's (a named file, an unlinked memfd, a private file mapping, anonymous memory),
and `/proc/self/mem` for the anonymous reader."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest

from scanner.qemu.hmp import FlatRange
from scanner.qemu.hostmem import parse_gpa2hva, parse_maps, ram_source, read_maps
from translate import PhysicalAddressError, RamRange
from translate.errors import BackendError
from translate.procmem import FIND_CHUNK, MAX_READ, HostMemory, is_process_memory

SIZE = 8 << 20


def address(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


def flat(size: int = SIZE, start: int = 0) -> FlatRange:
    return FlatRange(start, start + size - 1, "ram", "pc.ram", 0)


@pytest.mark.parametrize("flags", [mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,  # libvirt default
                                   mmap.MAP_SHARED | mmap.MAP_ANONYMOUS])  # ram,share=on
def test_anonymous_ram_is_read_through_proc_mem_as_fresh_copies(flags: int) -> None:
    mm = mmap.mmap(-1, SIZE, flags=flags)
    hva = address(mm)
    try:
        r = ram_source(os.getpid(), read_maps(os.getpid()), flat(), hva, vm="t")
        assert r == RamRange(0, SIZE, f"/proc/{os.getpid()}/mem", hva)
        with HostMemory([r], name="t") as mem:
            assert not mem.zero_copy
            mm[0x1000:0x1008] = (0x1122334455667788).to_bytes(8, "little")
            v = mem.view(0x1000, 8)
            assert mem.read_u64(0x1000) == 0x1122334455667788
            mm[0x1000] = 0
            assert bytes(v)[0] == 0x88  # a snapshot: the old view keeps its bytes
            assert mem.view(0x1000, 1)[0] == 0  # a new view sees the write
            # find() works in bounded chunks, across a chunk boundary too
            at = FIND_CHUNK - 3
            mm[at:at + 6] = b"BANNER"
            assert mem.find(b"BANNER", 0, SIZE) == at
            assert mem.find(b"absent", 0, SIZE) is None
            assert mem.host_range(0x2000, 16) == (f"/proc/{os.getpid()}/mem", hva + 0x2000)
            with pytest.raises(PhysicalAddressError):
                mem.view(SIZE - 4, 8)
            with pytest.raises(PhysicalAddressError):
                mem.read_u64(SIZE)
            assert not mem.contains(SIZE)
            del v
    finally:
        mm.close()


def test_copies_are_bounded() -> None:
    big = MAX_READ + 4096
    mm = mmap.mmap(-1, big)
    try:
        with HostMemory([RamRange(0, big, f"/proc/{os.getpid()}/mem", address(mm))]) as mem:
            with pytest.raises(PhysicalAddressError, match="copy limit"):
                mem.view(0, big)
            assert len(mem.view(0, MAX_READ)) == MAX_READ
    finally:
        mm.close()


def test_unlinked_memfd_is_mapped_through_proc_fd(tmp_path: Path) -> None:
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, SIZE)
    mm = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED)
    try:
        vmas = read_maps(os.getpid())
        r = ram_source(os.getpid(), vmas, flat(SIZE - 0x1000, 0x100000), address(mm) + 0x1000,
                       vm="t")
        assert r.path.startswith(f"/proc/{os.getpid()}/fd/") and r.offset == 0x1000
        assert os.path.samestat(os.stat(r.path), os.fstat(fd))
        with HostMemory([r]) as mem:
            assert mem.zero_copy
            v = mem.view(0x100000, 4)
            mm[0x1000:0x1004] = b"abcd"
            assert bytes(v) == b"abcd"  # zero-copy: the view is a window
            del v
    finally:
        mm.close()
        os.close(fd)


def test_named_file_and_private_mapping(tmp_path: Path) -> None:
    f = tmp_path / "pc.ram"
    f.write_bytes(b"\0" * SIZE)
    with open(f, "r+b") as fh:
        shared = mmap.mmap(fh.fileno(), SIZE, flags=mmap.MAP_SHARED)
        private = mmap.mmap(fh.fileno(), SIZE, flags=mmap.MAP_PRIVATE)
    try:
        vmas = read_maps(os.getpid())
        r = ram_source(os.getpid(), vmas, flat(), address(shared), vm="t")
        assert r == RamRange(0, SIZE, str(f), 0)
        # A private mapping's writes are in the process, not the file.
        r = ram_source(os.getpid(), vmas, flat(), address(private), vm="t")
        assert is_process_memory(r.path)
    finally:
        shared.close()
        private.close()


def test_a_range_not_wholly_mapped_is_refused() -> None:
    mm = mmap.mmap(-1, SIZE)
    try:
        with pytest.raises(Exception, match="not wholly mapped"):
            ram_source(os.getpid(), read_maps(os.getpid()), flat(2 * SIZE), 0x1000, vm="t")
    finally:
        mm.close()


def test_proc_mem_of_a_missing_process_says_so() -> None:
    with pytest.raises(BackendError, match="cannot open"):
        HostMemory([RamRange(0, 4096, "/proc/999999999/mem", 0x10000)])


def test_parsers() -> None:
    assert parse_gpa2hva("Host virtual address for 0x100000 (pc.ram) is 0x7f94ebf00000\r\n") \
        == 0x7F94EBF00000
    assert parse_gpa2hva("Memory at address 0xffffffff is not RAM") is None
    (v,) = parse_maps("7fcdafe00000-7fcdcfe00000 rw-s 00000000 00:27 33469    "
                      "/dev/hugepages/libvirt/qemu/2-x/qemu_back_mem.pc.ram.ez9qfd (deleted)\n")
    assert v.shared and not v.anonymous and v.dev == (0, 0x27) and v.inode == 33469
    assert v.path.endswith("(deleted)")


def test_missing_binding_is_one_line_naming_the_extra(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    from scanner.commands.cli import main

    monkeypatch.setitem(sys.modules, "libvirt", None)
    assert main(["check", "--libvirt", "web01", "--db", str(tmp_path / "k.db")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "kscan[libvirt]" in err, err
    assert main(["run", "--libvirt", "--db", str(tmp_path / "k.db")]) == 2
    assert "kscan[libvirt]" in capsys.readouterr().err

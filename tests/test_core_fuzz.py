"""Memory images (`kscan check --core`) are hostile input: a well-formed synthetic QEMU
core is read as QEMU lays it out, and cores cut short, overwritten or made of garbage
(bounded hypothesis, as tests/test_fuzz.py) give a result or one `CoreFileError` —
never another exception, a hang, or an allocation sized by the file; on the command
line, one line and exit 2."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner.errors import CoreFileError
from scanner.vm.core import read_core
from tests.kscan_proc import kscan

FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

CR0, CR3, CR4 = 0x80050033, 0x1234000, 0x3006F0  # PG, PAE, SMEP set


def qemu_state(*, cr3: int = CR3, version: int = 1, size: int = 440) -> bytes:
    """A QEMUCPUState (target/i386/arch_dump.c), version 1 with kernel_gs_base."""
    body = struct.pack("<II", version, size) + bytes(16 * 8)
    body += struct.pack("<QQ", 0xFFFFFFFF81000000, 0x246)  # rip, rflags
    segs = {"cs": (0x10, 0xFFFFFFFF, 1 << 21, 0), "gdt": (0, 0x7F, 0, 0xFFFFFE0000001000),
            "idt": (0, 0xFFF, 0, 0xFFFFFE0000000000)}
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt"):
        sel, limit, flags, base = segs.get(name, (0, 0, 0, 0))
        body += struct.pack("<IIIIQ", sel, limit, flags, 0, base)
    body += struct.pack("<5Q", CR0, 0, 0, cr3, CR4) + struct.pack("<Q", 0)
    return body


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def synthetic_core(ram: list[tuple[int, int]], vcpus: int = 2, machine: int = 62) -> bytes:
    """An ELF core as QEMU writes it: PT_NOTE (CORE + QEMU note per vCPU), then one
    PT_LOAD per (gpa, size) block, the RAM bytes after the headers."""
    notes = b"".join(note(b"CORE", 1, bytes(336)) for _ in range(vcpus))
    notes += b"".join(note(b"QEMU", 0, qemu_state(cr3=CR3 + i)) for i in range(vcpus))
    phnum = 1 + len(ram)
    off = 64 + 56 * phnum
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, off, 0, 0, len(notes), len(notes), 0)
    data = notes
    for gpa, size in ram:
        phdrs += struct.pack("<IIQQQQQQ", 1, 0, off + len(data), 0, gpa, size, size, 0)
        data += bytes((gpa >> 12 & 0xFF,)) * size
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 4, machine, 1, 0, 64, 0, 0, 64, 56,
                       phnum, 64, 0, 0)
    return ehdr + phdrs + data


def test_a_qemu_core_is_read_as_qemu_lays_it_out(tmp_path: Path) -> None:
    path = tmp_path / "vm.elf"
    path.write_bytes(synthetic_core([(0, 0x3000), (0x3000, 0x1000), (0x105000, 0x2000)]))
    ranges, vcpus = read_core(path)
    # Blocks contiguous in GPA and in the file merge, as QEMU's flat view would.
    assert [(r.gpa, r.size) for r in ranges] == [(0, 0x4000), (0x105000, 0x2000)]
    assert [v.cr3 for v in vcpus] == [CR3, CR3 + 1]
    v = vcpus[0]
    assert (v.cr0, v.cr4, v.idtr_base, v.idtr_limit) == (CR0, CR4, 0xFFFFFE0000000000, 0xFFF)
    assert v.efer & (1 << 10) and v.efer & (1 << 11)  # long mode, NXE (see scanner.vm.core)
    assert v.cpl == 0 and v.rip == 0xFFFFFFFF81000000
    with path.open("rb") as f:
        f.seek(ranges[1].offset)
        assert f.read(1) == b"\x05"  # the block's own bytes, found by p_offset


@pytest.mark.parametrize(("blob", "words"), [
    (b"KDUMP   " + bytes(100), "kdump-compressed"),
    (b"PAGEDU64" + bytes(100), "Windows"),
    (b"\x7fELF" + bytes(60), "64-bit little-endian"),
    (b"hello", "too small"),
    (synthetic_core([(0, 0x1000)], machine=3), "32-bit guest"),
    (synthetic_core([(0, 0x1000)], vcpus=0), "no QEMU CPU-state notes"),
    (synthetic_core([(0, 0x1000), (0x800, 0x1000)]), "overlap"),
    (synthetic_core([(0, 0x100000)])[:-1], "truncated"),
])
def test_what_is_not_a_qemu_core_is_refused_by_name(tmp_path: Path, blob: bytes,
                                                    words: str) -> None:
    path = tmp_path / "x.core"
    path.write_bytes(blob)
    with pytest.raises(CoreFileError, match=words):
        read_core(path)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CoreFileError, match="not a regular file"):
        read_core(fifo)


VALID = synthetic_core([(0, 0x2000), (0x100000, 0x1000)])


@FAST
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=9)),
                max_size=8), st.integers(0, len(VALID)))
def test_damaged_cores_give_a_result_or_core_file_error(tmp_path: Path,
                                                        edits: list[tuple[int, bytes]],
                                                        cut: int) -> None:
    blob = bytearray(VALID)
    for at, data in edits:
        blob[at:at + len(data)] = data
    path = tmp_path / "fuzz.elf"
    path.write_bytes(bytes(blob[:max(cut, 1)]))
    t0 = time.monotonic()
    try:
        ranges, vcpus = read_core(path)
    except CoreFileError as err:
        assert str(err).startswith(f"core {path}")
        return
    finally:
        assert time.monotonic() - t0 < 1.0
    assert ranges and vcpus and len(vcpus) <= 4096
    size = path.stat().st_size
    assert all(r.offset + r.size <= size for r in ranges)


def test_the_command_line_says_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "garbage.elf"
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57) + b"\xff" * 200)
    db = str(tmp_path / "k.db")
    for cmd in (["check", "--core", str(path), "--db", db],
                ["inspect", "--core", str(path)]):
        res = kscan(*cmd)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "core" in lines[0] and "Traceback" not in res.stderr


def test_the_baseline_of_a_core_is_the_only_one_of_its_build_or_named(tmp_path: Path) -> None:
    """An image does not say which CPU model the VM had: one golden baseline of the
    kernel's build (with the PTI seen in the image) is used; with two, the check
    refuses and names them until --boot-profile picks one; a key whose PTI
    contradicts the image is refused."""
    import asyncio
    from types import SimpleNamespace

    from scanner.commands.offline import core_boot_profile
    from scanner.errors import BaselineMissing, VmStateError
    from scanner.vm import BootProfile
    from scanner.vm.core import CORE_CPU_MODEL
    from store import Store
    from tests.test_unit_watcher import BOOT, BUILD_ID, golden_db

    db = golden_db(tmp_path)
    image = BootProfile(CORE_CPU_MODEL, "unknown", 2, smep=True, smap=False)
    ex = SimpleNamespace(vm="img", boot=image,
                         lk=SimpleNamespace(profile=SimpleNamespace(
                             build_id=BUILD_ID.hex(), release="6.1.0-synthetic")))

    async def go() -> None:
        async with Store.open(db) as st:
            picked = await core_boot_profile(st, ex, None)  # type: ignore[arg-type]
            assert picked.key == BOOT.key and picked.smep and picked.vcpus == 2
            with pytest.raises(BaselineMissing):  # none with PTI
                await core_boot_profile(st, SimpleNamespace(  # type: ignore[arg-type]
                    vm="img", boot=BootProfile(CORE_CPU_MODEL, "unknown", 2, False, False,
                                               pti=True), lk=ex.lk), None)
            regions = await st.get_golden(BUILD_ID.hex(), BOOT.key)
            assert regions is not None
            await st.put_golden(BUILD_ID.hex(), "max-x86_64-cpu/beef", regions, "other")
            with pytest.raises(VmStateError, match="max-x86_64-cpu/beef"):
                await core_boot_profile(st, ex, None)  # type: ignore[arg-type]
            named = await core_boot_profile(st, ex, "max-x86_64-cpu/beef")  # type: ignore[arg-type]
            assert (named.cpu_model, named.features) == ("max-x86_64-cpu", "beef")
            with pytest.raises(VmStateError, match="page-table isolation"):
                await core_boot_profile(st, ex, "max-x86_64-cpu/beef/pti")  # type: ignore[arg-type]
            with pytest.raises(VmStateError, match="MODEL/FEATURES"):
                await core_boot_profile(st, ex, "nonsense")  # type: ignore[arg-type]

    asyncio.run(go())

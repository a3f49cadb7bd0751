"""Bounded fuzzing (hypothesis) of everything that reads hostile input: the HMP text
parsers, QMP reply validation, kernel-image parsing and the page walker. Each property:
the only way out is a result or kscan's own error — never another exception, a hang or
an allocation sized by the input. `max_examples` keeps the suite fast."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kscan.errors import KscanError
from scanner.errors import KernelImageError, QmpError
from scanner.image.vmlinux import load_kernel_image
from scanner.qemu.hmp import ParseError, VcpuState, parse_flatview, parse_registers
from scanner.qemu.qmp import QmpVm
from tests.fakeqmp import REGISTERS, mtree
from tests.synthetic import PAGE, RW, P, SyntheticRam
from tests.test_vmlinux import INV, R32, R64, table3, tiny_kernel
from translate import FOUR_LEVEL, PageWalker, TranslationError, kernel_space

FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# -- HMP ----------------------------------------------------------------------------------

FRAGMENTS = ["CPU#", "CPU#0\n", "CR0=", "CR3=", "CR4=", "EFER=", "RIP=", "EIP=", "IDT=",
             "GDT=", " ", "\n", "ffffffff", "9" * 60, "f" * 40, "HLT=1", "CPL=3",
             "FlatView #0\n", 'AS "memory"', "-", " (prio 0, ram): ", "ram0", " @",
             "0000000000000000", "ffffffffffffffff", "1" * 5000]


@FAST
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=40), max_size=60),
       st.sampled_from([REGISTERS, mtree(1 << 20), ""]))
def test_hmp_parsers_return_or_raise_parse_error(parts: list[str], base: str) -> None:
    text = base + "".join(parts)
    for parse in (parse_registers, parse_flatview):
        t0 = time.monotonic()
        try:
            out = parse(text)
        except ParseError:
            continue
        finally:
            assert time.monotonic() - t0 < 1.0
        assert isinstance(out, list)
        for item in out:  # every number fits in 64 bits
            for v in vars(item).values():
                if isinstance(v, int):
                    assert 0 <= v < 1 << 64


# -- QMP replies --------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "size", "share", "qom-path", "features", "name",
                         "cpuid-register", "x"]), inner, max_size=4),
    max_leaves=20)


class StubClient:
    """Stands in for qemu.qmp's client: answers each command from a table."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if cmd == "qom-get":
            return self.replies.get(f"qom:{(args or {}).get('property')}")
        if cmd == "human-monitor-command":
            return self.replies.get(f"hmp:{(args or {}).get('command-line')}", "")
        return self.replies.get(cmd)

    async def disconnect(self) -> None:
        pass


@FAST
@given(memdev=JSON, cpus=JSON, words=JSON, kind=JSON, path=JSON, offset=JSON, name=JSON)
def test_qmp_replies_give_values_or_qmp_errors(memdev: Any, cpus: Any, words: Any,
                                               kind: Any, path: Any, offset: Any,
                                               name: Any) -> None:
    vm = QmpVm("/fuzz.sock", StubClient({  # type: ignore[arg-type]
        "query-memdev": memdev, "query-cpus-fast": cpus, "query-name": name,
        "qom:feature-words": words, "qom:type": kind, "qom:mem-path": path,
        "qom:offset": offset}))

    async def go() -> None:
        for call in (vm.memdevs, vm.cpu_model, vm.name):
            with contextlib.suppress(KscanError):
                await call()

    asyncio.run(go())


@FAST
@given(st.integers(min_value=1, max_value=400))
def test_deeply_nested_feature_words_are_refused(depth: int) -> None:
    v: Any = {"features": 1}
    for _ in range(depth):
        v = {"features": v}
    vm = QmpVm("/fuzz.sock", StubClient({  # type: ignore[arg-type]
        "query-cpus-fast": [{"qom-path": "/cpu"}], "qom:feature-words": [v]}))
    with pytest.raises(QmpError, match="feature word"):
        asyncio.run(vm.cpu_model())


# -- kernel images --------------------------------------------------------------------------

BASE_IMAGE = tiny_kernel(table3(R32, INV, R64))


@FAST
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(BASE_IMAGE) - 1),
                          st.binary(min_size=1, max_size=8)), min_size=1, max_size=8),
       st.booleans())
def test_mutated_images_load_or_raise_kernel_image_error(tmp_path_factory: pytest.TempPathFactory,
                                                         edits: list[tuple[int, bytes]],
                                                         headers_only: bool) -> None:
    data = bytearray(BASE_IMAGE)
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    for off, b in edits:
        if headers_only:  # aim at the ELF and section headers, where sizes live
            off = off % 64 if off % 2 else shoff + off % (len(data) - shoff)
        data[off:off + len(b)] = b
    path = tmp_path_factory.mktemp("fuzz") / "vmlinux"
    path.write_bytes(bytes(data[:len(BASE_IMAGE)]))
    t0 = time.monotonic()
    with contextlib.suppress(KernelImageError):
        load_kernel_image(path)
    assert time.monotonic() - t0 < 2.0


def _patch_section(data: bytearray, index: int, **fields: int) -> None:
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    names = ("name", "type", "flags", "addr", "offset", "size")
    fmt = {"name": "<I", "type": "<I", "flags": "<Q", "addr": "<Q", "offset": "<Q",
           "size": "<Q"}
    pos = {"name": 0, "type": 4, "flags": 8, "addr": 16, "offset": 24, "size": 32}
    for k, v in fields.items():
        assert k in names
        struct.pack_into(fmt[k], data, shoff + 64 * index + pos[k], v)


def _section_index(data: bytes, name: str) -> int:
    import io

    from elftools.elf.elffile import ELFFile
    elf = ELFFile(io.BytesIO(data))
    return next(i for i, s in enumerate(elf.iter_sections()) if s.name == name)


@pytest.mark.parametrize(("section", "fields", "match"), [
    # 17 KB file, .notes NOBITS of 2 GiB: before, 2.1 GB of memory.
    (".notes", {"type": 8, "size": 2 << 30}, "NOBITS section .* claims"),
    (".bss", {"size": 1 << 40}, "NOBITS section .* claims"),
    # An allocated section marked SHF_COMPRESSED (before: inflated to its claimed size).
    (".notes", {"flags": 0x802}, "compressed"),
    # A zero-size __ex_table at address 0: before, OverflowError.
    ("__ex_table", {"addr": 0, "size": 0}, "no __ex_table"),
    (".text", {"addr": (1 << 64) - 16, "size": 0x2000}, "wraps past 2\\^64"),
])
def test_image_bombs_are_refused(tmp_path: Path, section: str, fields: dict[str, int],
                                 match: str) -> None:
    data = bytearray(BASE_IMAGE)
    _patch_section(data, _section_index(bytes(data), section), **fields)
    path = tmp_path / "vmlinux"
    path.write_bytes(bytes(data))
    with pytest.raises(KernelImageError, match=match):
        load_kernel_image(path)


def test_compressed_notes_bomb_is_bounded(tmp_path: Path) -> None:
    """A non-allocated .notes-like section compressed with zlib claiming 1 GiB: read at
    most MAX_NOTES of it (before: inflated to the claimed size)."""
    import zlib

    from scanner.image import vmlinux

    payload = zlib.compress(bytes(8 << 20), 9)  # 8 MiB of zeros in ~8 KB
    chdr = struct.pack("<IIQQ", 1, 0, 1 << 30, 1)
    data = bytearray(BASE_IMAGE)
    off = len(data)
    data += chdr + payload
    idx = _section_index(bytes(data), ".notes")
    _patch_section(data, idx, flags=0x800, offset=off, size=len(chdr) + len(payload))
    path = tmp_path / "vmlinux"
    path.write_bytes(bytes(data))
    t0 = time.monotonic()
    with pytest.raises(KernelImageError):  # no build id in zeros, after ≤ 1 MiB
        load_kernel_image(path)
    assert time.monotonic() - t0 < 2
    assert vmlinux.MAX_NOTES <= 1 << 20
    data2 = bytearray(data)
    data2[off + len(chdr):off + len(chdr) + 4] = b"\xff\xff\xff\xff"  # corrupt zlib
    path.write_bytes(bytes(data2))
    with pytest.raises(KernelImageError):
        load_kernel_image(path)


# -- the page walker ------------------------------------------------------------------------

@FAST
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=(1 << 20) // 8 - 1),
                          st.integers(min_value=0, max_value=(1 << 64) - 1)),
                max_size=200),
       st.integers(min_value=0, max_value=(1 << 64) - 1),
       st.integers(min_value=0, max_value=1 << 24))
def test_walker_on_hostile_tables(tmp_path_factory: pytest.TempPathFactory,
                                  entries: list[tuple[int, int]], va: int, size: int) -> None:
    ram = SyntheticRam(1 << 20)
    ram.map(0xFFFF_FFFF_8100_0000, 0x8000, PAGE, P | RW)
    for slot, value in entries:  # random entries anywhere: loops, holes, huge pages
        ram.put(slot * 8, value)
    mem = ram.save(tmp_path_factory.mktemp("walk") / "ram")
    try:
        w = PageWalker(mem, ram.pgd, FOUR_LEVEL)
        t0 = time.monotonic()
        for call in (lambda: w.translate(va), lambda: w.translate_range(va, size)):
            with contextlib.suppress(TranslationError):
                call()
        assert time.monotonic() - t0 < 2.0
        cr3 = entries[0][1] if entries else ram.pgd
        regs = VcpuState(index=0, cr0=0x80050033, cr3=cr3, cr4=0x6B0, efer=0xD01,
                         idtr_base=va, idtr_limit=0xFFF, gdtr_base=0, gdtr_limit=0x7F,
                         rip=0, cpl=0, halted=False)
        with contextlib.suppress(TranslationError):
            kernel_space(mem, regs)
    finally:
        mem.close()

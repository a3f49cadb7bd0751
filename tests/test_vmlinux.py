"""scanner.image.vmlinux: sections, build id, banner, relocations and symbols of a kernel image.

Checked against binutils readelf on the real Debian cloud kernel, and against small
kernel-like ELF files (plus relocation tables and symbol maps) built by the tests.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner.errors import KernelImageError
from scanner.image.kimage import extract_vmlinux
from scanner.image.vmlinux import KernelImage, Section, load_kernel_image, parse_relocations
from tests.needs import require_tool, unavailable

#: Measured on linux-image-6.1.0-56-cloud-amd64 (tools.guests.KERNEL_PACKAGE).
PINNED_RELEASE = "6.1.0-56-cloud-amd64"
PINNED_SIZES = {".text": 14_687_986, ".rodata": 4_063_670, "__ex_table": 6_384}
PINNED_RELOCS = (70_777, 8_457, 123_692)
KERNEL_BAND = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map: link addresses live above it


def readelf(*args: str) -> str:
    require_tool("readelf")
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True,
                          check=True).stdout


def readelf_sections(path: Path) -> dict[str, tuple[int, int, int, str, str]]:
    """readelf -S: name -> (addr, size, offset, type, flags), all sections but [0]."""
    out = {}
    for line in readelf("-S", str(path)).splitlines():
        m = re.match(r"\s*\[\s*(\d+)\]\s+(.*)$", line)
        if not m or m.group(1) == "0":
            continue
        tokens = m.group(2).split()
        name, typ, addr, off, size = tokens[:5]
        flags = tokens[6] if len(tokens) == 10 else ""
        out[name] = (int(addr, 16), int(size, 16), int(off, 16), typ, flags)
    return out


def readelf_loads(path: Path) -> list[tuple[int, int, int, int, int]]:
    """readelf -l PT_LOADs: (offset, vaddr, paddr, filesz, memsz)."""
    loads = []
    for line in readelf("-l", str(path)).splitlines():
        parts = line.split()
        if parts[:1] == ["LOAD"]:
            loads.append(tuple(int(x, 16) for x in parts[1:6]))
    return loads


def readelf_elf_end(path: Path) -> int:
    """Where the ELF's own bytes end: after the section header table, per readelf -h."""
    out = readelf("-h", str(path))

    def field(label: str) -> int:
        m = re.search(rf"{label}:\s+(\d+)", out)
        assert m, label
        return int(m.group(1))

    return field("Start of section headers") + field("Number of section headers") * \
        field("Size of section headers")


# --------------------------------------------------------------------------- real kernel


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from tools.guests import GuestError, ensure_kernel

    try:
        files = ensure_kernel()
    except (GuestError, OSError, subprocess.CalledProcessError) as err:
        unavailable(f"Debian cloud kernel not available: {err}")
    payload = extract_vmlinux(files.vmlinuz)
    elf_path = tmp_path_factory.mktemp("real") / "vmlinux"
    elf_path.write_bytes(payload)
    began = time.perf_counter()
    kimg = load_kernel_image(files.vmlinuz)
    elapsed = time.perf_counter() - began
    return {"files": files, "payload": payload, "elf_path": elf_path, "kimg": kimg,
            "elapsed": elapsed}


def test_real_sections_match_readelf(real: dict) -> None:
    kimg: KernelImage = real["kimg"]
    theirs = {name: (addr, size, off)
              for name, (addr, size, off, _typ, flags) in readelf_sections(real["elf_path"]).items()
              if "A" in flags}
    ours = {name: (s.addr, s.size, s.offset) for name, s in kimg.sections.items()}
    assert ours == theirs
    assert len(ours) > 30


def test_real_protected_sections(real: dict) -> None:
    kimg: KernelImage = real["kimg"]
    text, rodata, ex_table = kimg.protected()
    assert (text.name, rodata.name, ex_table.name) == (".text", ".rodata", "__ex_table")
    assert text.addr >= KERNEL_BAND and text.addr < rodata.addr < ex_table.addr
    if kimg.release == PINNED_RELEASE:
        assert {s.name: s.size for s in kimg.protected()} == PINNED_SIZES
    payload: bytes = real["payload"]
    assert kimg.section_bytes(".text") == payload[text.offset:text.offset + text.size]
    assert len(kimg.section_bytes("__ex_table")) == ex_table.size
    assert kimg.section_bytes(".bss") == bytes(kimg.sections[".bss"].size)
    with pytest.raises(KernelImageError, match=r"no allocated section '\.nope'"):
        kimg.section_bytes(".nope")


def test_real_build_id_matches_readelf(real: dict) -> None:
    m = re.search(r"Build ID:\s+([0-9a-f]+)", readelf("-n", str(real["elf_path"])))
    assert m
    assert real["kimg"].build_id == m.group(1)
    assert len(real["kimg"].build_id) == 40


def test_real_banner_and_release(real: dict) -> None:
    kimg: KernelImage = real["kimg"]
    assert kimg.release == real["files"].release  # from the package's file name
    assert kimg.version.startswith(f"Linux version {kimg.release} (")
    assert not kimg.version.endswith("\n")
    # The banner the kernel prints carries its build number ("#1 SMP ..."), not "# SMP".
    assert re.search(r"\) #\d+ ", kimg.version)
    assert kimg.version.encode() in real["payload"]


def test_real_load_is_fast(real: dict) -> None:
    assert real["elapsed"] < 2.0, f"load_kernel_image took {real['elapsed']:.2f} s"


def test_real_relocations_layout_and_counts(real: dict) -> None:
    kimg: KernelImage = real["kimg"]
    relocs = kimg.relocs
    assert relocs is not None
    assert relocs.has_inverse  # 6.1 < 6.15: three lists
    counts = (relocs.r32.size, relocs.r32_inv.size, relocs.r64.size)
    if kimg.release == PINNED_RELEASE:
        assert counts == PINNED_RELOCS
    assert all(n > 1000 for n in counts)
    # The table fills the payload from the end of the ELF, 3 zero terminators included.
    elf_end = readelf_elf_end(real["elf_path"])
    assert len(real["payload"]) - elf_end == 4 * (sum(counts) + 3)
    for arr in (relocs.r32, relocs.r32_inv, relocs.r64):
        assert arr.dtype == np.uint64
        assert np.all(np.diff(arr.astype(np.int64)) > 0)  # sorted, no duplicates
        assert not arr.flags.writeable


def _load_ranges(real: dict) -> list[tuple[int, int, int]]:
    """(load VA, file offset, file size) per PT_LOAD, from readelf -l.

    The load VA comes from the physical address: the per-cpu segment is linked at VA 0.
    """
    loads = readelf_loads(real["elf_path"])
    map_base = loads[0][1] - loads[0][2]  # __START_KERNEL_map
    return [(paddr + map_base, off, filesz) for off, _va, paddr, filesz, _ms in loads]


def _values_at(real: dict, sites: np.ndarray, width: int) -> np.ndarray:
    """The little-endian values stored in the file at the given link addresses."""
    raw = np.frombuffer(real["payload"], dtype=np.uint8)
    out = np.zeros(sites.size, dtype=np.uint64)
    found = np.zeros(sites.size, dtype=bool)
    for va, off, size in _load_ranges(real):
        inside = (sites >= np.uint64(va)) & (sites <= np.uint64(va + size - width))
        offsets = (sites[inside] - np.uint64(va)).astype(np.int64) + off
        byte_rows = raw[offsets[:, None] + np.arange(width)]
        out[inside] = byte_rows.copy().view(f"<u{width}").ravel()
        found |= inside
    assert found.all(), f"{(~found).sum()} sites have no file bytes"
    return out


def test_real_relocation_sites_are_inside_the_image(real: dict) -> None:
    loads = _load_ranges(real)
    lo = min(va for va, _, _ in loads)
    hi = max(va + size for va, _, size in loads)
    relocs = real["kimg"].relocs
    for arr, width in ((relocs.r32, 4), (relocs.r32_inv, 4), (relocs.r64, 8)):
        assert int(arr.min()) >= lo and int(arr.max()) + width <= hi


def test_real_relocation_sites_hold_what_they_should(real: dict) -> None:
    """Independent check of the three lists through what the sites contain.

    64-bit and 32-bit sites hold absolute addresses: (sign-extended) kernel link
    addresses, or for a handful physical ones below 1 GiB. Inverse sites hold
    PC-relative references to per-cpu variables: value + site = per-cpu offset (+addend)
    falls inside .data..percpu.
    """
    relocs = real["kimg"].relocs
    low = np.uint64(1 << 30)
    v64 = _values_at(real, relocs.r64, 8)
    assert np.all((v64 >= np.uint64(KERNEL_BAND)) | (v64 < low))
    assert (v64 >= np.uint64(KERNEL_BAND)).mean() > 0.99
    v32 = _values_at(real, relocs.r32, 4).astype(np.uint32).view(np.int32).astype(np.int64)
    v32 = v32.view(np.uint64)
    assert np.all((v32 >= np.uint64(KERNEL_BAND)) | (v32 < low))
    assert (v32 >= np.uint64(KERNEL_BAND)).mean() > 0.99
    vinv = _values_at(real, relocs.r32_inv, 4)
    target = ((vinv + relocs.r32_inv) & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
    percpu = real["kimg"].sections[".data..percpu"]
    assert percpu.addr == 0
    assert int(target.min()) >= -64 and int(target.max()) <= percpu.size + 64


def test_real_two_list_table_is_recognised(real: dict, tmp_path: Path) -> None:
    """A 6.15+ style table (no inverse list), built from the real lists."""
    payload: bytes = real["payload"]
    relocs = real["kimg"].relocs
    elf_end = readelf_elf_end(real["elf_path"])

    def words(arr: np.ndarray) -> bytes:
        return arr.astype(np.int64).astype("<i4").tobytes()

    table = b"\0\0\0\0" + words(relocs.r64) + b"\0\0\0\0" + words(relocs.r32)
    path = tmp_path / "vmlinux-2list"
    path.write_bytes(payload[:elf_end] + table)
    two = load_kernel_image(path)
    assert two.relocs is not None and not two.relocs.has_inverse
    assert two.relocs.r32_inv.size == 0
    assert np.array_equal(two.relocs.r32, relocs.r32)
    assert np.array_equal(two.relocs.r64, relocs.r64)


def test_real_vmlinux_without_table_has_no_relocs(real: dict, tmp_path: Path) -> None:
    payload: bytes = real["payload"]
    path = tmp_path / "vmlinux"
    path.write_bytes(payload[:readelf_elf_end(real["elf_path"])])
    kimg = load_kernel_image(path)
    assert kimg.relocs is None
    assert kimg.build_id == real["kimg"].build_id
    assert kimg.sections == real["kimg"].sections


def test_real_reloc_outside_image_is_refused(real: dict, tmp_path: Path) -> None:
    bad = bytearray(real["payload"])
    struct.pack_into("<i", bad, len(bad) - 8, 0x7FFF_FFF0)  # a 32-bit site at +2 GiB
    path = tmp_path / "vmlinux-bad"
    path.write_bytes(bytes(bad))
    with pytest.raises(KernelImageError, match=r"32-bit relocations outside the loaded image "
                                               r".*0x7ffffff0"):
        load_kernel_image(path)


def test_real_debian_stub_system_map_means_no_symbols(real: dict) -> None:
    files = real["files"]
    stub = files.vmlinuz.parent / f"System.map-{files.release}"
    if not stub.exists():
        pytest.skip("package has no System.map")
    assert "real System.map" in stub.read_text()
    assert load_kernel_image(files.vmlinuz, system_map=stub).symbols is None


def test_real_system_map_symbols(real: dict, tmp_path: Path) -> None:
    text = real["kimg"].sections[".text"].addr
    smap = tmp_path / "System.map"
    smap.write_text(f"{text:016x} T _text\n{text + 0x40:016x} T startup_64\n"
                    f"{text + 0x10:016x} t local_thing\n")
    kimg = load_kernel_image(real["elf_path"], system_map=smap)
    assert kimg.symbols == {"_text": text, "startup_64": text + 0x40, "local_thing": text + 0x10}
    smap.write_text(f"{text + 0x200000:016x} T _text\n")
    with pytest.raises(KernelImageError, match="symbols are of another kernel"):
        load_kernel_image(real["elf_path"], system_map=smap)
    with pytest.raises(KernelImageError, match=r"cannot read System\.map"):
        load_kernel_image(real["elf_path"], system_map=tmp_path / "missing.map")


def test_real_results_are_frozen(real: dict) -> None:
    kimg: KernelImage = real["kimg"]
    with pytest.raises(FrozenInstanceError):
        kimg.build_id = "x"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        kimg.sections[".text"].addr = 0  # type: ignore[misc]
    with pytest.raises(ValueError):
        kimg.relocs.r32[0] = 0
    assert "Relocations(r32=" in repr(kimg) and len(repr(kimg)) < 400


def test_non_kernel_elf_is_refused() -> None:
    ls = Path("/bin/ls")
    if not ls.exists():
        pytest.skip("/bin/ls missing")
    with pytest.raises(KernelImageError, match=r"no __ex_table section .*not a Linux kernel"):
        load_kernel_image(ls)


# --------------------------------------------------------------------------- synthetic kernels

TEXT_VA = 0xFFFF_FFFF_8100_0000
TEXT_PA = 0x0100_0000
BANNER = b"Linux version 9.9.9-test (kscan@tests) (gcc) #7 SMP PREEMPT_DYNAMIC\n\0"
BUILD_ID = bytes(range(1, 21))


def _note(ntype: int, name: bytes, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def tiny_kernel(table: bytes = b"", *, machine: int = 62, elfclass: int = 2,
                ex_table: bool = True, build_id: bytes | None = BUILD_ID,
                banner: bytes = BANNER, symbols: list[tuple[str, int, int, int]] | None = None,
                ) -> bytes:
    """A small x86-64 kernel-like ELF: .text, .rodata, __ex_table, .notes, .bss, then
    `table`. `symbols`: (name, value, st_info, st_shndx) entries for a .symtab."""
    # (name, sh_type, sh_flags, addr, contents or size for NOBITS)
    rodata = bytearray(0x1000)
    rodata[0x100:0x100 + len(banner)] = banner
    notes = _note(1, b"Xen\0", b"abcd")
    if build_id is not None:
        notes += _note(3, b"GNU\0", build_id)
    alloc: list[tuple[str, int, int, int, bytes | int]] = [
        (".text", 1, 0x6, TEXT_VA, b"\xcc" * 0x2000),
        (".rodata", 1, 0x2, TEXT_VA + 0x2000, bytes(rodata)),
    ]
    if ex_table:
        alloc.append(("__ex_table", 1, 0x2, TEXT_VA + 0x3000, bytes(0x30)))
    alloc += [(".notes", 7, 0x2, TEXT_VA + 0x3100, notes),
              (".bss", 8, 0x3, TEXT_VA + 0x4000, 0x1000)]
    names = [s[0] for s in alloc] + [".shstrtab"]
    if symbols is not None:
        names += [".symtab", ".strtab"]
    shstrtab = b"\0" + b"".join(n.encode() + b"\0" for n in names)

    blob = bytearray(0x1000)  # ehdr + phdrs live in the first page
    headers = [(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    for name, typ, flags, addr, body in alloc:
        off = 0x1000 + (addr - TEXT_VA)
        if isinstance(body, bytes):
            blob[len(blob):off] = bytes(off - len(blob))
            blob[off:off + len(body)] = body
            size = len(body)
        else:
            off, size = len(blob), body
        align = 4 if typ == 7 else 0x10  # readelf insists on 4 or 8 for notes
        headers.append((shstrtab.index(name.encode() + b"\0"), typ, flags, addr, off, size,
                        0, 0, align, 0))
    load_filesz = len(blob) - 0x1000
    load_memsz = 0x5000

    def add(name: str, typ: int, body: bytes, link: int = 0, info: int = 0,
            entsize: int = 0) -> None:
        off = len(blob)
        blob.extend(body)
        headers.append((shstrtab.index(name.encode() + b"\0"), typ, 0, 0, off, len(body),
                        link, info, 1, entsize))

    add(".shstrtab", 3, shstrtab)
    if symbols is not None:
        strtab = b"\0" + b"".join(n.encode() + b"\0" for n, *_ in symbols)
        symtab = bytes(24)
        pos = 1
        for name, value, info, shndx in symbols:
            symtab += struct.pack("<IBBHQQ", pos, info, 0, shndx, value, 0)
            pos += len(name) + 1
        symtab_index = len(headers)
        add(".symtab", 2, symtab, link=symtab_index + 1, info=1, entsize=24)
        add(".strtab", 3, strtab)
    blob.extend(bytes(-len(blob) % 8))
    shoff = len(blob)
    for h in headers:
        blob.extend(struct.pack("<IIQQQQIIQQ", *h))
    notes_hdr = next(h for h in headers if h[1] == 7)
    phdrs = [
        struct.pack("<IIQQQQQQ", 1, 7, 0x1000, TEXT_VA, TEXT_PA, load_filesz, load_memsz,
                    0x1000),
        struct.pack("<IIQQQQQQ", 4, 4, notes_hdr[4], notes_hdr[3],
                    TEXT_PA + notes_hdr[3] - TEXT_VA, notes_hdr[5], notes_hdr[5], 4),
    ]
    ident = b"\x7fELF" + bytes([elfclass, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, TEXT_PA, 64, shoff, 0, 64,
                               56, len(phdrs), 64, len(headers),
                               names.index(".shstrtab") + 1)
    blob[0:64] = ehdr
    blob[64:64 + 56 * len(phdrs)] = b"".join(phdrs)
    return bytes(blob) + table


def table3(r32: list[int], inv: list[int], r64: list[int]) -> bytes:
    return struct.pack(f"<i{len(r64)}ii{len(inv)}ii{len(r32)}i", 0, *r64, 0, *inv, 0, *r32)


def table2(r32: list[int], r64: list[int]) -> bytes:
    return struct.pack(f"<i{len(r64)}ii{len(r32)}i", 0, *r64, 0, *r32)


def s32(va: int) -> int:
    """A link address as the int32 the table stores."""
    return struct.unpack("<i", struct.pack("<I", va & 0xFFFFFFFF))[0]


R32 = [s32(TEXT_VA + 0x10), s32(TEXT_VA + 0x2004), s32(TEXT_VA + 0x4ffc)]
INV = [s32(TEXT_VA + 0x20)]
R64 = [s32(TEXT_VA + 0x3008), s32(TEXT_VA + 0x4ff8)]


def _write(tmp_path: Path, data: bytes, name: str = "vmlinux") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_tiny_kernel_is_read_like_readelf_reads_it(tmp_path: Path) -> None:
    path = _write(tmp_path, tiny_kernel(table3(R32, INV, R64)))
    kimg = load_kernel_image(path)
    theirs = {n: (a, s, o) for n, (a, s, o, _t, f) in readelf_sections(path).items() if "A" in f}
    assert {n: (s.addr, s.size, s.offset) for n, s in kimg.sections.items()} == theirs
    assert set(kimg.sections) == {".text", ".rodata", "__ex_table", ".notes", ".bss"}
    assert kimg.build_id == BUILD_ID.hex()
    assert re.search(rf"Build ID:\s+{BUILD_ID.hex()}", readelf("-n", str(path)))
    assert kimg.version == BANNER.rstrip(b"\n\0").decode()
    assert kimg.release == "9.9.9-test"
    assert kimg.symbols is None
    assert kimg.protected()[0] == Section(".text", TEXT_VA, 0x2000, 0x1000)


def test_three_list_table(tmp_path: Path) -> None:
    relocs = load_kernel_image(_write(tmp_path, tiny_kernel(table3(R32, INV, R64)))).relocs
    assert relocs is not None and relocs.has_inverse
    as_u64 = lambda xs: sorted(x & 0xFFFF_FFFF_FFFF_FFFF for x in xs)  # noqa: E731
    assert relocs.r32.tolist() == as_u64(R32)
    assert relocs.r32_inv.tolist() == as_u64(INV)
    assert relocs.r64.tolist() == as_u64(R64)
    assert relocs.count == 6


def test_two_list_table(tmp_path: Path) -> None:
    relocs = load_kernel_image(_write(tmp_path, tiny_kernel(table2(R32, R64)))).relocs
    assert relocs is not None and not relocs.has_inverse
    assert relocs.r32.tolist() == sorted(x & (2**64 - 1) for x in R32)
    assert relocs.r64.tolist() == sorted(x & (2**64 - 1) for x in R64)
    assert relocs.r32_inv.size == 0


def test_empty_lists(tmp_path: Path) -> None:
    relocs = load_kernel_image(_write(tmp_path, tiny_kernel(table3([], [], [])))).relocs
    assert relocs is not None and relocs.has_inverse and relocs.count == 0
    relocs = load_kernel_image(_write(tmp_path, tiny_kernel(table2([], [])), "b")).relocs
    assert relocs is not None and not relocs.has_inverse and relocs.count == 0


@pytest.mark.parametrize(("table", "match"), [
    (table3([s32(TEXT_VA - 4)], [], []), r"32-bit relocations outside .* 0xffffffff80fffffc"),
    (table3([], [], [s32(TEXT_VA + 0x4ffc)]), "64-bit relocations outside"),  # 8 bytes past
    (table3([], [0x1000], []), "inverse 32-bit relocations outside"),
    (table3(R32, INV, R64) + b"\0\0\0\0", "found 4 zero terminators"),
    (b"\x01\0\0\0" + table3(R32, INV, R64), "the first at index 1"),
    (table3(R32, INV, R64)[:-2], "not a multiple of 4"),
    (b"\x10\0\0\0" * 3, "found 0 zero terminators"),
])
def test_bad_tables_are_refused(tmp_path: Path, table: bytes, match: str) -> None:
    with pytest.raises(KernelImageError, match=match) as info:
        load_kernel_image(_write(tmp_path, tiny_kernel(table)))
    assert info.value.offset is not None  # names where the table starts


def test_parse_relocations_directly() -> None:
    relocs = parse_relocations(table2(R32, R64), TEXT_VA, TEXT_VA + 0x5000)
    assert not relocs.has_inverse and relocs.r32.size == 3
    with pytest.raises(KernelImageError, match="fits no known layout"):
        parse_relocations(table2(R32, R64), TEXT_VA, TEXT_VA + 0x1000)


def test_symtab_symbols(tmp_path: Path) -> None:
    syms = [
        ("vmlinux.c", 0, 0x04, 0xFFF1),           # STT_FILE: skipped
        ("", TEXT_VA, 0x03, 1),                   # section symbol: skipped
        ("_text", TEXT_VA, 0x10, 1),
        ("startup_64", TEXT_VA + 0x40, 0x12, 1),
        ("printk", 0, 0x10, 0),                   # undefined: skipped
        ("banner", TEXT_VA + 0x2100, 0x01, 2),
        ("banner", TEXT_VA + 0x2200, 0x01, 2),    # duplicate local: first wins
    ]
    kimg = load_kernel_image(_write(tmp_path, tiny_kernel(symbols=syms)))
    assert kimg.symbols == {"_text": TEXT_VA, "startup_64": TEXT_VA + 0x40,
                            "banner": TEXT_VA + 0x2100}
    assert kimg.relocs is None  # nothing after the ELF
    assert "_text" in readelf("-s", str(tmp_path / "vmlinux"))


def test_system_map_wins_over_symtab(tmp_path: Path) -> None:
    path = _write(tmp_path, tiny_kernel(symbols=[("_text", TEXT_VA, 0x10, 1)]))
    smap = tmp_path / "System.map"
    smap.write_text(f"{TEXT_VA:016x} T _text\n{TEXT_VA + 8:016x} T other\nnot a line\n")
    assert load_kernel_image(path, system_map=smap).symbols == {"_text": TEXT_VA,
                                                                 "other": TEXT_VA + 8}
    smap.write_text("ffffffffffffffff B The real System.map is in the -dbg package\n")
    assert load_kernel_image(path, system_map=smap).symbols == {"_text": TEXT_VA}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ex_table": False}, r"no __ex_table section \(of .text/.rodata/__ex_table\)"),
    ({"build_id": None}, "no NT_GNU_BUILD_ID note"),
    ({"banner": b"nothing here\0"}, "no 'Linux version' banner"),
    ({"banner": b"Linux version \n\0"}, "has no release"),
    ({"machine": 183}, "not a little-endian x86-64 kernel"),
])
def test_non_kernels_are_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(KernelImageError, match=match):
        load_kernel_image(_write(tmp_path, tiny_kernel(**kwargs)))


def test_section_past_end_of_file_names_the_numbers(tmp_path: Path) -> None:
    data = bytearray(tiny_kernel())
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    # Section 1 (.text): make it 1 MiB long.
    struct.pack_into("<Q", data, shoff + 64 + 0x20, 0x100000)
    with pytest.raises(KernelImageError,
                       match=r"section 1 \(.text\) at offset 0x1000 \+ size 0x100000 "
                             rf"ends past end of file {len(data):#x}"):
        load_kernel_image(_write(tmp_path, bytes(data)))


def test_header_table_past_end_of_file(tmp_path: Path) -> None:
    data = bytearray(tiny_kernel())
    struct.pack_into("<Q", data, 0x28, len(data) + 0x1000)  # e_shoff
    with pytest.raises(KernelImageError):
        load_kernel_image(_write(tmp_path, bytes(data)))


def test_truncated_elf(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError):
        load_kernel_image(_write(tmp_path, tiny_kernel()[:40]))


_TINY = tiny_kernel(table3(R32, INV, R64))
_SHOFF = struct.unpack_from("<Q", _TINY, 0x28)[0]
_SHNUM = struct.unpack_from("<H", _TINY, 0x3C)[0]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(
    st.sampled_from(["ehdr", "phdr", "shdr", "notes", "table"]),
    st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_corrupted_tiny_kernels_fail_cleanly(tmp_path_factory: pytest.TempPathFactory,
                                             edits: list[tuple[str, int, int]]) -> None:
    """Byte edits anywhere in the headers, notes or table: a result or KernelImageError."""
    regions = {"ehdr": (0, 64), "phdr": (64, 112), "shdr": (_SHOFF, _SHOFF + 64 * _SHNUM),
               "notes": (0x4100, 0x4130), "table": (len(_TINY) - 4 * 9, len(_TINY))}
    data = bytearray(_TINY)
    for region, pos, value in edits:
        start, end = regions[region]
        data[start + pos % (end - start)] = value
    path = tmp_path_factory.mktemp("fuzz") / "vmlinux"
    path.write_bytes(bytes(data))
    try:
        kimg = load_kernel_image(path)
    except KernelImageError:
        return
    assert {".text", ".rodata", "__ex_table"} <= set(kimg.sections)

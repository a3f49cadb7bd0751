"""Kernel profile from a kernel image: sections, build id, banner, KASLR relocations.

`load_kernel_image` takes a bzImage/vmlinuz (decompressed by `scanner.image.kimage`) or a
vmlinux ELF and returns a frozen `KernelImage`:

* every allocated section (``SHF_ALLOC``) with its link-time address, size and file
  offset, named as ``readelf -S`` names them; `KernelImage.protected` gives the three
  regions kscan hashes: ``.text``, ``.rodata``, ``__ex_table``;
* the build id (``NT_GNU_BUILD_ID`` note, name "GNU", in ``.notes``) as hex;
* the ``Linux version ...`` banner from ``.rodata`` and the release (its third word);
* the KASLR relocation table that the build appends after the ELF in the payload
  (arch/x86/tools/relocs.c writes it, arch/x86/boot/compressed/misc.c
  ``handle_relocations`` applies it). Read as little-endian int32 from the end
  backwards it is: 32-bit relocations, 0, [inverse 32-bit relocations, 0,] 64-bit
  relocations, 0. Kernels since 6.15 ("x86/boot/64: Remove inverse relocations") have
  no inverse list. Each entry, sign-extended, is the link-time virtual address of a
  site that the boot code adjusts by the KASLR slide;
* symbols, from the ELF's ``.symtab`` or a System.map, when there are any (Debian's
  kernels have none, and their /boot/System.map is a stub: that is not an error).

Where the ELF ends and the table begins: the ELF's own extent is the furthest end of its
headers, section contents and segment contents; everything after it in the payload is
the table (measured on Debian's 6.1 cloud kernel: the table starts exactly there). The
layout (3 lists or 2) is the one whose terminators account for the table exactly and
whose entries all fall inside the kernel's loaded virtual range; if neither does, or a
relocation points outside the image, the image is refused.

A plain vmlinux (no appended table) gives ``relocs=None``: recomputing the table from
the ELF's ``.rela`` sections, as relocs.c does, is not implemented.

pyelftools and numpy errors are converted to `scanner.errors.KernelImageError` here.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.elffile import ELFFile

from scanner.errors import KernelImageError
from scanner.image.kimage import DEFAULT_MAX_OUTPUT, extract_vmlinux, read_regular_file
from scanner.image.notes import find_build_id

__all__ = [
    "PROTECTED_SECTIONS",
    "KernelImage",
    "Relocations",
    "Section",
    "load_kernel_image",
    "parse_relocations",
]

#: The sections kscan protects, in this order.
PROTECTED_SECTIONS = (".text", ".rodata", "__ex_table")

_SHF_ALLOC = 0x2
_SHF_COMPRESSED = 0x800
_ELFCOMPRESS_ZLIB = 1
_CHDR64 = 24  # Elf64_Chdr: ch_type, ch_reserved, ch_size, ch_addralign
_U64_END = 1 << 64
#: A real System.map is ~5-10 MiB.
MAX_SYSTEM_MAP = 256 << 20
#: Notes are a few hundred bytes; never read or inflate more than this of them.
MAX_NOTES = 1 << 20
_BANNER = b"Linux version "
_MAX_BANNERS = 64

U64Array = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class Section:
    """One allocated ELF section: link-time virtual address, size, offset in the ELF."""

    name: str
    addr: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        """First address past the section."""
        return self.addr + self.size


@dataclass(frozen=True, eq=False, repr=False)
class Relocations:
    """KASLR relocation sites (link-time virtual addresses, sign-extended, ascending).

    `r32`: 32-bit sites the boot code adds the slide to; `r32_inv`: 32-bit sites it
    subtracts the slide from (empty when `has_inverse` is False, kernels >= 6.15);
    `r64`: 64-bit sites it adds the slide to. The arrays are read-only.
    """

    r32: U64Array
    r32_inv: U64Array
    r64: U64Array
    has_inverse: bool

    @property
    def count(self) -> int:
        return int(self.r32.size + self.r32_inv.size + self.r64.size)

    def __repr__(self) -> str:
        return (f"Relocations(r32={self.r32.size}, r32_inv={self.r32_inv.size}, "
                f"r64={self.r64.size}, has_inverse={self.has_inverse})")


@dataclass(frozen=True, eq=False, repr=False)
class KernelImage:
    """What kscan needs to know about one kernel build, read from its image file."""

    path: Path
    build_id: str
    version: str
    release: str
    sections: dict[str, Section]
    relocs: Relocations | None
    symbols: dict[str, int] | None
    #: The decompressed payload (ELF, then the relocation table); section contents.
    _data: bytes = field(repr=False)
    _nobits: frozenset[str] = field(repr=False, default=frozenset())

    def __repr__(self) -> str:
        nsyms = len(self.symbols) if self.symbols is not None else None
        return (f"KernelImage(path={str(self.path)!r}, release={self.release!r}, "
                f"build_id={self.build_id!r}, sections={len(self.sections)}, "
                f"relocs={self.relocs!r}, symbols={nsyms})")

    def section_bytes(self, name: str) -> bytes:
        """The file contents of section `name` (zeros for a NOBITS section like .bss)."""
        try:
            sec = self.sections[name]
        except KeyError:
            raise KernelImageError(f"no allocated section {name!r}",
                                   path=str(self.path)) from None
        if name in self._nobits:
            return bytes(sec.size)
        return self._data[sec.offset:sec.offset + sec.size]

    def protected(self) -> tuple[Section, Section, Section]:
        """The protected sections: .text, .rodata, __ex_table."""
        text, rodata, ex_table = (self.sections[name] for name in PROTECTED_SECTIONS)
        return text, rodata, ex_table


def load_kernel_image(path: str | PathLike[str], *, system_map: str | PathLike[str] | None = None,
                      max_output: int = DEFAULT_MAX_OUTPUT) -> KernelImage:
    """Read a bzImage/vmlinuz or vmlinux into a `KernelImage`.

    `system_map` optionally names a System.map to take symbols from (a stub without
    symbol lines is accepted and means "no symbols"). `max_output` caps the size of the
    decompressed payload.
    """
    where = str(path)
    data = extract_vmlinux(path, max_output=max_output)
    try:
        return _parse(Path(path), data, system_map)
    except KernelImageError:
        raise
    except (ELFError, ConstructError, struct.error, ValueError, IndexError, KeyError,
            OverflowError, UnicodeDecodeError, zlib.error, RecursionError) as err:
        raise KernelImageError(f"malformed kernel ELF: {type(err).__name__}: {err}",
                               path=where) from err
    except MemoryError as err:
        raise KernelImageError("parsing the kernel ELF ran out of memory", path=where,
                               hint="the image claims implausible sizes") from err


# --------------------------------------------------------------------------- parsing


def _parse(path: Path, data: bytes, system_map: str | PathLike[str] | None) -> KernelImage:
    where = str(path)
    elf = ELFFile(io.BytesIO(data))
    if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64" or not elf.little_endian:
        raise KernelImageError(
            f"ELF is {elf.elfclass}-bit {elf['e_machine']}, not a little-endian x86-64 kernel",
            path=where, hint="kscan reads x86-64 guest kernels only")
    elf_end = _elf_extent(elf, len(data), where)

    sections: dict[str, Section] = {}
    nobits: set[str] = set()
    for index, sec in enumerate(elf.iter_sections()):
        if not sec["sh_flags"] & _SHF_ALLOC:
            continue
        size = sec["sh_size"]
        # Bytes kscan may allocate for a section are bounded by the file: a NOBITS
        # section (zeros) may not claim more than the whole payload, and an allocated
        # section is never compressed (SHF_COMPRESSED is for debug sections only).
        if sec["sh_flags"] & _SHF_COMPRESSED:
            raise KernelImageError(f"allocated section {index} ({sec.name}) is compressed "
                                   "(SHF_COMPRESSED): not a kernel image", path=where)
        if sec["sh_type"] == "SHT_NOBITS" and size > len(data):
            raise KernelImageError(
                f"NOBITS section {index} ({sec.name}) claims {size:#x} bytes, more than "
                f"the whole image ({len(data):#x})", path=where)
        if sec["sh_addr"] + size > _U64_END:
            raise KernelImageError(
                f"section {index} ({sec.name}) at {sec['sh_addr']:#x} + size {size:#x} "
                "wraps past 2^64", path=where)
        sections[sec.name] = Section(sec.name, sec["sh_addr"], size, sec["sh_offset"])
        if sec["sh_type"] == "SHT_NOBITS":
            nobits.add(sec.name)
    missing = [name for name in PROTECTED_SECTIONS
               if name not in sections or name in nobits or not sections[name].size]
    if missing:
        raise KernelImageError(
            f"no {'/'.join(missing)} section (of {'/'.join(PROTECTED_SECTIONS)}): "
            f"not a Linux kernel image", path=where,
            hint="pass the guest's bzImage/vmlinuz or its vmlinux")

    lo, hi = _image_range(elf, where)
    build_id = _build_id(elf, data, where)
    version = _banner(data, sections[".rodata"], where)
    parts = version.split()
    if len(parts) < 3:
        raise KernelImageError(f"kernel banner {version!r} has no release", path=where)

    table = memoryview(data)[elf_end:]
    relocs = parse_relocations(table, lo, hi, where=where, base=elf_end) if len(table) else None

    symbols = _read_system_map(system_map) if system_map is not None else None
    if not symbols:
        symbols = _read_symtab(elf, data) or None
    if symbols and "_text" in symbols and symbols["_text"] != sections[".text"].addr:
        raise KernelImageError(
            f"symbol _text is at {symbols['_text']:#x} but .text at "
            f"{sections['.text'].addr:#x}: the symbols are of another kernel",
            path=str(system_map) if system_map is not None else where)

    return KernelImage(path=path, build_id=build_id, version=version, release=parts[2],
                       sections=sections, relocs=relocs, symbols=symbols, _data=data,
                       _nobits=frozenset(nobits))


def _elf_extent(elf: ELFFile, size: int, where: str) -> int:
    """End of the ELF's own bytes: headers, section contents, segment contents."""
    hdr = elf.header
    end = hdr["e_ehsize"]
    if hdr["e_phnum"]:
        end = max(end, hdr["e_phoff"] + hdr["e_phnum"] * hdr["e_phentsize"])
    if hdr["e_shnum"]:
        end = max(end, hdr["e_shoff"] + hdr["e_shnum"] * hdr["e_shentsize"])
    if end > size:
        raise KernelImageError(
            f"ELF headers end at {end:#x}, past end of file {size:#x}", path=where)
    for index, sec in enumerate(elf.iter_sections()):
        if sec["sh_type"] in ("SHT_NOBITS", "SHT_NULL"):
            continue
        sec_end = sec["sh_offset"] + sec["sh_size"]
        if sec_end > size:
            raise KernelImageError(
                f"section {index} ({sec.name}) at offset {sec['sh_offset']:#x} + size "
                f"{sec['sh_size']:#x} ends past end of file {size:#x}", path=where)
        end = max(end, sec_end)
    for index, seg in enumerate(elf.iter_segments()):
        seg_end = seg["p_offset"] + seg["p_filesz"]
        if seg_end > size:
            raise KernelImageError(
                f"segment {index} at offset {seg['p_offset']:#x} + size "
                f"{seg['p_filesz']:#x} ends past end of file {size:#x}", path=where)
        end = max(end, seg_end)
    return int(end)


def _section_data(sec: Any, data: bytes, where: str, limit: int) -> bytes:
    """A non-allocated section's bytes, at most `limit` of them; a compressed
    (SHF_COMPRESSED, zlib) section is inflated to at most `limit` bytes."""
    off, size = sec["sh_offset"], sec["sh_size"]
    raw = data[off:off + size]
    if not sec["sh_flags"] & _SHF_COMPRESSED:
        return raw[:limit]
    if len(raw) < _CHDR64 or struct.unpack_from("<I", raw)[0] != _ELFCOMPRESS_ZLIB:
        raise KernelImageError(f"section {sec.name} is compressed in a format kscan does "
                               "not read", path=where, offset=off)
    try:
        out = zlib.decompressobj().decompress(raw[_CHDR64:], limit)
    except zlib.error as err:
        raise KernelImageError(f"section {sec.name}: corrupt zlib data: {err}",
                               path=where, offset=off) from err
    return out


def _image_range(elf: ELFFile, where: str) -> tuple[int, int]:
    """[lo, hi): the kernel's loaded virtual range, from its PT_LOAD segments.

    The SMP per-cpu segment is linked at virtual address 0 (x86-64 kernels before 6.15);
    it is loaded inside the span of the others, and relocs.c moves its sites to its load
    address, so it is left out here.
    """
    loads = [(seg["p_vaddr"], seg["p_vaddr"] + seg["p_memsz"])
             for seg in elf.iter_segments()
             if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] != 0]
    if not loads:
        raise KernelImageError("ELF has no PT_LOAD segment at a kernel address", path=where)
    return min(lo for lo, _ in loads), max(hi for _, hi in loads)


def _build_id(elf: ELFFile, data: bytes, where: str) -> str:
    sec = elf.get_section_by_name(".notes")
    if sec is not None and sec["sh_type"] != "SHT_NOBITS":
        blobs = [_section_data(sec, data, where, MAX_NOTES)]
    else:
        # From the file's bytes, not pyelftools' data(): its NOBITS answer is sh_size
        # zeros, and it inflates compressed sections to whatever size they claim.
        blobs = [data[seg["p_offset"]:seg["p_offset"] + min(seg["p_filesz"], MAX_NOTES)]
                 for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"]
    for blob in blobs:
        found = find_build_id(blob)
        if found is not None:
            return found
    raise KernelImageError("no NT_GNU_BUILD_ID note in .notes", path=where,
                           hint="kscan keys profiles by build id; kbuild always adds one")


def _banner(data: bytes, rodata: Section, where: str) -> str:
    """The "Linux version ..." banner in .rodata, without its newline.

    6.1 kernels carry two: a weak placeholder ("... # SMP ...") and the linked one with
    the build number ("... #1 SMP ..."), which is what the kernel prints. Prefer the
    latter.
    """
    start, end = rodata.offset, rodata.offset + rodata.size
    found: list[str] = []
    pos = data.find(_BANNER, start, end)
    while pos >= 0 and len(found) < _MAX_BANNERS:
        stop = data.find(b"\0", pos, end)
        raw = data[pos:stop if stop >= 0 else end]
        if b"%" not in raw:  # skip printf formats
            found.append(raw.decode("utf-8", "replace").rstrip("\n"))
        pos = data.find(_BANNER, pos + len(_BANNER), end)
    if not found:
        raise KernelImageError("no 'Linux version' banner in .rodata", path=where,
                               offset=rodata.offset)
    for text in found:
        if re.search(r" #\d+", text):
            return text
    return found[0]


# --------------------------------------------------------------------------- relocations


def parse_relocations(table: bytes | memoryview, lo: int, hi: int, *, where: str = "<bytes>",
                      base: int = 0) -> Relocations:
    """Parse a KASLR relocation table (the bytes after the ELF in the payload).

    `lo`/`hi` bound the kernel's loaded virtual range; every site must lie inside it.
    `base` is the table's offset in the payload, for error messages. Both layouts are
    tried: 3 lists (32-bit, inverse 32-bit, 64-bit; kernels < 6.15) and 2 lists.
    """
    if len(table) % 4:
        raise KernelImageError(
            f"relocation table is {len(table):#x} bytes, not a multiple of 4",
            path=where, offset=base)
    words = np.frombuffer(table, dtype="<i4")
    zeros = np.flatnonzero(words == 0)
    failures: list[str] = []
    for lists in (3, 2):
        result = _try_layout(words, zeros, lists, lo, hi)
        if isinstance(result, Relocations):
            return result
        failures.append(f"as {lists} lists: {result}")
    raise KernelImageError(
        f"relocation table ({words.size} entries after the ELF) fits no known layout; "
        + "; ".join(failures), path=where, offset=base,
        hint="the image is corrupt, or its relocation format is newer than kscan")


def _try_layout(words: npt.NDArray[np.int32], zeros: npt.NDArray[np.intp], lists: int,
                lo: int, hi: int) -> Relocations | str:
    """The relocations if the table has this layout, else why not."""
    if zeros.size != lists or (zeros.size and zeros[0] != 0):
        first = f", the first at index {int(zeros[0])}" if zeros.size else ""
        return (f"found {zeros.size} zero terminators{first}; needs exactly {lists}, the "
                f"first at index 0")
    bounds = [int(z) for z in zeros] + [int(words.size)]
    # Forward order in the file: 0, 64-bit..., 0, [inverse..., 0,] 32-bit...
    parts = [words[bounds[i] + 1:bounds[i + 1]] for i in range(lists)]
    r64, r32 = parts[0], parts[-1]
    r32_inv = parts[1] if lists == 3 else words[:0]
    named = [("32-bit", r32, 4), ("inverse 32-bit", r32_inv, 4), ("64-bit", r64, 8)]
    out: list[U64Array] = []
    for label, part, width in named:
        sites = np.sort(part.astype(np.int64).view(np.uint64))
        bad = np.flatnonzero((sites < np.uint64(lo)) | (sites > np.uint64(hi - width)))
        if bad.size:
            site = int(sites[int(bad[0])])
            return (f"{bad.size} {label} relocations outside the loaded image "
                    f"[{lo:#x}, {hi:#x}), e.g. {site:#x}")
        sites.flags.writeable = False
        out.append(sites)
    return Relocations(r32=out[0], r32_inv=out[1], r64=out[2], has_inverse=lists == 3)


# --------------------------------------------------------------------------- symbols


def _read_system_map(system_map: str | PathLike[str]) -> dict[str, int]:
    """Symbols from a System.map ("ADDR TYPE NAME" lines); {} for Debian's stub."""
    text = read_regular_file(str(system_map), MAX_SYSTEM_MAP, "System.map").decode(
        "utf-8", errors="replace")
    symbols: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or len(parts[1]) != 1:
            continue
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        symbols.setdefault(parts[2], addr)
    return symbols


_SYM_DTYPE = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"),
                       ("shndx", "<u2"), ("value", "<u8"), ("size", "<u8")])
_STT_SECTION = 3
_STT_FILE = 4


def _read_symtab(elf: ELFFile, data: bytes) -> dict[str, int]:
    """Defined symbols from .symtab (first occurrence of a name wins); {} if none."""
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None or symtab["sh_type"] != "SHT_SYMTAB":
        return {}
    strtab = elf.get_section(symtab["sh_link"])
    off, size = symtab["sh_offset"], symtab["sh_size"]
    syms = np.frombuffer(data, dtype=_SYM_DTYPE, count=size // _SYM_DTYPE.itemsize,
                         offset=off)
    kind = syms["info"] & 0xF
    keep = (syms["name"] != 0) & (syms["shndx"] != 0) & (kind != _STT_SECTION) & \
        (kind != _STT_FILE)
    s_off, s_size = strtab["sh_offset"], strtab["sh_size"]
    strings = data[s_off:s_off + s_size]
    symbols: dict[str, int] = {}
    for name_off, value in zip(syms["name"][keep].tolist(), syms["value"][keep].tolist(),
                               strict=True):
        stop = strings.find(b"\0", name_off)
        name = strings[name_off:stop if stop >= 0 else None].decode("utf-8", "replace")
        symbols.setdefault(name, value)
    return symbols

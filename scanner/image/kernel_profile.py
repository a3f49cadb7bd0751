"""Kernel profiles: what verification needs from a kernel image, small enough to store.

A profile keeps the section table, the relocation sites inside the protected regions
(as offsets, for KASLR normalization), the build id and version banner, the first page
of `.text` and all of `__ex_table` (to find and confirm a live VM's slide without
symbols), and — only when the image came with symbols — the symbols inside protected
regions (to name changed sites) and the `__ro_after_init` range (pages that legitimately
differ per boot). Not the whole image: ~0.5 MB instead of ~60 MB. From the image's BTF
and kallsyms also the layouts of the kernel structures kscan reads from guest memory and
the addresses of the variables those reads start from (scanner.image.layouts).

Serialized as one zstd-compressed blob: an orjson header and raw little-endian arrays.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import orjson
import zstandard

from scanner.errors import KernelImageError
from scanner.hashing import file_page_fingerprints
from scanner.image.altreloc import AltRelocs, alt_relocs_from_image
from scanner.image.btf import parse_btf
from scanner.image.early_idt import find_early_stubs
from scanner.image.kallsyms import Kallsyms, recover_kallsyms
from scanner.image.layouts import DataSymbol, Layouts, data_symbols_from, layouts_from_btf
from scanner.image.patchsites import PatchSites, extract_patch_sites
from scanner.image.relocs import RegionRelocs
from scanner.image.serialize import (
    kallsyms_from_bytes,
    kallsyms_to_bytes,
    patch_sites_from_bytes,
    patch_sites_to_bytes,
)
from scanner.image.vmlinux import PROTECTED_SECTIONS, KernelImage, load_kernel_image
from translate.x86 import PAGE

__all__ = ["PROTECTED_SECTIONS", "KernelProfile", "SectionInfo", "profile_from_image",
           "profile_from_path"]

FORMAT = 1
_MAGIC = b"KSCNPRF1"


@dataclass(frozen=True)
class SectionInfo:
    name: str
    addr: int
    size: int

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class KernelProfile:
    build_id: str
    release: str
    version: str
    sections: dict[str, SectionInfo]
    relocs: dict[str, RegionRelocs]
    text_head: bytes
    ex_table: bytes
    #: Offsets within `.rodata` of [start, end) that change once per boot, from symbols.
    ro_after_init: tuple[int, int] | None = None
    #: Sorted (address, name) of symbols inside protected regions, when known.
    symbols: tuple[tuple[int, str], ...] = ()
    #: Unkeyed xxh3_64 of each 4 KiB chunk of the file's `.rodata` (link-time bytes,
    #: `scanner.hashing.file_page_fingerprints`): pages a
    #: verified VM changed from these were written at boot (see scanner.check.baseline).
    rodata_file_pages: tuple[int, ...] = ()
    #: Link-time (address, stride) of `early_idt_handler_array`, read from `.init.text`
    #: (scanner.image.early_idt.find_early_stubs); None if not found or stored by an older kscan.
    early_idt: tuple[int, int] | None = None
    #: Relocated bytes alternatives copy into a region at boot (scanner.image.altreloc), by
    #: region; empty for profiles stored by an older kscan.
    alt_relocs: dict[str, AltRelocs] = field(default_factory=dict)
    #: The kernel's own `.text` symbols, recovered from kallsyms (no debug package needed);
    #: None when the image has no kallsyms or the profile predates them.
    kallsyms: Kallsyms | None = None
    #: The kernel's self-patching sites (ftrace, jump labels, static calls, ...); None
    #: when they could not be read or the profile predates them.
    patch_sites: PatchSites | None = None
    #: The bytes of the optprobe template (`optprobe_template_entry..end`), from the image.
    optprobe_code: bytes = b""
    #: Struct layouts and enum values from the image's BTF; None when it has none (then
    #: `btf_note` says why) or the profile predates them (`btf_note` empty).
    layouts: Layouts | None = None
    btf_note: str = ""
    #: The kernel variables of scanner.image.layouts.DATA_SYMBOLS the image has, by name
    #: (empty: no kallsyms, or a profile stored by an older kscan).
    data_symbols: dict[str, DataSymbol] = field(default_factory=dict)
    _sym_addrs: list[int] = field(default_factory=list, init=False, repr=False,
                                  compare=False)

    def __post_init__(self) -> None:
        self._sym_addrs.extend(a for a, _ in self.symbols)

    # -- lookups ---------------------------------------------------------------------
    def section(self, name: str) -> SectionInfo:
        try:
            return self.sections[name]
        except KeyError:
            raise KernelImageError(f"profile has no section {name}", path=self.build_id) from None

    @property
    def text(self) -> SectionInfo:
        return self.section(".text")

    def protected(self) -> tuple[SectionInfo, ...]:
        return tuple(self.section(n) for n in PROTECTED_SECTIONS)

    def symbolize(self, addr: int) -> str | None:
        """`name+0xoff` of the symbol at or below a link-time address, when known: from
        a System.map/symbol table given at `profile add`, else from kallsyms."""
        i = bisect.bisect_right(self._sym_addrs, addr) - 1
        if i >= 0:
            a, name = self.symbols[i]
            return f"{name}+{addr - a:#x}" if addr != a else name
        ks = self.kallsyms
        if ks is not None and ks.text[0] <= addr < ks.text[1] and len(ks):
            return ks.symbolize(addr)
        return None

    def data_symbol(self, name: str) -> int | None:
        """Link-time address of a kernel variable (one of DATA_SYMBOLS), when known."""
        hit = self.data_symbols.get(name)
        if hit is not None:
            return hit.addr
        return next((a for a, n in self.symbols if n == name), None)

    @property
    def layouts_off(self) -> str | None:
        """Why the checks that read kernel structures are off for this kernel (one line),
        or None when they can run."""
        if self.layouts is not None:
            return None
        return self.btf_note or ("profile stored by an older kscan has no struct layouts: "
                                 "run `kscan profile add` on the kernel image again")

    # -- (de)serialization -----------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays: list[bytes] = []
        header: dict[str, Any] = {
            "format": FORMAT, "build_id": self.build_id, "release": self.release,
            "version": self.version,
            "sections": [[s.name, s.addr, s.size] for s in self.sections.values()],
            "ro_after_init": list(self.ro_after_init) if self.ro_after_init else None,
            "relocs": {}, "symbols": [name for _, name in self.symbols],
        }

        def put(b: bytes) -> list[int]:
            start = sum(len(x) for x in arrays)
            arrays.append(b)
            return [start, len(b)]

        for region, rr in self.relocs.items():
            header["relocs"][region] = {k: put(getattr(rr, k).astype("<i8").tobytes())
                                        for k in ("r64", "r32", "r32_inv")}
        header["text_head"] = put(self.text_head)
        header["ex_table"] = put(self.ex_table)
        header["sym_addrs"] = put(np.array([a for a, _ in self.symbols], dtype="<u8").tobytes())
        header["rodata_file_pages"] = put(np.array(self.rodata_file_pages,
                                                   dtype="<u8").tobytes())
        header["early_idt"] = list(self.early_idt) if self.early_idt else None
        header["alt_relocs"] = {region: [put(b) for b in ar.to_arrays()]
                                for region, ar in self.alt_relocs.items()}
        ro = self.sections.get(".rodata")
        header["kallsyms"] = put(kallsyms_to_bytes(
            self.kallsyms, also=(ro.addr, ro.end) if ro else None)) if self.kallsyms else None
        header["patch_sites"] = (put(patch_sites_to_bytes(self.patch_sites))
                                 if self.patch_sites else None)
        header["optprobe_code"] = put(self.optprobe_code)
        header["layouts"] = self.layouts.to_plain() if self.layouts is not None else None
        header["btf_note"] = self.btf_note
        header["data_symbols"] = {k: [v.addr, v.type, v.span]
                                  for k, v in self.data_symbols.items()}
        head = orjson.dumps(header)
        raw = struct.pack("<I", len(head)) + head + b"".join(arrays)
        return _MAGIC + zstandard.ZstdCompressor(level=9).compress(raw)

    @classmethod
    def from_bytes(cls, blob: bytes) -> KernelProfile:
        if not blob.startswith(_MAGIC):
            raise KernelImageError("stored profile is not in kscan's format", path="<db>")
        try:
            raw = zstandard.ZstdDecompressor().decompress(blob[len(_MAGIC):],
                                                          max_output_size=1 << 30)
            (n,) = struct.unpack_from("<I", raw)
            h = orjson.loads(raw[4:4 + n])
            body = memoryview(raw)[4 + n:]

            def get(ref: list[int]) -> bytes:
                return bytes(body[ref[0]:ref[0] + ref[1]])

            relocs = {
                region: RegionRelocs(*(np.frombuffer(get(refs[k]), dtype="<i8").astype(np.int64)
                                       for k in ("r64", "r32", "r32_inv")))
                for region, refs in h["relocs"].items()
            }
            addrs = np.frombuffer(get(h["sym_addrs"]), dtype="<u8").tolist()
            return cls(
                build_id=h["build_id"], release=h["release"], version=h["version"],
                sections={s[0]: SectionInfo(s[0], s[1], s[2]) for s in h["sections"]},
                relocs=relocs, text_head=get(h["text_head"]), ex_table=get(h["ex_table"]),
                ro_after_init=tuple(h["ro_after_init"]) if h["ro_after_init"] else None,
                symbols=tuple(zip(addrs, h["symbols"], strict=True)),
                rodata_file_pages=tuple(
                    np.frombuffer(get(h["rodata_file_pages"]), dtype="<u8").tolist()),
                early_idt=tuple(h["early_idt"]) if h.get("early_idt") else None,
                alt_relocs={region: AltRelocs.from_arrays([get(r) for r in refs])
                            for region, refs in (h.get("alt_relocs") or {}).items()},
                kallsyms=kallsyms_from_bytes(get(h["kallsyms"])) if h.get("kallsyms") else None,
                patch_sites=(patch_sites_from_bytes(get(h["patch_sites"]))
                             if h.get("patch_sites") else None),
                optprobe_code=get(h["optprobe_code"]) if h.get("optprobe_code") else b"",
                layouts=Layouts.from_plain(h["layouts"]) if h.get("layouts") else None,
                btf_note=str(h.get("btf_note") or "")[:500],
                data_symbols=_data_symbols(h.get("data_symbols") or {}),
            )
        except (zstandard.ZstdError, orjson.JSONDecodeError, KeyError, TypeError, ValueError,
                struct.error) as err:
            raise KernelImageError(f"stored profile is corrupt: {err}", path="<db>") from err


def profile_from_image(image: KernelImage) -> KernelProfile:
    """Reduce a parsed kernel image to its profile."""
    sections = {n: SectionInfo(s.name, s.addr, s.size) for n, s in image.sections.items()}
    relocs: dict[str, RegionRelocs] = {}
    for name in PROTECTED_SECTIONS:
        s = image.sections.get(name)
        if s is None:
            raise KernelImageError(f"no {name} section: not a Linux kernel image",
                                   path=str(image.path))
        if image.relocs is None:
            relocs[name] = RegionRelocs.empty()
        else:
            relocs[name] = RegionRelocs.from_addresses(s.addr, s.size, image.relocs.r64,
                                                       image.relocs.r32, image.relocs.r32_inv)
    text = image.section_bytes(".text")
    ro_after_init = None
    symbols: list[tuple[int, str]] = []
    if image.symbols:
        rod = image.sections[".rodata"]
        a, b = image.symbols.get("__start_ro_after_init"), image.symbols.get("__end_ro_after_init")
        if a is not None and b is not None and rod.addr <= a <= b <= rod.addr + rod.size:
            ro_after_init = (a - rod.addr, b - rod.addr)
        spans = [(image.sections[n].addr, image.sections[n].addr + image.sections[n].size)
                 for n in PROTECTED_SECTIONS]
        symbols = sorted((addr, name) for name, addr in image.symbols.items()
                         if any(lo <= addr < hi for lo, hi in spans))
    return KernelProfile(
        build_id=image.build_id, release=image.release, version=image.version,
        sections=sections, relocs=relocs, text_head=text[:PAGE],
        ex_table=image.section_bytes("__ex_table"), ro_after_init=ro_after_init,
        symbols=tuple(symbols), rodata_file_pages=tuple(file_page_fingerprints(
            image.section_bytes(".rodata"))), early_idt=_early_idt(image),
        alt_relocs={n: ar for n in PROTECTED_SECTIONS
                    if (ar := alt_relocs_from_image(image, n)).count},
        **(patching := _patching(image)),
        **_kernel_types(image, patching.get("kallsyms")),
    )


def _data_symbols(v: Any) -> dict[str, DataSymbol]:
    if not isinstance(v, dict) or len(v) > 1024:
        raise ValueError("bad data symbols")
    out = {}
    for k, (addr, typ, span) in v.items():
        if (type(addr) is not int or not 0 <= addr < 1 << 64 or not isinstance(typ, str)
                or type(span) is not int or not 0 <= span < 1 << 30):
            raise ValueError(f"bad data symbol {k}")
        out[str(k)] = DataSymbol(addr, typ[:1], span)
    return out


def _kernel_types(image: KernelImage, ks: Kallsyms | None) -> dict[str, Any]:
    """Struct layouts from `.BTF` and data symbols from kallsyms. An image without BTF
    still gets a profile; `btf_note` then says (once, in one line) what is off."""
    out: dict[str, Any] = {}
    if ".BTF" not in image.sections:
        out["btf_note"] = ("kernel image has no .BTF section (CONFIG_DEBUG_INFO_BTF off): "
                           "module list and hook attribution checks are off")
    else:
        try:
            out["layouts"] = layouts_from_btf(parse_btf(image.section_bytes(".BTF"),
                                                        where=f"{image.path} .BTF"))
        except KernelImageError as err:
            out["btf_note"] = (f"kernel image's .BTF cannot be read ({err}): module list "
                               "and hook attribution checks are off")[:500]
    if ks is not None:
        out["data_symbols"] = data_symbols_from(ks)
    return out


def _patching(image: KernelImage) -> dict[str, Any]:
    """kallsyms, patch sites and the optprobe template of an image. A kernel without
    kallsyms (or with tables kscan cannot read) still gets a profile: its changes are
    then named by address and any `.text` change is tampering."""
    try:
        ks = recover_kallsyms(image)
    except KernelImageError:
        return {}
    try:
        sites: PatchSites | None = extract_patch_sites(image, ks)
    except KernelImageError:
        sites = None
    code = b""
    if sites is not None and sites.optprobe_template is not None:
        code = _bytes_at(image, *sites.optprobe_template)
    return {"kallsyms": ks, "patch_sites": sites, "optprobe_code": code}


def _bytes_at(image: KernelImage, lo: int, hi: int) -> bytes:
    """The file bytes of link-time [lo, hi) if one section holds them all (≤ 64 KiB)."""
    if not 0 < hi - lo <= 1 << 16:
        return b""
    for sec in image.sections.values():
        if sec.addr <= lo and hi <= sec.addr + sec.size and sec.name not in (".bss",):
            data = image.section_bytes(sec.name)
            return data[lo - sec.addr:hi - sec.addr]
    return b""


def _early_idt(image: KernelImage) -> tuple[int, int] | None:
    """`early_idt_handler_array` (address, stride) found in the image's `.init.text`;
    cross-checked with the symbol when the image has symbols."""
    init = image.sections.get(".init.text")
    if init is None:
        return None
    stubs = find_early_stubs(image.section_bytes(".init.text"), init.addr)
    if stubs is None:
        return None
    sym = (image.symbols or {}).get("early_idt_handler_array")
    if sym is not None and sym != stubs.base:
        return None
    return stubs.base, stubs.stride


def profile_from_path(path: str | PathLike[str], *,
                      system_map: str | PathLike[str] | None = None) -> KernelProfile:
    return profile_from_image(load_kernel_image(path, system_map=system_map))

"""Offline images: a VM handle over an ELF core written by QEMU's `dump-guest-memory`.

`kscan check --core FILE` gives an incident responder the verdict of a live check on a
memory image taken earlier (QMP `dump-guest-memory` with `paging: false`, the default,
or `virsh dump --memory-only`), with no QEMU running. The ELF layout QEMU writes
(dump/dump.c, target/i386/arch_dump.c):

* `ET_CORE`, `ELFCLASS64`, `EM_X86_64` — QEMU picks EM_X86_64 only when the first vCPU
  is in long mode (EFER.LMA); a 32-bit or not-yet-booted guest gives EM_386: refused.
* One `PT_LOAD` per guest-physical RAM block: `p_paddr` is the GPA, `p_offset` where
  its bytes are in the file (`p_filesz` of them). Each becomes a `RamRange` of the core
  file, so `translate.GuestMemory` maps it read-only exactly as it maps a live guest's
  memory-backend file: the same page walk, zero-copy.
* A `PT_NOTE` with, per vCPU, a "CORE" `NT_PRSTATUS` and a "QEMU" note (type 0) whose
  descriptor is `QEMUCPUState` (version 1): general registers, rip, rflags, ten
  segment caches {selector, limit, flags, pad, base} (cs ds es fs gs ss ldt tr gdt idt),
  cr[5], and since QEMU 8 kernel_gs_base. The vCPU state comes from these notes.

What a core does not hold, and how it is filled in (`CoreVm.vcpus`):

* EFER. QEMU's note has no MSRs. An EM_X86_64 core with CR0.PG and CR4.PAE set on a
  vCPU is in long mode (LMA|LME). NXE is taken as set: x86-64 Linux turns it on at
  boot on every CPU with NX, and a kernel running with NXE clear could not touch any of
  its own NX-marked pages (bit 63 would be a reserved bit: #PF) — so assuming NXE never
  hides an executable mapping: a page is reported non-executable only where the guest's
  own entries say XD, which a running kernel with NXE clear cannot have.
* Whether the vCPU was halted: unknown, reported False. CPL is CS.selector & 3.
* The boot profile (QEMU CPU model and CPUID features: QMP only). `boot_profile()`
  returns an "unknown" model; `kscan check --core` then picks the golden baseline of
  the kernel's build id by `--boot-profile KEY`, or the only one stored for that build
  (and the page-table isolation observed in the image); see
  `scanner.commands.offline`. SMEP/SMAP are taken as offered when any vCPU has them
  on, so a vCPU that turned them off while another kept them is still a finding;
  all vCPUs turning them off is not seen on a core (it is on a live VM).

The file is hostile input (it is a compromised VM's memory, and the operator may be
handed any file): every count, size and offset is checked against the file and bounded
before use; anything else is refused with one `CoreFileError` line. The kdump-compressed
formats (`dump-guest-memory format=kdump-*`, makedumpfile) and Windows dumps are
recognised and refused with a hint to dump as ELF.
"""

from __future__ import annotations

import itertools
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from scanner.errors import CoreFileError
from scanner.qemu.hmp import MAX_VCPUS, VcpuState
from scanner.qemu.qmp import RunState, RunStatus
from scanner.vm.bootprofile import BootProfile
from scanner.vm.progress import Sample
from translate import GuestMemory, PageWalker, RamRange, kernel_walker
from translate.physmem import append_ram
from translate.x86 import CR0_PG, CR4_PAE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_NXE

__all__ = ["CORE_CPU_MODEL", "CoreVm", "read_core"]

#: The cpu_model of a core's boot profile: QEMU's CPU model is not in the image.
CORE_CPU_MODEL = "unknown (core file)"

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_SHDR0 = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr (section 0 holds phnum if PN_XNUM)
_NHDR = struct.Struct("<III")  # Elf64_Nhdr: namesz, descsz, type
_SEG = struct.Struct("<IIIIQ")  # QEMUCPUSegment: selector, limit, flags, pad, base

ET_CORE, EM_X86_64, EM_386 = 4, 62, 3
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
EFER_LME = 1 << 8

#: Bounds on what a core may ask kscan to read (a real one is far below each).
MAX_SEGMENTS = 4096  # PT_LOAD blocks (QEMU writes one per RAM block)
MAX_NOTES = 8 << 20  # bytes of PT_NOTE in all (QEMU: ~820 B per vCPU, 4096 vCPUs: 3.3 MiB)
MAX_GPA = 1 << 52  # the x86-64 architectural physical-address limit

#: QEMUCPUState offsets: after version and size, 16 GPRs, rip, rflags, then 10 segments.
_RIP = 8 + 16 * 8
_SEGS = _RIP + 16
_SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
_CRS = _SEGS + len(_SEG_NAMES) * _SEG.size  # 392: cr[0..4]
_MIN_STATE = _CRS + 5 * 8  # 432: version 1 without kernel_gs_base (QEMU < 8.0)

_REFUSED = {
    b"KDUMP   ": "a kdump-compressed dump (dump-guest-memory format=kdump-*/makedumpfile)",
    b"makedumpfile": "a makedumpfile flattened dump",
    b"PAGEDU64": "a Windows crash dump (dump-guest-memory format=win-dmp)",
}
_HINT = ("take the image as ELF: QMP dump-guest-memory with paging=false and no format "
         "(the default), or virsh dump --memory-only --format elf")


def _bad(path: str, message: str, offset: int | None = None, hint: str = "") -> CoreFileError:
    return CoreFileError(message, path=path, offset=offset, hint=hint)


def _pread(fd: int, size: int, offset: int, path: str, file_size: int, what: str) -> bytes:
    if offset < 0 or size < 0 or offset + size > file_size:
        raise _bad(path, f"{what} ({size} B) lies outside the file ({file_size} B)", offset)
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise _bad(path, f"{what}: short read", offset)
    return data


def _notes(blob: bytes, base: int, path: str) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of each ELF note in `blob` (file offset `base`)."""
    pos = 0
    while pos + _NHDR.size <= len(blob):
        namesz, descsz, ntype = _NHDR.unpack_from(blob, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + (namesz + 3 & ~3)
        end = desc_at + (descsz + 3 & ~3)
        if desc_at + descsz > len(blob):
            raise _bad(path, "ELF note runs past its PT_NOTE segment", base + pos)
        yield bytes(blob[name_at:name_at + namesz]).rstrip(b"\0"), ntype, \
            bytes(blob[desc_at:desc_at + descsz])
        pos = end


def _vcpu(index: int, desc: bytes, path: str, at: int) -> VcpuState:
    """One vCPU's state from a "QEMU" note's QEMUCPUState."""
    if len(desc) < 8:
        raise _bad(path, f"vCPU {index}: QEMU CPU-state note too short ({len(desc)} B)", at)
    version, size = struct.unpack_from("<II", desc)
    if version != 1:
        raise _bad(path, f"vCPU {index}: QEMU CPU-state version {version} (kscan reads 1)",
                   at, hint="a newer QEMU changed the layout; report it to kscan")
    if not _MIN_STATE <= size <= len(desc):
        raise _bad(path, f"vCPU {index}: QEMU CPU-state size {size} (need {_MIN_STATE}.."
                   f"{len(desc)})", at)
    rip = struct.unpack_from("<Q", desc, _RIP)[0]
    segs = {n: _SEG.unpack_from(desc, _SEGS + i * _SEG.size) for i, n in enumerate(_SEG_NAMES)}
    cr0, _cr1, _cr2, cr3, cr4 = struct.unpack_from("<5Q", desc, _CRS)
    efer = 0
    if cr0 & CR0_PG and cr4 & CR4_PAE:  # in an EM_X86_64 core: long mode (see above)
        efer = EFER_LME | EFER_LMA | EFER_NXE
    cs_sel, idt, gdt = segs["cs"][0], segs["idt"], segs["gdt"]
    return VcpuState(index=index, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer,
                     idtr_base=idt[4], idtr_limit=idt[1], gdtr_base=gdt[4],
                     gdtr_limit=gdt[1], rip=rip, cpl=cs_sel & 3, halted=False)


def read_core(path: str | os.PathLike[str]) -> tuple[list[RamRange], list[VcpuState]]:
    """The RAM ranges (of the core file itself) and vCPU states of a QEMU ELF core."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        raise _bad(p, f"cannot open: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _bad(p, "not a regular file")
        return _parse(fd, p, st.st_size)
    except OSError as err:
        raise _bad(p, f"cannot read: {err.strerror or err}") from err
    finally:
        os.close(fd)


def _parse(fd: int, p: str, size: int) -> tuple[list[RamRange], list[VcpuState]]:
    if size < _EHDR.size:
        raise _bad(p, f"too small for an ELF core ({size} B)")
    head = _pread(fd, _EHDR.size, 0, p, size, "ELF header")
    for magic, what in _REFUSED.items():
        if head.startswith(magic):
            raise _bad(p, f"{what} is not supported", hint=_HINT)
    (ident, e_type, machine, _ver, _entry, phoff, shoff, _flags, _ehsize, phentsize,
     phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack(head)
    if ident[:4] != b"\x7fELF":
        raise _bad(p, "not an ELF file (nor a known dump format)", hint=_HINT)
    if ident[4] != 2 or ident[5] != 1:
        raise _bad(p, "not a 64-bit little-endian ELF core", hint="kscan checks x86-64 guests")
    if e_type != ET_CORE:
        raise _bad(p, f"ELF type {e_type}, not a core (4)", hint=_HINT)
    if machine == EM_386:
        raise _bad(p, "a 32-bit guest, or one dumped before its kernel entered long mode",
                   hint="dump the VM once its 64-bit kernel has booted")
    if machine != EM_X86_64:
        raise _bad(p, f"ELF machine {machine}, not x86-64 (62)")
    if phentsize != _PHDR.size:
        raise _bad(p, f"program header size {phentsize}, not {_PHDR.size}")
    if phnum == PN_XNUM:  # more than 65534 headers: the count is in section 0's sh_info
        sh0 = _SHDR0.unpack(_pread(fd, _SHDR0.size, shoff, p, size, "section header 0"))
        phnum = sh0[7]
    if not 0 < phnum <= MAX_SEGMENTS + 1:
        raise _bad(p, f"{phnum} program headers (kscan reads 1..{MAX_SEGMENTS + 1})")
    table = _pread(fd, phnum * _PHDR.size, phoff, p, size, "program header table")
    ranges: list[RamRange] = []
    note_blobs: list[tuple[int, bytes]] = []
    note_bytes = 0
    for i in range(phnum):
        ptype, _pf, off, _va, gpa, filesz, _memsz, _align = _PHDR.unpack_from(
            table, i * _PHDR.size)
        if ptype == PT_NOTE:
            note_bytes += filesz
            if note_bytes > MAX_NOTES:
                raise _bad(p, f"notes exceed {MAX_NOTES} B", off)
            note_blobs.append((off, _pread(fd, filesz, off, p, size, "PT_NOTE segment")))
        elif ptype == PT_LOAD and filesz:
            if off + filesz > size:
                raise _bad(p, f"RAM block gpa {gpa:#x}+{filesz:#x} lies past the end of the "
                           f"file ({size} B): the file is truncated", off)
            if gpa + filesz > MAX_GPA:
                raise _bad(p, f"RAM block gpa {gpa:#x}+{filesz:#x} beyond 2^52", off)
            append_ram(ranges, RamRange(gpa, filesz, p, off))
    if not ranges:
        raise _bad(p, "no RAM (PT_LOAD) in the core")
    ranges.sort(key=lambda r: r.gpa)
    for a, b in itertools.pairwise(ranges):
        if b.gpa < a.end:
            raise _bad(p, f"RAM blocks overlap at gpa {b.gpa:#x}", b.offset)
    vcpus: list[VcpuState] = []
    for base, blob in note_blobs:
        for name, ntype, desc in _notes(blob, base, p):
            if name == b"QEMU" and ntype == 0:
                if len(vcpus) >= MAX_VCPUS:
                    raise _bad(p, f"more than {MAX_VCPUS} vCPU notes", base)
                vcpus.append(_vcpu(len(vcpus), desc, p, base))
    if not vcpus:
        raise _bad(p, "no QEMU CPU-state notes: the vCPUs' control registers are unknown",
                   hint="only cores written by QEMU's dump-guest-memory (or virsh dump "
                        "--memory-only) carry them")
    return ranges, vcpus


class CoreVm:
    """A VM handle (`scanner.vm.handle.VmHandle`) over an ELF core: read-only, frozen in
    time. Its state is "paused" (nothing runs); `pause` does nothing."""

    def __init__(self, path: str, name: str, mem: GuestMemory, vcpus: list[VcpuState]) -> None:
        self.path = path
        self.name = name
        self.mem = mem
        self.vcpus = vcpus
        self.layout = list(mem.ranges)
        self.uuid: str | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike[str], name: str | None = None) -> CoreVm:
        """`name`: the VM the image was taken from (its per-VM state is used); default
        the file's name without its suffix."""
        p = os.fspath(path)
        ranges, vcpus = read_core(p)
        vm_name = name or Path(p).stem
        return cls(p, vm_name, GuestMemory(ranges, name=vm_name), vcpus)

    def walker(self, vcpu: int = 0) -> PageWalker:
        return kernel_walker(self.mem, self.vcpus[vcpu])

    async def refresh_vcpus(self) -> list[VcpuState]:
        return self.vcpus

    async def run_state(self) -> RunState:
        return RunState(RunStatus.PAUSED, False)

    async def boot_profile(self) -> BootProfile:
        """Unknown model and features (see the module docstring); SMEP/SMAP as offered
        when any vCPU has them on."""
        return BootProfile(CORE_CPU_MODEL, "unknown", len(self.vcpus),
                           any(v.cr4 & CR4_SMEP for v in self.vcpus),
                           any(v.cr4 & CR4_SMAP for v in self.vcpus))

    def resets(self) -> int:
        return 0

    async def pause(self) -> None:
        return None

    async def progress(self) -> Sample | None:
        return None  # no vCPU threads: the host cannot tell

    async def close(self) -> None:
        self.mem.close()

    async def __aenter__(self) -> CoreVm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

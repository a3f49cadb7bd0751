"""Kernel image reading: get the decompressed vmlinux payload out of a bzImage/vmlinuz.

An x86 bzImage is real-mode setup code followed by the protected-mode decompressor
(arch/x86/boot/header.S, Documentation/arch/x86/boot.rst). The setup header says where
the compressed kernel is:

* ``setup_sects`` (u8 at 0x1f1; 0 means 4) — the protected-mode code starts at
  ``(setup_sects + 1) * 512`` in the file,
* ``"HdrS"`` at 0x202, boot protocol version (u16 at 0x206; payload fields need >= 2.08),
* ``payload_offset`` / ``payload_length`` (u32 at 0x248 / 0x24c), relative to the start
  of the protected-mode code.

The payload is what ``arch/x86/boot/compressed/Makefile`` builds: vmlinux.bin (the
vmlinux ELF, objcopy'd without symbols) followed by the KASLR relocation table,
compressed with one of gzip, bzip2, lzma (legacy "alone" format), xz, lzo (lzop file
format), lz4 (legacy frame format) or zstd, and followed by the decompressed size as a
little-endian u32 (``size_append`` in scripts/Makefile.lib; for gzip the stream's own
ISIZE field plays that part). The compressor is recognised by its magic, as
lib/decompress.c does.

`extract_vmlinux` returns the whole decompressed payload — the ELF *and* the relocation
table after it (`scanner.image.vmlinux` parses both). Input that is already an ELF is returned
unchanged. Decompression is streamed with a cap on the output size, so a decompression
bomb fails fast with `KernelImageError` instead of filling memory.

LZO needs the optional package ``lzallright`` (LZO1X in safe Rust, on PyPI); without it
an lzo kernel raises `KernelImageError` telling the user to install it or pass a vmlinux.
Every failure, including those of the third-party decompressors, is a
`scanner.errors.KernelImageError` naming the file and the numbers found.
"""

from __future__ import annotations

import bz2
import lzma
import os
import stat
import struct
import zlib
from collections.abc import Callable
from os import PathLike

from scanner.errors import KernelImageError

__all__ = ["DEFAULT_MAX_OUTPUT", "detect_compression", "extract_vmlinux", "read_regular_file"]

#: Default cap on the decompressed payload (a real x86-64 kernel is ~30-80 MiB).
DEFAULT_MAX_OUTPUT = 512 << 20
#: Cap on the image file read (a bzImage is ~10 MiB; a vmlinux with debug info can
#: reach several hundred MiB).
MAX_IMAGE_BYTES = 1 << 30

ELF_MAGIC = b"\x7fELF"

# Setup header (Documentation/arch/x86/boot.rst, "The real-mode kernel header").
_SETUP_SECTS = 0x1F1
_BOOT_FLAG = 0x1FE
_HDRS = 0x202
_VERSION = 0x206
_PAYLOAD_OFFSET = 0x248
_PAYLOAD_LENGTH = 0x24C
_HEADER_END = 0x250
_MIN_PAYLOAD_PROTOCOL = 0x0208

# Magic numbers, as in lib/decompress.c compressed_formats[].
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x1f\x9e", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x89LZO\x00\r\n\x1a\n", "lzo"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)

# Output is produced in pieces of this size, so the cap is checked at least this often.
_CHUNK = 4 << 20

# LZ4 legacy frame format (lib/decompress_unlz4.c).
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_BLOCK_OUT = 8 << 20
_LZ4_BLOCK_IN_MAX = _LZ4_BLOCK_OUT + _LZ4_BLOCK_OUT // 255 + 16  # LZ4_compressBound

# lzop file format (lzop's lzop.h; lib/decompress_unlzo.c reads the same).
_LZO_BLOCK_MAX = 64 << 20  # lzop writes 256 KiB blocks; lzop itself accepts up to 64 MiB
_F_ADLER32_D = 0x0001
_F_ADLER32_C = 0x0002
_F_H_EXTRA_FIELD = 0x0040
_F_H_FILTER = 0x0800
_F_CRC32_D = 0x0100
_F_CRC32_C = 0x0200

# liblzma: refuse dictionaries that would need more than this (kernels use <= 64 MiB).
_LZMA_MEMLIMIT = 1 << 30
# zstd: kernels are compressed with -22 --ultra, window log 27 (128 MiB).
_ZSTD_MAX_WINDOW = 1 << 27


def detect_compression(data: bytes | memoryview) -> str | None:
    """Name of the compressor whose magic starts `data` ("gzip", ..., "zstd"), or None."""
    head = bytes(data[:16])
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    return None


def extract_vmlinux(path_or_bytes: str | PathLike[str] | bytes | bytearray | memoryview, *,
                    max_output: int = DEFAULT_MAX_OUTPUT) -> bytes:
    """Return the decompressed kernel payload (vmlinux ELF + relocation table).

    `path_or_bytes` is a bzImage/vmlinuz file (path or contents) or an ELF, which is
    returned as is. The decompressed size may not exceed `max_output` bytes.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        where = "<bytes>"
        data = bytes(path_or_bytes)
    else:
        where = str(path_or_bytes)
        data = _read_image(where)
    if data[:4] == ELF_MAGIC:
        return data
    offset, length = _locate_payload(data, where)
    payload = memoryview(data)[offset:offset + length]
    return _decompress_payload(payload, where=where, base=offset, max_output=max_output)


def read_regular_file(where: str, limit: int, what: str = "kernel image") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (no FIFO, no device:
    `/dev/zero` would be read forever, a FIFO would block in open)."""
    return _read_image(where, limit, what)


def _read_image(where: str, limit: int | None = None, what: str = "kernel image") -> bytes:
    limit = MAX_IMAGE_BYTES if limit is None else limit
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; refused just below.
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KernelImageError("not a regular file", path=where,
                                       hint="pass a kernel image file (bzImage/vmlinuz "
                                            "or vmlinux)")
            if st.st_size > limit:
                raise KernelImageError(
                    f"file is {st.st_size:#x} bytes, more than a {what}'s {limit:#x}",
                    path=where)
            os.set_blocking(fd, True)
            data = f.read(limit + 1)
    except OSError as err:
        raise KernelImageError(f"cannot read {what}: {err.strerror or err}",
                               path=where) from err
    if len(data) > limit:  # it grew while being read
        raise KernelImageError(f"file grew past {limit:#x} bytes while read", path=where)
    return data


# --------------------------------------------------------------------------- bzImage


def _locate_payload(data: bytes, where: str) -> tuple[int, int]:
    """(file offset, length) of the compressed payload, from the setup header."""
    size = len(data)
    if size < _HEADER_END:
        raise KernelImageError(
            f"file is {size:#x} bytes, too short for an x86 boot setup header "
            f"(needs {_HEADER_END:#x}) and not an ELF",
            path=where, hint="pass a bzImage/vmlinuz or a vmlinux ELF")
    magic = data[_HDRS:_HDRS + 4]
    if magic != b"HdrS":
        raise KernelImageError(
            f"no x86 boot setup header: found {magic!r} at 0x202 instead of b'HdrS', "
            f"and the file is not an ELF (starts with {data[:4].hex()})",
            path=where, offset=_HDRS, hint="pass a bzImage/vmlinuz or a vmlinux ELF")
    boot_flag = struct.unpack_from("<H", data, _BOOT_FLAG)[0]
    if boot_flag != 0xAA55:
        raise KernelImageError(f"boot_flag is {boot_flag:#06x}, not 0xaa55",
                               path=where, offset=_BOOT_FLAG)
    version = struct.unpack_from("<H", data, _VERSION)[0]
    if version < _MIN_PAYLOAD_PROTOCOL:
        raise KernelImageError(
            f"boot protocol {version >> 8}.{version & 0xff:02d} has no payload_offset "
            f"field (needs 2.08, kernels >= 2.6.26)",
            path=where, offset=_VERSION, hint="pass the vmlinux ELF instead")
    setup_sects = data[_SETUP_SECTS] or 4
    pm_start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", data, _PAYLOAD_OFFSET)
    start = pm_start + payload_offset
    end = start + payload_length
    if end > size:
        raise KernelImageError(
            f"payload_offset {payload_offset:#x} + length {payload_length:#x} "
            f"(protected-mode code at {pm_start:#x}, setup_sects {setup_sects}) ends at "
            f"{end:#x}, past end of file {size:#x}",
            path=where, offset=_PAYLOAD_OFFSET, hint="the file is truncated or not a bzImage")
    if payload_length < 8:
        raise KernelImageError(f"payload_length {payload_length:#x} is too small",
                               path=where, offset=_PAYLOAD_LENGTH)
    return start, payload_length


def _decompress_payload(payload: memoryview, *, where: str, base: int,
                        max_output: int) -> bytes:
    kind = detect_compression(payload)
    if kind is None:
        if bytes(payload[:4]) == ELF_MAGIC:
            return bytes(payload)
        raise KernelImageError(
            f"unknown payload compression, first bytes {bytes(payload[:8]).hex()}",
            path=where, offset=base,
            hint="known: gzip, bzip2, lzma, xz, lzo, lz4, zstd; pass a vmlinux instead")
    # The build appends the decompressed size (u32 LE); gzip's own ISIZE is that field.
    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    body = payload if kind == "gzip" else payload[:-4]
    if expected > max_output and max_output < 1 << 32:
        raise KernelImageError(
            f"{kind} payload's size trailer says {expected:#x} bytes, more than "
            f"max_output {max_output:#x}", path=where, offset=base + len(payload) - 4,
            hint="the image is corrupt or hostile; raise max_output only if you trust it")
    decompress = _DECOMPRESSORS[kind]
    try:
        out = decompress(body, max_output, where, base)
    except KernelImageError:
        raise
    except _library_errors() as err:
        raise KernelImageError(f"{kind} payload is corrupt: {err}", path=where,
                               offset=base) from err
    if len(out) & 0xFFFFFFFF != expected:
        raise KernelImageError(
            f"{kind} payload decompressed to {len(out):#x} bytes but its size trailer "
            f"says {expected:#x}",
            path=where, offset=base + len(payload) - 4,
            hint="the payload is truncated or corrupt")
    if out[:4] != ELF_MAGIC:
        raise KernelImageError(
            f"decompressed {kind} payload does not start with an ELF header "
            f"(found {out[:4].hex()})", path=where, offset=base)
    return out


# --------------------------------------------------------------------------- decompressors


def _library_errors() -> tuple[type[BaseException], ...]:
    """The exception classes the decompressors raise on bad input."""
    import lz4.block
    import zstandard

    errors: list[type[BaseException]] = [
        EOFError, ValueError, zlib.error, lzma.LZMAError, OSError, MemoryError,
        lz4.block.LZ4BlockError, zstandard.ZstdError,
    ]
    try:
        from lzallright import LZOError
    except ImportError:
        pass
    else:
        errors.append(LZOError)
    return tuple(errors)


def _too_big(kind: str, max_output: int, where: str, base: int) -> KernelImageError:
    return KernelImageError(
        f"{kind} payload decompresses to more than max_output {max_output:#x} bytes",
        path=where, offset=base,
        hint="a kernel is far smaller: the image is corrupt or hostile; "
             "raise max_output only if you trust it")


def _truncated(kind: str, got: int, where: str, base: int) -> KernelImageError:
    return KernelImageError(
        f"{kind} payload ends before its compressed stream does "
        f"(after {got:#x} bytes of output)",
        path=where, offset=base, hint="the image is truncated")


def _gzip(body: memoryview, max_output: int, where: str, base: int) -> bytes:
    dec = zlib.decompressobj(wbits=31)
    step = min(_CHUNK, max_output + 1)
    chunks: list[bytes] = []
    total = 0
    data: bytes | memoryview = body
    while True:
        out = dec.decompress(data, step)
        total += len(out)
        if total > max_output:
            raise _too_big("gzip", max_output, where, base)
        chunks.append(out)
        if dec.eof:
            break
        data = dec.unconsumed_tail
        if not data and not out:
            raise _truncated("gzip", total, where, base)
    return b"".join(chunks)


def _stdlib_stream(kind: str, dec: bz2.BZ2Decompressor | lzma.LZMADecompressor,
                   body: memoryview, max_output: int, where: str, base: int) -> bytes:
    step = min(_CHUNK, max_output + 1)
    chunks: list[bytes] = []
    total = 0
    data: bytes | memoryview = body
    while not dec.eof:
        if dec.needs_input and not data:
            raise _truncated(kind, total, where, base)
        out = dec.decompress(data, max_length=step)
        data = b""
        total += len(out)
        if total > max_output:
            raise _too_big(kind, max_output, where, base)
        chunks.append(out)
    return b"".join(chunks)


def _bzip2(body: memoryview, max_output: int, where: str, base: int) -> bytes:
    return _stdlib_stream("bzip2", bz2.BZ2Decompressor(), body, max_output, where, base)


def _lzma(body: memoryview, max_output: int, where: str, base: int) -> bytes:
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=_LZMA_MEMLIMIT)
    return _stdlib_stream("lzma", dec, body, max_output, where, base)


def _xz(body: memoryview, max_output: int, where: str, base: int) -> bytes:
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_LZMA_MEMLIMIT)
    return _stdlib_stream("xz", dec, body, max_output, where, base)


def _zstd(body: memoryview, max_output: int, where: str, base: int) -> bytes:
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    declared = zstandard.frame_content_size(bytes(body[:18]))
    if declared > max_output:
        raise _too_big("zstd", max_output, where, base)
    step = min(_CHUNK, max_output + 1)
    chunks: list[bytes] = []
    total = 0
    with dctx.stream_reader(body, read_across_frames=False, closefd=False) as reader:
        while True:
            out = reader.read(step)
            if not out:
                break
            total += len(out)
            if total > max_output:
                raise _too_big("zstd", max_output, where, base)
            chunks.append(out)
    # The reader returns short output for a truncated frame instead of failing.
    if declared >= 0 and declared != total:
        raise _truncated("zstd", total, where, base)
    return b"".join(chunks)


def _lz4(body: memoryview, max_output: int, where: str, base: int) -> bytes:
    import lz4.block

    size = len(body)
    pos = 4  # past the magic (checked by detect_compression)
    chunks: list[bytes] = []
    total = 0
    while pos < size:
        if pos + 4 > size:
            raise KernelImageError(
                f"lz4 block header at {pos:#x} runs past the payload end {size:#x}",
                path=where, offset=base + pos)
        length = struct.unpack_from("<I", body, pos)[0]
        pos += 4
        if length == _LZ4_LEGACY_MAGIC:  # a concatenated legacy frame: keep going
            continue
        if length > _LZ4_BLOCK_IN_MAX or pos + length > size:
            raise KernelImageError(
                f"lz4 block at {pos - 4:#x} has length {length:#x}; the payload ends at "
                f"{size:#x} and a block is at most {_LZ4_BLOCK_IN_MAX:#x}",
                path=where, offset=base + pos - 4, hint="the image is truncated or corrupt")
        out = lz4.block.decompress(body[pos:pos + length], uncompressed_size=_LZ4_BLOCK_OUT)
        pos += length
        total += len(out)
        if total > max_output:
            raise _too_big("lz4", max_output, where, base)
        chunks.append(out)
    return b"".join(chunks)


def _lzo(body: memoryview, max_output: int, where: str, base: int) -> bytes:
    try:
        from lzallright import LZOCompressor
    except ImportError as err:
        raise KernelImageError(
            "the kernel payload is LZO-compressed and LZO support is not installed",
            path=where, offset=base,
            hint="pip install lzallright, or pass the vmlinux ELF instead") from err

    def need(pos: int, count: int, what: str) -> None:
        if pos + count > len(body):
            raise KernelImageError(
                f"lzo {what} at {pos:#x} (+{count:#x}) runs past the payload end "
                f"{len(body):#x}", path=where, offset=base + pos,
                hint="the image is truncated or corrupt")

    def be32(pos: int) -> int:
        value: int = struct.unpack_from(">I", body, pos)[0]
        return value

    # Header: magic(9) version(2) lib_version(2) [version_needed(2)] method(1) [level(1)]
    # flags(4) [filter(4)] mode(4) mtime_low(4) [mtime_high(4)] name_len(1) name checksum(4)
    need(0, 16, "header")
    version = struct.unpack_from(">H", body, 9)[0]
    pos = 13
    if version >= 0x0940:
        pos += 2  # version needed to extract
    pos += 1  # method
    if version >= 0x0940:
        pos += 1  # level
    need(pos, 4, "header flags")
    flags = be32(pos)
    pos += 4
    if flags & _F_H_FILTER:
        raise KernelImageError(f"lzo header flags {flags:#x} name a filter; unsupported",
                               path=where, offset=base + pos - 4)
    pos += 8 + (4 if version >= 0x0940 else 0)  # mode, mtime_low[, mtime_high]
    need(pos, 1, "header name length")
    pos += 1 + body[pos] + 4  # name, header checksum
    if flags & _F_H_EXTRA_FIELD:
        need(pos, 4, "extra field length")
        pos += 4 + be32(pos) + 4
    chunks: list[bytes] = []
    total = 0
    while True:
        need(pos, 4, "block length")
        dst_len = be32(pos)
        pos += 4
        if dst_len == 0:  # end of stream
            break
        need(pos, 4, "block header")
        src_len = be32(pos)
        pos += 4
        if dst_len > _LZO_BLOCK_MAX or src_len == 0 or src_len > dst_len:
            raise KernelImageError(
                f"lzo block at {pos - 8:#x}: compressed {src_len:#x} / decompressed "
                f"{dst_len:#x} bytes is not a valid block", path=where, offset=base + pos - 8)
        checks: list[tuple[Callable[[bytes], int], int]] = []
        if flags & _F_ADLER32_D:
            need(pos, 4, "block checksum")
            checks.append((zlib.adler32, be32(pos)))
            pos += 4
        if flags & _F_CRC32_D:
            need(pos, 4, "block checksum")
            checks.append((zlib.crc32, be32(pos)))
            pos += 4
        if src_len < dst_len:
            pos += 4 * bool(flags & _F_ADLER32_C) + 4 * bool(flags & _F_CRC32_C)
        need(pos, src_len, "block data")
        total += dst_len
        if total > max_output:
            raise _too_big("lzo", max_output, where, base)
        block = body[pos:pos + src_len]
        out = bytes(block) if src_len == dst_len else LZOCompressor.decompress(block, dst_len)
        if len(out) != dst_len or any(fn(out) != want for fn, want in checks):
            raise KernelImageError(
                f"lzo block at {pos:#x} decompressed to {len(out):#x} bytes, expected "
                f"{dst_len:#x} (or its checksum does not match)", path=where, offset=base + pos)
        pos += src_len
        chunks.append(out)
    return b"".join(chunks)


_DECOMPRESSORS: dict[str, Callable[[memoryview, int, str, int], bytes]] = {
    "gzip": _gzip,
    "bzip2": _bzip2,
    "lzma": _lzma,
    "xz": _xz,
    "zstd": _zstd,
    "lz4": _lz4,
    "lzo": _lzo,
}

"""scanner.image.kimage: bzImage payload extraction, every compressor, hostile images.

The real Debian cloud kernel (tools.guests.ensure_kernel) is the reference: its payload
is re-compressed here with each compressor the kernel build can use, spliced into a
synthetic bzImage behind the real setup header, and must come back byte for byte.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner.errors import KernelImageError
from scanner.image.kimage import detect_compression, extract_vmlinux
from tests.needs import require_tool, unavailable

SETUP_SECTS = 0x1F1
PAYLOAD_OFFSET = 0x248
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vmlinuz() -> Path:
    from tools.guests import GuestError, ensure_kernel

    try:
        return ensure_kernel().vmlinuz
    except (GuestError, OSError, subprocess.CalledProcessError) as err:
        unavailable(f"Debian cloud kernel not available: {err}")


@pytest.fixture(scope="module")
def image(vmlinuz: Path) -> bytes:
    return vmlinuz.read_bytes()


@pytest.fixture(scope="module")
def payload(vmlinuz: Path) -> bytes:
    return extract_vmlinux(vmlinuz)


def pm_start(image: bytes) -> int:
    return ((image[SETUP_SECTS] or 4) + 1) * 512


def size_trailer(data: bytes) -> bytes:
    """What kbuild's size_append writes: the decompressed size, u32 little-endian."""
    return struct.pack("<I", len(data) & 0xFFFFFFFF)


def make_bzimage(image: bytes, compressed: bytes, *, gap: int = 0x2CC) -> bytes:
    """The real setup code, a stand-in decompressor of `gap` bytes, then the payload."""
    start = pm_start(image)
    out = bytearray(image[:start])
    struct.pack_into("<II", out, PAYLOAD_OFFSET, gap, len(compressed))
    return bytes(out) + b"\x90" * gap + compressed + b"\xcc" * 100


def lz4_legacy(data: bytes) -> bytes:
    """LZ4 legacy frame format as `lz4 -l` writes it: magic, (le32 length, block)*."""
    out = [LZ4_LEGACY_MAGIC]
    for pos in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[pos:pos + (8 << 20)], store_size=False)
        out += [struct.pack("<I", len(block)), block]
    return b"".join(out)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, 1, mtime=0)  # gzip's ISIZE is the trailer


def _bzip2(data: bytes) -> bytes:
    return bz2.compress(data, 1) + size_trailer(data)


def _lzma(data: bytes) -> bytes:
    # .lzma "alone", unknown size + end marker, as `lzma -9 < vmlinux.bin` writes it.
    return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=0) + size_trailer(data)


def _xz(data: bytes) -> bytes:
    # scripts/xz_wrap.sh: --check=crc32 and the x86 BCJ filter before LZMA2.
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 0}]
    return (lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                          filters=filters) + size_trailer(data))


def _zstd(data: bytes) -> bytes:
    # From a pipe the zstd CLI writes no content size; it adds a checksum.
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=False, write_checksum=True)
    return cctx.compress(data) + size_trailer(data)


def _lz4(data: bytes) -> bytes:
    return lz4_legacy(data) + size_trailer(data)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _gzip, "bzip2": _bzip2, "lzma": _lzma, "xz": _xz, "zstd": _zstd, "lz4": _lz4,
}
#: Compressors too slow (~3 s per 50 MiB) to run over the whole payload in a quick test:
#: they get its first 12 MiB (ELF headers, .text) and last 2 MiB (relocation table).
SLOW = {"bzip2", "lzma", "xz"}


def sample_of(payload: bytes, kind: str) -> bytes:
    return payload[:12 << 20] + payload[-(2 << 20):] if kind in SLOW else payload


@pytest.fixture(scope="module")
def recompressed(payload: bytes) -> dict[str, bytes]:
    """The payload compressed with each compressor (in threads: they drop the GIL)."""
    with ThreadPoolExecutor(max_workers=len(COMPRESSORS)) as pool:
        futures = {name: pool.submit(fn, sample_of(payload, name))
                   for name, fn in COMPRESSORS.items()}
        return {name: fut.result() for name, fut in futures.items()}


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decompress in 1 MiB pieces, so every streaming loop goes round many times."""
    monkeypatch.setattr("scanner.image.kimage._CHUNK", 1 << 20)


# --------------------------------------------------------------------------- real kernel


def test_real_kernel_payload_is_lz4_and_extracts_to_elf(image: bytes, payload: bytes) -> None:
    assert image[0x202:0x206] == b"HdrS"
    off, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET)
    start = pm_start(image) + off
    assert detect_compression(image[start:start + 16]) == "lz4"
    assert payload[:4] == b"\x7fELF"
    # The build's size trailer (last 4 bytes of the payload) names the output size.
    assert struct.unpack_from("<I", image, start + length - 4)[0] == len(payload)


def test_real_kernel_extraction_is_fast(vmlinuz: Path) -> None:
    began = time.perf_counter()
    out = extract_vmlinux(vmlinuz)
    elapsed = time.perf_counter() - began
    assert out[:4] == b"\x7fELF"
    assert elapsed < 2.0, f"extraction took {elapsed:.2f} s"


def test_elf_input_is_returned_unchanged(payload: bytes, tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(payload)
    assert extract_vmlinux(path) == payload
    assert extract_vmlinux(memoryview(payload)) == payload


def test_payload_is_accepted_by_readelf(payload: bytes, tmp_path: Path) -> None:
    require_tool("readelf")
    path = tmp_path / "vmlinux"
    path.write_bytes(payload)
    out = subprocess.run(["readelf", "-h", "-W", str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert "Advanced Micro Devices X86-64" in out
    assert "EXEC (Executable file)" in out


# --------------------------------------------------------------------------- compressors


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_recompressed_payload_round_trips(kind: str, image: bytes, payload: bytes,
                                          recompressed: dict[str, bytes],
                                          small_chunks: None) -> None:
    compressed = recompressed[kind]
    assert detect_compression(compressed) == kind
    bz = make_bzimage(image, compressed)
    expected = sample_of(payload, kind)
    assert len(expected) > 8 << 20
    assert extract_vmlinux(bz) == expected


def test_lz4_concatenated_legacy_frames(image: bytes, payload: bytes) -> None:
    """A second magic in the block stream starts another frame (lib/decompress_unlz4.c)."""
    half = (len(payload) // 2) & ~((8 << 20) - 1)
    body = lz4_legacy(payload[:half]) + lz4_legacy(payload[half:])
    assert body.count(LZ4_LEGACY_MAGIC) >= 2
    assert extract_vmlinux(make_bzimage(image, body + size_trailer(payload))) == payload


def test_setup_sects_zero_means_four(image: bytes, payload: bytes) -> None:
    """boot.rst: setup_sects 0 means 4; the payload is then found after 5 sectors."""
    compressed = _lz4(payload[:1 << 20])
    setup = bytearray(image[:5 * 512])
    setup[SETUP_SECTS] = 0
    struct.pack_into("<II", setup, PAYLOAD_OFFSET, 0x40, len(compressed))
    bz = bytes(setup) + b"\0" * 0x40 + compressed
    assert extract_vmlinux(bz) == payload[:1 << 20]


_CLI = {
    "gzip": ["gzip", "-1", "-n", "-c"],
    "bzip2": ["bzip2", "-1", "-c"],
    "lzma": ["lzma", "-0", "-c"],
    "xz": ["xz", "--check=crc32", "--x86", "--lzma2=preset=0", "-c"],
    "zstd": ["zstd", "-1", "-q", "-c"],
    "lz4": ["lz4", "-l", "-1", "-q", "-c"],
    "lzo": ["lzop", "-1", "-c"],
}


@pytest.mark.parametrize("kind", sorted(_CLI))
def test_kbuild_compressor_tools_output_is_read(kind: str, image: bytes, payload: bytes) -> None:
    """What the command-line tools kbuild runs (scripts/Makefile.lib) write is read back."""
    cmd = _CLI[kind]
    require_tool(cmd[0])
    sample = payload[:4 << 20]
    out = subprocess.run(cmd, input=sample, capture_output=True, check=True).stdout
    if kind != "gzip":
        out += size_trailer(sample)
    assert detect_compression(out) == kind
    assert extract_vmlinux(make_bzimage(image, out)) == sample


def lzop_file(data: bytes, *, block: int = 256 << 10) -> bytes:
    """An lzop file (version 0x1040, LZO1X, adler32 of each block) built here."""
    from lzallright import LZOCompressor

    comp = LZOCompressor()
    name = b"vmlinux.bin"
    fields = struct.pack(">HHHBBIIII", 0x1040, 0x2080, 0x0940, 1, 5, 0x1, 0o100644, 0, 0)
    header = fields + bytes([len(name)]) + name
    out = [b"\x89LZO\x00\r\n\x1a\n", header, struct.pack(">I", zlib.adler32(header))]
    for pos in range(0, len(data), block):
        raw = data[pos:pos + block]
        packed = comp.compress(raw)
        if len(packed) >= len(raw):
            packed = raw  # stored block
        out += [struct.pack(">III", len(raw), len(packed), zlib.adler32(raw)), packed]
    out.append(b"\0\0\0\0")
    return b"".join(out)


def test_lzo_payload_round_trips(image: bytes, payload: bytes) -> None:
    sample = payload[:8 << 20] + bytes(range(256)) * 4096  # a stored block too
    body = lzop_file(sample) + size_trailer(sample)
    assert detect_compression(body) == "lzo"
    assert extract_vmlinux(make_bzimage(image, body)) == sample


def test_lzo_block_checksum_mismatch_is_refused(image: bytes, payload: bytes) -> None:
    sample = payload[:1 << 20]
    body = bytearray(lzop_file(sample))
    first_block = body.index(struct.pack(">I", 256 << 10))
    body[first_block + 8] ^= 0xFF  # the adler32 of the decompressed block
    with pytest.raises(KernelImageError, match="checksum"):
        extract_vmlinux(make_bzimage(image, bytes(body) + size_trailer(sample)))


def test_lzo_without_package_says_what_to_do(image: bytes, payload: bytes,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lzallright", None)  # import fails
    body = b"\x89LZO\x00\r\n\x1a\n" + bytes(64)
    with pytest.raises(KernelImageError) as info:
        extract_vmlinux(make_bzimage(image, body + size_trailer(payload)))
    assert "LZO" in str(info.value)
    assert "vmlinux" in info.value.hint


# --------------------------------------------------------------------------- hostile input


def test_truncated_bzimage_names_the_numbers(image: bytes, tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(image[: len(image) // 2])
    with pytest.raises(KernelImageError) as info:
        extract_vmlinux(path)
    msg = str(info.value)
    off, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET)
    assert f"payload_offset {off:#x}" in msg and f"length {length:#x}" in msg
    assert f"past end of file {len(image) // 2:#x}" in msg
    assert info.value.path == str(path)


def test_tiny_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    path.write_bytes(b"MZ" + bytes(0x100))
    with pytest.raises(KernelImageError, match="too short"):
        extract_vmlinux(path)


def test_payload_offset_past_eof(image: bytes) -> None:
    bad = bytearray(image)
    struct.pack_into("<I", bad, PAYLOAD_OFFSET, 0x7FFF_0000)
    with pytest.raises(KernelImageError, match=r"payload_offset 0x7fff0000 .* past end of file"):
        extract_vmlinux(bytes(bad))


def test_missing_file() -> None:
    with pytest.raises(KernelImageError, match="cannot read"):
        extract_vmlinux("/nonexistent/vmlinuz")


def test_random_garbage_is_refused() -> None:
    garbage = random.Random(1234).randbytes(1 << 16)
    with pytest.raises(KernelImageError, match="HdrS"):
        extract_vmlinux(garbage)


def test_unknown_compression_is_refused(image: bytes) -> None:
    with pytest.raises(KernelImageError, match="unknown payload compression, first bytes 0badc0de"):
        extract_vmlinux(make_bzimage(image, bytes.fromhex("0badc0de") + bytes(60)))


def test_old_boot_protocol_is_refused(image: bytes) -> None:
    bad = bytearray(image)
    struct.pack_into("<H", bad, 0x206, 0x0206)
    with pytest.raises(KernelImageError, match=r"boot protocol 2\.06"):
        extract_vmlinux(bytes(bad))


def test_corrupt_real_payload_is_refused(image: bytes) -> None:
    start = pm_start(image) + struct.unpack_from("<I", image, PAYLOAD_OFFSET)[0]
    bad = bytearray(image)
    bad[start + 8:start + 4096] = bytes(4088)  # zero the first lz4 block's start
    with pytest.raises(KernelImageError, match="lz4"):
        extract_vmlinux(bytes(bad))


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_truncated_stream_is_refused(kind: str, image: bytes, payload: bytes) -> None:
    sample = payload[:2 << 20]
    body = COMPRESSORS[kind](sample)
    cut = body[: len(body) * 3 // 4] + body[-4:]  # keep the size trailer
    with pytest.raises(KernelImageError) as info:
        extract_vmlinux(make_bzimage(image, cut))
    assert kind in str(info.value)


@pytest.mark.parametrize("kind", sorted(set(COMPRESSORS) - {"gzip"}))
def test_wrong_size_trailer_is_refused(kind: str, image: bytes, payload: bytes) -> None:
    sample = payload[:1 << 20]
    body = COMPRESSORS[kind](sample)
    body = body[:-4] + struct.pack("<I", len(sample) - 1)
    with pytest.raises(KernelImageError, match=f"size trailer says {len(sample) - 1:#x}"):
        extract_vmlinux(make_bzimage(image, body))


def test_wrong_gzip_isize_is_refused(image: bytes, payload: bytes) -> None:
    """gzip's own ISIZE is the trailer; zlib verifies it (with the CRC) at stream end."""
    sample = payload[:1 << 20]
    body = _gzip(sample)[:-4] + struct.pack("<I", len(sample) - 1)
    with pytest.raises(KernelImageError, match="gzip payload is corrupt"):
        extract_vmlinux(make_bzimage(image, body))


def test_non_elf_output_is_refused(image: bytes) -> None:
    data = b"not an ELF" * 1000
    with pytest.raises(KernelImageError, match="does not start with an ELF header"):
        extract_vmlinux(make_bzimage(image, _zstd(data)))


# Bombs: small to build, huge to inflate. Each must fail fast without allocating it.

def gzip_bomb(gib: int, *, isize: int | None = None) -> bytes:
    """`gib` GiB of zeros as gzip, built without allocating them.

    After Z_FULL_FLUSH the deflate state is reset, so each 1 MiB of zeros compresses to
    the very same bytes: compress once, repeat.
    """
    zeros = bytes(1 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    assert comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH) == piece
    tail = comp.flush(zlib.Z_FINISH)
    count = gib << 10
    crc = 0
    if isize is None:
        for _ in range(count):
            crc = zlib.crc32(zeros, crc)
    size = (count << 20) & 0xFFFFFFFF if isize is None else isize
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
    return header + piece * count + tail + struct.pack("<II", crc, size)


def test_gzip_bomb_sanity() -> None:
    """The bomb builder is right: a 1 GiB one really inflates to zeros (first 64 MiB)."""
    bomb = gzip_bomb(1)
    dec = zlib.decompressobj(31)
    out = dec.decompress(bomb, 64 << 20)
    assert out == bytes(64 << 20)


def _bomb_check(body: bytes, image: bytes, cap: int, match: str) -> None:
    bz = make_bzimage(image, body)
    tracemalloc.start()
    began = time.perf_counter()
    try:
        with pytest.raises(KernelImageError, match=match):
            extract_vmlinux(bz, max_output=cap)
        elapsed = time.perf_counter() - began
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 3.0, f"bomb took {elapsed:.2f} s to refuse"
    assert peak < cap + len(bz) + (16 << 20), f"peak {peak:#x} bytes while refusing a bomb"


def test_gzip_bomb_with_honest_size_is_refused_at_once(image: bytes) -> None:
    _bomb_check(gzip_bomb(2), image, 16 << 20, r"size trailer says 0x80000000")


def test_gzip_bomb_with_lying_size_is_refused_while_streaming(image: bytes) -> None:
    _bomb_check(gzip_bomb(2, isize=0x1000), image, 16 << 20, "more than max_output 0x1000000")


def test_zstd_bomb_is_refused(image: bytes) -> None:
    zeros = bytes(1 << 20)
    comp = zstandard.ZstdCompressor(level=1).compressobj()
    body = b"".join([comp.compress(zeros) for _ in range(2048)] + [comp.flush()])
    _bomb_check(body + struct.pack("<I", 0x1000), image, 16 << 20, "more than max_output")


def test_xz_bomb_is_refused(image: bytes) -> None:
    zeros = bytes(1 << 20)
    comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=0)
    body = b"".join([comp.compress(zeros) for _ in range(64)] + [comp.flush()])
    _bomb_check(body + struct.pack("<I", 0x1000), image, 4 << 20, "more than max_output")


def test_lz4_bomb_is_refused(image: bytes) -> None:
    block = lz4.block.compress(bytes(8 << 20), store_size=False)
    body = LZ4_LEGACY_MAGIC + (struct.pack("<I", len(block)) + block) * 256
    _bomb_check(body + struct.pack("<I", 0x1000), image, 16 << 20, "more than max_output")


def test_real_kernel_over_cap_is_refused(vmlinuz: Path) -> None:
    with pytest.raises(KernelImageError, match="max_output"):
        extract_vmlinux(vmlinuz, max_output=1 << 20)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=4096), kind=st.sampled_from(sorted(COMPRESSORS)))
def test_fuzzed_payloads_fail_cleanly(image: bytes, data: bytes, kind: str) -> None:
    """Any payload bytes behind a known magic: a result or KernelImageError, nothing else."""
    magic = {"gzip": b"\x1f\x8b", "bzip2": b"BZh", "lzma": b"\x5d\x00\x00",
             "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd", "lz4": LZ4_LEGACY_MAGIC}[kind]
    try:
        out = extract_vmlinux(make_bzimage(image, magic + data), max_output=1 << 20)
    except KernelImageError:
        return
    assert out[:4] == b"\x7fELF"

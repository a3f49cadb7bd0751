"""kallsyms recovery: synthetic tables written like scripts/kallsyms.c, the real Debian 6.1
and 6.12 images, and (guest test) a booted 6.1 guest's own /proc/kallsyms as oracle."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from scanner.errors import KernelImageError
from scanner.image.kallsyms import Kallsyms, find_kallsyms, recover_kallsyms
from scanner.image.serialize import kallsyms_from_bytes, kallsyms_to_bytes
from tests.realkernels import real_image
from tools.guests import GuestSpec

RODATA = 0xFFFFFFFF82000000
TEXT = 0xFFFFFFFF81000000
TEXT_END = TEXT + 0x100000


# --------------------------------------------------------------------------- builder


def _align(buf: bytearray) -> None:
    buf.extend(b"\0" * (-len(buf) % 8))


def build_kallsyms(symbols: list[tuple[int, str, str]], *, layout: str = "offsets-last",
                   seqs: bool = True, absolute_percpu: bool = True,
                   filler: int = 5000) -> tuple[bytes, dict[str, int]]:
    """A .rodata blob with kallsyms tables as scripts/kallsyms.c lays them out.

    `layout`: "offsets-last" (6.4+: num_syms, names, markers, token_table, token_index,
    offsets, relative_base, seqs_of_names) or "offsets-first" (6.1: offsets,
    relative_base, num_syms, names, markers, [seqs_of_names as backported to 6.1
    stable], token_table, token_index). Returns the blob and each table's offset."""
    symbols = sorted(symbols, key=lambda s: s[0])
    n = len(symbols)
    used = sorted({ord(c) for _, t, name in symbols for c in t + name})
    slots: list[str] = [""] * 256
    for c in used:
        slots[c] = chr(c)
    free = [i for i in range(256) if not slots[i]]
    pairs = ["__", "_t", "s_", "re", "in", "er", "Tv", "tf"]
    pair_slot: dict[str, int] = {}
    for p, i in zip(pairs, free, strict=False):
        slots[i] = p
        pair_slot[p] = i

    def compress(s: str) -> bytes:
        out, i = [], 0
        while i < len(s):
            if s[i:i + 2] in pair_slot:
                out.append(pair_slot[s[i:i + 2]])
                i += 2
            else:
                out.append(ord(s[i]))
                i += 1
        return bytes(out)

    percpu = [t == "A" and a < 0x100000 for a, t, _ in symbols]
    rel_addrs = [a for (a, _, _), p in zip(symbols, percpu, strict=True) if not p]
    rb = min(rel_addrs)
    offsets = []
    for (a, _, _), p in zip(symbols, percpu, strict=True):
        if absolute_percpu:
            offsets.append(a if p else rb - a - 1)
        else:
            offsets.append((a - rb) & 0xFFFFFFFF)
    names = bytearray()
    markers = []
    for i, (_, t, name) in enumerate(symbols):
        if i % 256 == 0:
            markers.append(len(names))
        comp = compress(t + name)
        ln = len(comp)
        names += bytes([ln]) if ln <= 0x7F else bytes([(ln & 0x7F) | 0x80, ln >> 7])
        names += comp
    order = sorted(range(n), key=lambda i: (symbols[i][2], symbols[i][0]))
    seqs_blob = b"".join(i.to_bytes(3, "big") for i in order)
    token_table = bytearray()
    token_index = []
    for s in slots:
        token_index.append(len(token_table))
        token_table += s.encode() + b"\0"

    rng = random.Random(n)
    buf = bytearray(rng.randbytes(filler))
    _align(buf)
    at: dict[str, int] = {}

    def put(name: str, data: bytes) -> None:
        _align(buf)
        at[name] = len(buf)
        buf.extend(data)

    offs_blob = np.array(offsets, dtype="<i8").astype("<i4").tobytes() if absolute_percpu \
        else np.array(offsets, dtype="<u4").tobytes()
    if layout == "offsets-first":
        put("offsets", offs_blob)
        put("relative_base", rb.to_bytes(8, "little"))
    put("num_syms", n.to_bytes(4, "little"))
    put("names", bytes(names))
    put("markers", np.array(markers, dtype="<u4").tobytes())
    if layout == "offsets-first" and seqs:
        put("seqs", seqs_blob)
    put("token_table", bytes(token_table))
    put("token_index", np.array(token_index, dtype="<u2").tobytes())
    if layout == "offsets-last":
        put("offsets", offs_blob)
        put("relative_base", rb.to_bytes(8, "little"))
        if seqs:
            put("seqs", seqs_blob)
    _align(buf)
    buf += rng.randbytes(filler)
    return bytes(buf), at


def make_symbols(count: int, *, long_name: bool = True) -> list[tuple[int, str, str]]:
    rng = random.Random(count)
    syms = [(0, "A", "fixed_percpu_data"), (0x1000, "A", "cpu_debug_store"),
            (TEXT, "T", "_text"), (TEXT, "T", "_stext"), (TEXT_END, "T", "_etext")]
    addr = TEXT + 0x40
    for i in range(count):
        name = f"func_{i}_" + rng.choice(["read", "write", "init", "tree", "__s_t"])
        syms.append((addr, rng.choice("tT"), name))
        addr += rng.choice([16, 32, 48, 0x90])
    if long_name:
        syms.append((TEXT + 0x20, "t", "x" * 200))
    syms.append((RODATA + 0x10, "r", "some_table"))
    syms.append((RODATA + 0x10, "D", "alias_table"))
    return syms


def _check_equal(ks: Kallsyms, syms: list[tuple[int, str, str]]) -> None:
    want = sorted(syms, key=lambda s: s[0])
    assert len(ks) == len(want)
    assert ks.addresses.tolist() == [a for a, _, _ in want]
    assert sorted(zip(ks.addresses.tolist(), ks.types, ks.names, strict=True)) == sorted(want)


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("layout,seqs", [("offsets-last", True), ("offsets-first", True),
                                         ("offsets-first", False)])
@pytest.mark.parametrize("count", [3, 300, 1000])
def test_synthetic_roundtrip(layout: str, seqs: bool, count: int) -> None:
    syms = make_symbols(count)
    blob, at = build_kallsyms(syms, layout=layout, seqs=seqs)
    ks = find_kallsyms(blob, RODATA, text=(TEXT, TEXT_END))
    _check_equal(ks, syms)
    assert ks.tables is not None
    assert ks.tables.layout == layout
    assert ks.tables.mode == "absolute-percpu"
    assert ks.tables.token_index == RODATA + at["token_index"]
    assert ks.tables.names == RODATA + at["names"]


def test_synthetic_relative_mode_without_text_hint() -> None:
    syms = [s for s in make_symbols(400) if s[1] != "A"]
    blob, _ = build_kallsyms(syms, absolute_percpu=False)
    ks = find_kallsyms(blob, RODATA)
    _check_equal(ks, syms)
    assert ks.tables is not None and ks.tables.mode == "relative"
    assert ks.text == (TEXT, TEXT_END)


def test_api() -> None:
    syms = make_symbols(50, long_name=False)
    blob, _ = build_kallsyms(syms)
    ks = find_kallsyms(blob, RODATA, text=(TEXT, TEXT_END))
    first = next(s for s in syms if s[2] == "func_0_" + s[2].split("_")[-1])
    assert ks.lookup(first[2]) == first[0]
    assert ks.lookup("no_such_symbol") is None
    assert ks.symbolize(first[0]) == first[2]
    assert ks.symbolize(first[0] + 3) == f"{first[2]}+0x3"
    assert ks.symbolize(5) == "fixed_percpu_data+0x5"
    fs = ks.function_starts()
    assert fs.dtype == np.uint64 and np.all(np.diff(fs.astype(np.int64)) > 0)
    assert all(TEXT <= a < TEXT_END for a in fs.tolist())
    assert first[0] in fs.tolist()
    assert RODATA + 0x10 not in fs.tolist()
    lo, hi = ks.size_of(first[0] + 1) or (0, 0)
    assert lo == first[0] and hi > lo
    # Aliases at one address both resolve.
    assert ks.lookup("some_table") == ks.lookup("alias_table") == RODATA + 0x10


def test_serialization_roundtrip() -> None:
    syms = make_symbols(600)
    blob, _ = build_kallsyms(syms)
    ks = find_kallsyms(blob, RODATA, text=(TEXT, TEXT_END))
    back = kallsyms_from_bytes(kallsyms_to_bytes(ks, full=True))
    assert back.addresses.tolist() == ks.addresses.tolist()
    assert back.names == ks.names and back.types == ks.types and back.text == ks.text
    text_only = kallsyms_from_bytes(kallsyms_to_bytes(ks))
    assert all(TEXT <= a <= TEXT_END for a in text_only.addresses.tolist())
    assert text_only.function_starts().tolist() == ks.function_starts().tolist()
    with pytest.raises(KernelImageError):
        kallsyms_from_bytes(b"garbage")
    raw = bytearray(kallsyms_to_bytes(ks))
    raw[20] ^= 0xFF
    with pytest.raises(KernelImageError):
        kallsyms_from_bytes(bytes(raw))


def test_no_tables_is_kernel_image_error() -> None:
    rng = random.Random(1)
    for blob in (b"", bytes(8192), rng.randbytes(1 << 16)):
        with pytest.raises(KernelImageError):
            find_kallsyms(blob, RODATA, text=(TEXT, TEXT_END))


def test_truncated_and_corrupt_tables() -> None:
    syms = make_symbols(700)
    blob, at = build_kallsyms(syms, filler=64)
    # Cut inside the names, the markers, the token table.
    for cut in (at["names"] + 100, at["markers"] + 4, at["token_table"] + 50):
        with pytest.raises(KernelImageError):
            find_kallsyms(blob[:cut] + bytes(2048), RODATA, text=(TEXT, TEXT_END))
    # A wrong marker or num_syms is refused, not decoded into garbage.
    bad = bytearray(blob)
    bad[at["markers"] + 4] ^= 0x10
    with pytest.raises(KernelImageError):
        find_kallsyms(bytes(bad), RODATA, text=(TEXT, TEXT_END))
    bad = bytearray(blob)
    bad[at["num_syms"]] ^= 0x01
    with pytest.raises(KernelImageError):
        find_kallsyms(bytes(bad), RODATA, text=(TEXT, TEXT_END))


def test_mutations_never_crash() -> None:
    """Random byte flips in the tables: a result or a KernelImageError, nothing else."""
    syms = make_symbols(300)
    blob, at = build_kallsyms(syms, filler=64)
    lo, hi = at["names"] - 8, at["relative_base"] + 8
    rng = random.Random(7)
    for _ in range(60):
        bad = bytearray(blob)
        for _ in range(rng.choice([1, 4, 32])):
            bad[rng.randrange(lo, hi)] = rng.randrange(256)
        try:
            ks = find_kallsyms(bytes(bad), RODATA, text=(TEXT, TEXT_END))
        except KernelImageError:
            continue
        assert len(ks) <= len(syms)


# --------------------------------------------------------------------------- real images


EXPECT = {"6.1": (80_000, 100_000), "6.12": (140_000, 170_000)}


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_real_image(which: str) -> None:
    img = real_image(which)
    ks = recover_kallsyms(img)   # its speed is perf's to measure, not a test's
    lo, hi = EXPECT[which]
    assert lo <= len(ks) <= hi, len(ks)
    text = img.sections[".text"]
    assert ks.lookup("_stext") == text.addr == ks.lookup("_text")
    assert ks.lookup("_etext") == text.end
    for name in ("start_kernel", "vfs_read", "ftrace_caller", "__start_mcount_loc",
                 "__stop_mcount_loc", "__start___jump_table", "__smp_locks"):
        assert ks.lookup(name) is not None, name
    assert text.addr <= (ks.lookup("vfs_read") or 0) < text.end
    init = img.sections[".init.text"]
    assert init.addr <= (ks.lookup("start_kernel") or 0) < init.end
    assert ks.symbolize((ks.lookup("vfs_read") or 0) + 0x10) == "vfs_read+0x10"
    # Kernel invariants: sorted, every text symbol in a section, per-cpu symbols small.
    a = ks.addresses
    assert bool(np.all(a[1:] >= a[:-1]))
    types = np.frombuffer(ks.types.encode(), dtype=np.uint8)
    percpu = types == ord("A")
    assert int(a[percpu].max()) < img.sections[".data..percpu"].size + 0x1000
    secs = [(s.addr, s.end) for s in img.sections.values() if s.addr]
    texty = np.isin(types, np.frombuffer(b"tT", dtype=np.uint8))
    for addr in a[texty][:: max(1, int(texty.sum()) // 2000)].tolist():
        assert any(lo <= addr <= hi for lo, hi in secs), hex(addr)
    fs = ks.function_starts()
    assert fs.size > 40_000
    print(f"\n{which}: {len(ks)} symbols, {fs.size} function starts, tables {ks.tables}")


@pytest.mark.guest
def test_matches_guest_proc_kallsyms(guests) -> None:  # type: ignore[no-untyped-def]
    """Oracle: the booted 6.1 guest's /proc/kallsyms (every 7th line, printed by the
    test initramfs when the kernel command line has kscan.kallsyms=7)."""
    img = real_image("6.1")
    ks = recover_kallsyms(img)
    (g,) = guests.boot(GuestSpec("ksyms", append="kscan.kallsyms=7"))
    log = g.serial.read_text(errors="replace")
    body = log.split("KALLSYMS_BEGIN\n", 1)[1].split("KALLSYMS_END", 1)[0]
    rows = []
    for line in body.splitlines():
        parts = line.split()
        if len(parts) == 3 and len(parts[0]) == 16:          # core kernel (no [module])
            rows.append((int(parts[0], 16), parts[1], parts[2]))
    assert len(rows) > 5000
    by_name: dict[str, set[tuple[int, str]]] = collections.defaultdict(set)
    for addr, t, name in zip(ks.addresses.tolist(), ks.types, ks.names, strict=True):
        by_name[name].add((addr, t))
    slide = ks.lookup("_text")
    votes = collections.Counter(a - min(x for x, _ in by_name[n])
                                for a, t, n in rows if t != "A" and n in by_name)
    slide = votes.most_common(1)[0][0]
    assert slide % (2 << 20) == 0
    wrong = [(n, t, hex(a)) for a, t, n in rows
             if ((a if t == "A" else a - slide), t) not in by_name.get(n, set())]
    assert not wrong, wrong[:10]
    g.stop()

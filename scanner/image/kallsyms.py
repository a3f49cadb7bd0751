"""The kernel's own symbol table (kallsyms), recovered from a vmlinux without `.symtab`.

Debian's kernels ship no symbols (no `.symtab`, a stub System.map), but every kernel built
with CONFIG_KALLSYMS carries its symbol table in `.rodata`, written by
scripts/kallsyms.c and read by kernel/kallsyms.c. This module finds those tables by their
structure, not by symbol names (there are none to look up), and decodes them.

The tables (all in `.rodata`; every label is `.balign 8`):

* ``kallsyms_num_syms``: u32 N.
* ``kallsyms_names``: N entries, each a length (ULEB128, 1 or 2 bytes, since 6.1) and that
  many token bytes. Expanded through the token table the first character is the kallsyms
  type (``t``, ``T``, ``d``, ``A``, ...), the rest the name.
* ``kallsyms_markers``: u32 per 256 symbols: offset of symbol 256*k in ``kallsyms_names``.
* ``kallsyms_token_table``: 256 NUL-terminated strings (fully expanded tokens).
* ``kallsyms_token_index``: 256 u16 offsets of each token in the token table.
* ``kallsyms_offsets`` (CONFIG_KALLSYMS_BASE_RELATIVE, always on x86-64 since it exists):
  N s32 + ``kallsyms_relative_base`` (u64, the lowest relative address). With
  CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 until 6.14) an offset >= 0 is an absolute value
  (per-cpu symbols, type ``A``) and a negative offset means ``relative_base - 1 - offset``;
  without it every address is ``relative_base + (u32)offset``. Without base-relative
  addressing (``kallsyms_addresses``) N u64 absolute addresses.
* ``kallsyms_seqs_of_names`` (6.2+): N 3-byte big-endian symbol indices sorted by name.
  Not needed here (we build our own name index) and not read.

Order in `.rodata`:

* up to 6.1: offsets, relative_base, num_syms, names, markers, token_table, token_index;
* 6.4 and later (commit "kallsyms: change the output order to fill the padding between
  sections"): num_syms, names, markers, token_table, token_index, offsets,
  relative_base, seqs_of_names.

Both keep ``num_syms, names, markers, token_table, token_index`` together, so the search
anchors on the token index (256 increasing u16 starting at 0 whose entries point right
after the NULs of 256 strings just before it), walks back over the markers, then finds
``num_syms``/``names`` (which must decode to exactly the marker offsets), then tries
both positions of the offsets. (6.2/6.3 put ``kallsyms_seqs_of_names`` between markers
and token table; those short-lived kernels are not supported.)

Addresses are link-time virtual addresses (as in the ELF), i.e. KASLR undone. The image
is untrusted input: every read is bounds-checked, every loop bounded, and any failure
is a `scanner.errors.KernelImageError`.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
from dataclasses import dataclass
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from scanner.errors import KernelImageError

__all__ = ["Kallsyms", "KallsymsTables", "find_kallsyms", "recover_kallsyms"]

U64 = npt.NDArray[np.uint64]

#: Bounds (far above any real kernel: Debian 6.12 has ~200k symbols, 6 MB of .rodata).
MAX_SYMS = 1 << 22
MAX_NAME_LEN = 0x3FFF          # two-byte ULEB128, as scripts/kallsyms.c refuses more
MAX_TOKEN_LEN = 255
MAX_MARKERS = (MAX_SYMS + 255) // 256
MAX_TOKEN_CANDIDATES = 64      # token-index look-alikes tried before giving up
_TEXT_TYPES = frozenset("tTwW")


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class KallsymsTables:
    """Where the tables were found (link-time addresses), for reports and tests."""

    num_syms: int
    names: int
    markers: int
    token_table: int
    token_index: int
    offsets: int
    relative_base: int | None
    #: "offsets-first" (<= 6.3: offsets, relative_base, num_syms, names, ...) or
    #: "offsets-last" (6.4+: ..., token_index, offsets, relative_base, seqs_of_names)
    layout: str
    mode: str            # "absolute-percpu", "relative" or "absolute"


@dataclass(frozen=True, eq=False)
class Kallsyms:
    """Symbols sorted by address (ties in the kernel's own order).

    `addresses` are link-time addresses (uint64), `names` the names, `types` one kallsyms
    type character per symbol (``t``/``T`` text, ``d``/``D`` data, ``A`` absolute/per-cpu,
    ...). `text` is the [start, end) of `.text` used by `function_starts`.
    """

    addresses: U64
    names: tuple[str, ...]
    types: str
    text: tuple[int, int] = (0, 0)
    tables: KallsymsTables | None = None

    def __post_init__(self) -> None:
        if not (len(self.addresses) == len(self.names) == len(self.types)):
            raise ValueError("addresses, names and types differ in length")

    @cached_property
    def _addr_list(self) -> list[int]:
        """The addresses as Python ints, for bisect: built on first use (a profile kept by
        `kscan run` symbolizes only when something changed; ~2 MB for 44,000 symbols)."""
        return [int(a) for a in self.addresses.tolist()]

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Kallsyms({len(self)} symbols, text={self.text[0]:#x}..{self.text[1]:#x})"

    @cached_property
    def _by_name(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, name in enumerate(self.names):
            index.setdefault(name, i)      # first (lowest address) of duplicates
        return index

    def lookup(self, name: str) -> int | None:
        """Address of the symbol `name` (the lowest one if several share the name)."""
        i = self._by_name.get(name)
        return None if i is None else self._addr_list[i]

    def find(self, name: str) -> tuple[int, str] | None:
        """(address, kallsyms type) of the symbol `name` — data symbols too (``D``, ``d``,
        ``B``, ``b``, ``R``...) when the kernel has CONFIG_KALLSYMS_ALL."""
        i = self._by_name.get(name)
        return None if i is None else (self._addr_list[i], self.types[i])

    def index_at_or_below(self, addr: int) -> int:
        """Index of the last symbol at or below `addr` (-1 if none)."""
        return bisect.bisect_right(self._addr_list, addr) - 1

    def symbolize(self, addr: int) -> str:
        """``name+0xoff`` of the symbol at or below `addr` (``name`` when exact);
        the bare hex address when no symbol is below it."""
        i = self.index_at_or_below(addr)
        if i < 0:
            return f"{addr:#x}"
        base = self._addr_list[i]
        # Of aliases, the first in kallsyms order, as the kernel's get_symbol_pos() picks
        # (scripts/kallsyms.c sorts linker-provided and weak names after the others).
        name = self.names[bisect.bisect_left(self._addr_list, base)]
        return name if addr == base else f"{name}+{addr - base:#x}"

    def symbol_end(self, i: int) -> int:
        """First address past symbol `i`: the next higher symbol address, as the kernel's
        kallsyms_lookup_size_offset() sizes symbols (the last one: end of its text)."""
        a = self._addr_list[i]
        j = bisect.bisect_right(self._addr_list, a)
        if j < len(self._addr_list):
            return self._addr_list[j]
        return max(self.text[1], a)

    def size_of(self, addr: int) -> tuple[int, int] | None:
        """[start, end) of the symbol containing `addr`, or None below the first."""
        i = self.index_at_or_below(addr)
        if i < 0:
            return None
        return self._addr_list[i], self.symbol_end(i)

    def function_starts(self) -> U64:
        """Sorted, unique addresses of text symbols (t, T and weak w/W) inside `.text`.

        Includes the ``__pfx_*`` padding symbols of CALL_PADDING kernels (6.2+): the
        padding is NOPs, so decoding instructions from it is as valid as from the
        function; a function start is also never hidden by its padding symbol."""
        lo, hi = self.text
        types = np.frombuffer(self.types.encode("latin-1"), dtype=np.uint8)
        is_text = np.isin(types, np.frombuffer(b"tTwW", dtype=np.uint8))
        a = self.addresses
        keep = is_text & (a >= np.uint64(lo)) & (a < np.uint64(hi))
        return np.unique(a[keep])

    def in_range(self, lo: int, hi: int) -> list[tuple[int, str, str]]:
        """(address, type, name) of every symbol in [lo, hi)."""
        i = bisect.bisect_left(self._addr_list, lo)
        j = bisect.bisect_left(self._addr_list, hi)
        return [(self._addr_list[k], self.types[k], self.names[k]) for k in range(i, j)]


# --------------------------------------------------------------------------- entry point


def recover_kallsyms(image: Any) -> Kallsyms:
    """Recover kallsyms from a `scanner.image.vmlinux.KernelImage`, a path to a bzImage/vmlinuz/
    vmlinux, or the bytes of one. Raises `KernelImageError` if there is no usable table."""
    where, rodata, rodata_addr, text = _rodata_of(image)
    return find_kallsyms(rodata, rodata_addr, text=text, where=where)


def _rodata_of(image: Any) -> tuple[str, bytes, int, tuple[int, int]]:
    from scanner.image.vmlinux import KernelImage

    if isinstance(image, KernelImage):
        ro = image.sections.get(".rodata")
        tx = image.sections.get(".text")
        if ro is None or tx is None:
            raise KernelImageError("no .rodata/.text section", path=str(image.path))
        return str(image.path), image.section_bytes(".rodata"), ro.addr, (tx.addr, tx.end)
    if isinstance(image, (str, PathLike, bytes, bytearray, memoryview)):
        from scanner.image.kimage import extract_vmlinux

        where = "<bytes>" if isinstance(image, (bytes, bytearray, memoryview)) else str(image)
        data = extract_vmlinux(image if not isinstance(image, str) else Path(image))
        return (where, *_elf_rodata(data, where))
    raise TypeError(f"recover_kallsyms needs a KernelImage, path or bytes, not {type(image)}")


def _elf_rodata(data: bytes, where: str) -> tuple[bytes, int, tuple[int, int]]:
    import io

    from elftools.common.exceptions import ELFError
    from elftools.construct.core import ConstructError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        ro = elf.get_section_by_name(".rodata")
        tx = elf.get_section_by_name(".text")
        if ro is None or tx is None or ro["sh_type"] == "SHT_NOBITS":
            raise KernelImageError("no .rodata/.text section: not a kernel", path=where)
        off, size = ro["sh_offset"], ro["sh_size"]
        if off + size > len(data):
            raise KernelImageError(".rodata extends past the file", path=where, offset=off)
        return (data[off:off + size], ro["sh_addr"],
                (tx["sh_addr"], tx["sh_addr"] + tx["sh_size"]))
    except (ELFError, ConstructError, ValueError, KeyError, IndexError, OverflowError) as err:
        raise KernelImageError(f"malformed ELF: {err}", path=where) from err


# --------------------------------------------------------------------------- the search


class _Fail(Exception):
    """One candidate did not fit (internal; the search goes on)."""


def find_kallsyms(rodata: bytes | bytearray | memoryview, rodata_addr: int, *,
                  text: tuple[int, int] | None = None, where: str = "<rodata>") -> Kallsyms:
    """Find and decode the kallsyms tables in a `.rodata` image linked at `rodata_addr`.

    `text` is `.text`'s [start, end): it confirms the decoded addresses (``_stext`` or
    ``_text`` must be its start) and bounds `function_starts`."""
    buf = bytes(rodata)
    if len(buf) < 1024 or rodata_addr % 8:
        raise KernelImageError("no kallsyms: .rodata too small or misaligned", path=where)
    errors: list[str] = []
    try:
        for ti in _token_index_candidates(buf):
            try:
                return _decode_at(buf, rodata_addr, ti, text, where)
            except _Fail as err:
                errors.append(f"token index at {rodata_addr + ti:#x}: {err}")
    except (ValueError, IndexError, OverflowError, MemoryError, UnicodeDecodeError) as err:
        raise KernelImageError(f"kallsyms tables malformed: {err}", path=where) from err
    detail = "; ".join(errors[:4]) or "no kallsyms_token_index found"
    raise KernelImageError(f"cannot recover kallsyms ({detail})", path=where,
                           hint="the kernel may be built without CONFIG_KALLSYMS; "
                                "pass a System.map or a vmlinux with symbols")


def _token_index_candidates(buf: bytes) -> list[int]:
    """8-aligned offsets of 256 u16 starting at 0 and increasing by 1..256 each."""
    n = len(buf) // 2
    a = np.frombuffer(buf, dtype="<u2", count=n).astype(np.int32)
    d = np.diff(a)
    good = (d >= 1) & (d <= MAX_TOKEN_LEN + 1)
    bad = np.concatenate(([0], np.cumsum(~good, dtype=np.int64)))
    starts = np.arange(0, n - 256, 4)          # u16 index of 8-aligned byte offsets
    if starts.size == 0:
        return []
    ok = (a[starts] == 0) & (bad[starts + 255] - bad[starts] == 0)
    found: list[int] = (starts[ok] * 2).tolist()
    # The real one is last among look-alikes in practice; try all, bounded.
    return found[::-1][:MAX_TOKEN_CANDIDATES]


def _u32(buf: bytes, off: int) -> int:
    if off < 0 or off + 4 > len(buf):
        raise _Fail(f"read past .rodata at {off:#x}")
    return int.from_bytes(buf[off:off + 4], "little")


def _tokens(buf: bytes, ti: int) -> tuple[int, list[bytes]]:
    """Token table start and the 256 tokens, for a token index at offset `ti`."""
    idx = np.frombuffer(buf, dtype="<u2", count=256, offset=ti).astype(np.int64)
    span = int(idx[255])
    # The table is 8-aligned, ends with the last token's NUL, then zeros up to `ti`.
    lo = max(0, ti - span - 1 - MAX_TOKEN_LEN - 8)
    hi = ti - span - 1
    for t in range(hi - hi % 8, lo - 1, -8):
        if t < 0:
            break
        last = buf.find(b"\0", t + span, ti)
        if last < 0 or any(buf[last:ti]):
            continue
        if ti - (last + 1) >= 8:
            continue
        ends = t + idx[1:] - 1
        if any(buf[int(e)] != 0 for e in ends):
            continue
        toks = [buf[t + int(idx[k]):(t + int(idx[k + 1]) - 1) if k < 255 else last]
                for k in range(256)]
        if any(b"\0" in tok or not _printable(tok) for tok in toks):
            continue
        return t, toks
    raise _Fail("no token table before it")


def _printable(tok: bytes) -> bool:
    return all(0x20 < c < 0x7F for c in tok)


def _markers(buf: bytes, t: int) -> tuple[int, list[int]]:
    """Markers array ending just before the token table at `t` (start offset, values)."""
    for pad in (0, 4):
        end = t - pad
        if pad and _u32(buf, end) != 0:
            continue
        vals: list[int] = []
        pos = end - 4
        prev = None
        while pos >= 0 and len(vals) <= MAX_MARKERS:
            v = _u32(buf, pos)
            if prev is not None and not v < prev:
                break
            vals.append(v)
            prev = v
            if v == 0:
                break
            pos -= 4
        if not vals or vals[-1] != 0:
            continue
        m = len(vals)
        start = end - 4 * m
        if start % 8:
            continue
        vals.reverse()
        if any(b - a < 2 * 256 for a, b in itertools.pairwise(vals)):
            continue
        return start, vals
    raise _Fail("no kallsyms_markers before the token table")


def _markers_before_seqs(buf: bytes, t: int) -> list[tuple[int, list[int], int]]:
    """Markers when ``kallsyms_seqs_of_names`` (N 3-byte big-endian indices) sits between
    them and the token table (6.2/6.3, and 6.1 stable kernels that got the backport:
    Debian's 6.1.x). Every N is tried at once: N fixes where the seqs and the markers
    start; cheap necessary conditions filter, the markers and seqs confirm.
    Returns candidates (markers start, markers, N)."""
    n = np.arange(1, min(MAX_SYMS, t // 3) + 1, dtype=np.int64)
    m = (n + 255) // 256
    seqs_at = t - ((3 * n + 7) & ~7)
    s_at = seqs_at - ((4 * m + 7) & ~7)
    ok = s_at >= 0
    n, m, seqs_at, s_at = n[ok], m[ok], seqs_at[ok], s_at[ok]
    u8 = np.frombuffer(buf, dtype=np.uint8)

    def u32_at(pos: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        p = np.clip(pos, 0, len(buf) - 4)
        return (u8[p].astype(np.int64) | (u8[p + 1].astype(np.int64) << 8)
                | (u8[p + 2].astype(np.int64) << 16) | (u8[p + 3].astype(np.int64) << 24))

    def seq_at(pos: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        p = np.clip(pos, 0, len(buf) - 3)
        return ((u8[p].astype(np.int64) << 16) | (u8[p + 1].astype(np.int64) << 8)
                | u8[p + 2].astype(np.int64))

    keep = (u32_at(s_at) == 0)
    keep &= (m == 1) | ((u32_at(s_at + 4) >= 512) & (u32_at(s_at + 4) <= 256 * 1026))
    keep &= (seq_at(seqs_at) < n) & (seq_at(seqs_at + 3 * n - 3) < n)
    out = []
    for i in np.flatnonzero(keep)[:MAX_TOKEN_CANDIDATES * 16].tolist():
        nn, mm, sa, qa = int(n[i]), int(m[i]), int(s_at[i]), int(seqs_at[i])
        vals = np.frombuffer(buf, dtype="<u4", count=mm, offset=sa).astype(np.int64)
        if vals[0] != 0 or (mm > 1 and bool((np.diff(vals) < 512).any())):
            continue
        if any(buf[sa + 4 * mm:qa]) or any(buf[qa + 3 * nn:t]):
            continue
        seqs = np.frombuffer(buf, dtype=np.uint8, count=3 * nn, offset=qa).reshape(nn, 3)
        seqv = (seqs[:, 0].astype(np.int64) << 16) | (seqs[:, 1].astype(np.int64) << 8) | seqs[:, 2]
        if not np.array_equal(np.sort(seqv), np.arange(nn)):
            continue
        out.append((sa, vals.tolist(), nn))
    return out


def _names_start(buf: bytes, markers_at: int, markers: list[int]) -> tuple[int, int]:
    """(offset of kallsyms_names, N): num_syms sits 8 bytes before the names."""
    m = len(markers)
    last = markers[-1]
    # The last <=256 names take at most 256 * (2 + MAX_NAME_LEN) bytes; look at every
    # 8-aligned place where num_syms could be, cheaply filtered first.
    hi = markers_at - last
    lo = max(8, hi - 256 * (2 + 1024) - 8)
    lo += (-lo) % 8
    cands = []
    for c in range(hi - hi % 8, lo - 1, -8):
        n = _u32(buf, c - 8)
        if (n + 255) // 256 == m and n > 0 and _u32(buf, c - 4) == 0:
            cands.append((c, n))
    for c, n in cands:
        # The last names block must end right before the markers (zero padding).
        pos = c + last
        try:
            for _ in range(n - 256 * (m - 1)):
                pos = _skip_name(buf, pos, markers_at)
        except _Fail:
            continue
        if 0 <= markers_at - pos < 8 and not any(buf[pos:markers_at]):
            return c, n
    raise _Fail("no kallsyms_num_syms/kallsyms_names before the markers")


def _skip_name(buf: bytes, pos: int, end: int) -> int:
    if pos >= end:
        raise _Fail("names run into the markers")
    ln = buf[pos]
    if ln & 0x80:
        if pos + 1 >= end:
            raise _Fail("truncated name length")
        ln = (ln & 0x7F) | (buf[pos + 1] << 7)
        pos += 2
    else:
        pos += 1
    if ln == 0 or pos + ln > end:
        raise _Fail("bad name length")
    return pos + ln


def _decode_names(buf: bytes, names_at: int, n: int, end: int, markers: list[int],
                  tokens: list[bytes]) -> tuple[list[str], str]:
    """Expand all N names; checks every marker."""
    starts = np.empty(n, dtype=np.int64)
    lens = np.empty(n, dtype=np.int64)
    pos = names_at
    mv = buf
    for i in range(n):
        if (i & 0xFF) == 0 and pos - names_at != markers[i >> 8]:
            raise _Fail(f"name {i} at {pos - names_at:#x}, marker says {markers[i >> 8]:#x}")
        if pos >= end:
            raise _Fail("names run into the markers")
        ln = mv[pos]
        if ln & 0x80:
            ln = (ln & 0x7F) | (mv[pos + 1] << 7)
            pos += 2
        else:
            pos += 1
        if ln == 0 or pos + ln > end:
            raise _Fail(f"bad length of name {i}")
        starts[i] = pos
        lens[i] = ln
        pos += ln
    # Vectorized expansion: every compressed byte becomes its token.
    tok_len = np.array([len(t) for t in tokens], dtype=np.int64)
    tok_off = np.concatenate(([0], np.cumsum(tok_len)[:-1]))
    blob = np.frombuffer(b"".join(tokens), dtype=np.uint8)
    comp_idx = np.repeat(starts, lens) + (np.arange(int(lens.sum()))
                                          - np.repeat(np.cumsum(lens) - lens, lens))
    comp = np.frombuffer(mv, dtype=np.uint8)[comp_idx]
    out_len = tok_len[comp]
    total = int(out_len.sum())
    if total > 64 * n + (1 << 20):
        raise _Fail("names expand to an implausible size")
    out_start = np.cumsum(out_len) - out_len
    src = np.repeat(tok_off[comp], out_len) + (np.arange(total) - np.repeat(out_start, out_len))
    text = blob[src].tobytes().decode("latin-1")
    # Per-symbol boundaries in the expanded text.
    sym_out = np.add.reduceat(out_len, np.cumsum(lens) - lens) if n else np.zeros(0, np.int64)
    bounds = np.concatenate(([0], np.cumsum(sym_out))).tolist()
    names = []
    types = []
    for i in range(n):
        s = text[bounds[i]:bounds[i + 1]]
        if len(s) < 2:
            raise _Fail(f"name {i} is empty")
        types.append(s[0])
        names.append(s[1:])
    return names, "".join(types)


def _decode_at(buf: bytes, base: int, ti: int, text: tuple[int, int] | None,
               where: str) -> Kallsyms:
    t, tokens = _tokens(buf, ti)
    found: list[tuple[int, list[int], int | None]] = []
    with contextlib.suppress(_Fail):
        found.append((*_markers(buf, t), None))
    if not found:
        found.extend(_markers_before_seqs(buf, t))
    if not found:
        raise _Fail("no kallsyms_markers before the token table")
    for markers_at, markers, want_n in found:
        try:
            names_at, n = _names_start(buf, markers_at, markers)
        except _Fail:
            continue
        if want_n is None or n == want_n:
            break
    else:
        raise _Fail("no kallsyms_num_syms/kallsyms_names before the markers")
    if n > MAX_SYMS:
        raise _Fail(f"{n} symbols")
    num_syms_at = names_at - 8
    names, types = _decode_names(buf, names_at, n, markers_at, markers, tokens)

    # Offsets: before num_syms (<= 6.1) or after the token index (6.4+).
    after_ti = ti + 512
    layouts = [
        ("offsets-first", num_syms_at - 8 - _align8(4 * n), num_syms_at - 8),
        ("offsets-last", after_ti, after_ti + _align8(4 * n)),
    ]
    problems = []
    for layout, off_at, rb_at in layouts:
        for mode in ("absolute-percpu", "relative"):
            try:
                addrs, _rbase = _addresses(buf, off_at, rb_at, n, mode)
                _check(addrs, names, types, text)
            except _Fail as err:
                problems.append(f"{layout}/{mode}: {err}")
                continue
            tables = KallsymsTables(
                num_syms=base + num_syms_at, names=base + names_at, markers=base + markers_at,
                token_table=base + t, token_index=base + ti, offsets=base + off_at,
                relative_base=base + rb_at, layout=layout, mode=mode)
            return _make(addrs, names, types, text, tables)
        # Absolute addresses (no CONFIG_KALLSYMS_BASE_RELATIVE).
        abs_at = (num_syms_at - _align8(8 * n)) if layout == "offsets-first" else after_ti
        try:
            if abs_at < 0 or abs_at + 8 * n > len(buf):
                raise _Fail("out of .rodata")
            addrs = np.frombuffer(buf, dtype="<u8", count=n, offset=abs_at).astype(np.uint64)
            _check(addrs, names, types, text)
        except _Fail as err:
            problems.append(f"{layout}/absolute: {err}")
            continue
        tables = KallsymsTables(
            num_syms=base + num_syms_at, names=base + names_at, markers=base + markers_at,
            token_table=base + t, token_index=base + ti, offsets=base + abs_at,
            relative_base=None, layout=layout, mode="absolute")
        return _make(addrs, names, types, text, tables)
    raise _Fail("no address table fits: " + "; ".join(problems))


def _align8(x: int) -> int:
    return (x + 7) & ~7


def _addresses(buf: bytes, off_at: int, rb_at: int, n: int, mode: str) -> tuple[U64, int]:
    if off_at < 0 or off_at + 4 * n > len(buf) or rb_at + 8 > len(buf) or rb_at < 0:
        raise _Fail("out of .rodata")
    rb = int.from_bytes(buf[rb_at:rb_at + 8], "little")
    offs = np.frombuffer(buf, dtype="<i4", count=n, offset=off_at).astype(np.int64)
    rbu = np.uint64(rb)
    if mode == "relative":
        addrs = (offs & 0xFFFFFFFF).astype(np.uint64) + rbu
    else:
        neg = offs < 0
        if not neg.any():
            raise _Fail("no relative symbol")
        # relative_base - 1 - offset, offset < 0  ==  relative_base - 1 + |offset|
        rel = (rbu - np.uint64(1)) + (-offs[neg]).astype(np.uint64)
        addrs = np.empty(n, dtype=np.uint64)
        addrs[neg] = rel
        addrs[~neg] = offs[~neg].astype(np.uint64)
    return addrs, rb


def _check(addrs: U64, names: list[str], types: str, text: tuple[int, int] | None) -> None:
    if addrs.size > 1 and bool((addrs[1:] < addrs[:-1]).any()):
        raise _Fail("addresses not sorted")
    want = {"_stext", "_text"}
    hits = [int(addrs[i]) for i, nm in enumerate(names[:4096]) if nm in want]
    if not hits:
        hits = [int(addrs[i]) for i, nm in enumerate(names) if nm in want]
    if not hits:
        raise _Fail("no _stext/_text symbol")
    if text is not None and text[0] not in hits:
        raise _Fail(f"_stext/_text at {hits[0]:#x}, .text at {text[0]:#x}")


def _make(addrs: U64, names: list[str], types: str, text: tuple[int, int] | None,
          tables: KallsymsTables) -> Kallsyms:
    if text is None:
        names_idx = {nm: i for i, nm in enumerate(names) if nm in ("_stext", "_etext")}
        lo = int(addrs[names_idx["_stext"]]) if "_stext" in names_idx else 0
        hi = int(addrs[names_idx["_etext"]]) if "_etext" in names_idx else 0
        text = (lo, hi)
    addrs = addrs.copy()
    addrs.flags.writeable = False
    return Kallsyms(addresses=addrs, names=tuple(names), types=types, text=text,
                    tables=tables)

"""BTF: the kernel's own type information, read from the image's `.BTF` section.

Kernels built with CONFIG_DEBUG_INFO_BTF (Debian's 6.1 and 6.12 are) carry every type
of the kernel in a compact format (include/uapi/linux/btf.h), ~4 MB: enough to know the
layout of `struct module`, `struct ftrace_ops`, `struct kprobe` ... of *this* build
without a debug package and without offsets hard-coded per kernel version.

Format: a header (magic 0xeB9F, version 1, flags, hdr_len, then type_off/type_len and
str_off/str_len relative to the end of the header), a type section and a string section.
Type ids start at 1 (0 is void), in the order of the records. Each record is
`struct btf_type {u32 name_off; u32 info; u32 size_or_type}` — info holds vlen (bits
0-15), kind (bits 24-28) and kind_flag (bit 31) — followed by data that depends on the
kind (see `_EXTRA`). Members of a struct/union carry a bit offset; with kind_flag set its
high 8 bits are the bitfield size, otherwise a bitfield is an INT member whose encoding
says so.

The image is untrusted input: every record is bounds-checked against its section, ids
against the type count, strings are bounded, and every chain of references (typedefs,
modifiers, nested anonymous members, arrays) has a depth cap. Any failure is a
`scanner.errors.KernelImageError`; lookups of names that do not exist return None.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from scanner.errors import KernelImageError

__all__ = ["Btf", "BtfMember", "Kind", "MemberInfo", "parse_btf"]

MAGIC = 0xEB9F
#: Bounds far above any real kernel (Debian 6.12: ~150k types, 4.7 MB).
MAX_TYPES = 1 << 21
MAX_VLEN = 0xFFFF
MAX_NAME = 1024
#: Longest chain of typedef/modifier references, and of nested anonymous members.
MAX_DEPTH = 32
#: A type larger than this is nonsense for a kernel (and keeps arithmetic small).
MAX_SIZE = 1 << 40


class Kind(IntEnum):
    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


#: Bytes after the 12-byte record: fixed, and per vlen item.
_EXTRA: dict[Kind, tuple[int, int]] = {
    Kind.UNKN: (0, 0), Kind.INT: (4, 0), Kind.PTR: (0, 0), Kind.ARRAY: (12, 0),
    Kind.STRUCT: (0, 12), Kind.UNION: (0, 12), Kind.ENUM: (0, 8), Kind.FWD: (0, 0),
    Kind.TYPEDEF: (0, 0), Kind.VOLATILE: (0, 0), Kind.CONST: (0, 0), Kind.RESTRICT: (0, 0),
    Kind.FUNC: (0, 0), Kind.FUNC_PROTO: (0, 8), Kind.VAR: (4, 0), Kind.DATASEC: (0, 12),
    Kind.FLOAT: (0, 0), Kind.DECL_TAG: (4, 0), Kind.TYPE_TAG: (0, 0), Kind.ENUM64: (0, 12),
}
#: Kinds whose third word is a size (the others: a type id, or unused).
_SIZED = frozenset({Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT,
                    Kind.DATASEC})
#: References that do not change the layout.
_TRANSPARENT = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT,
                          Kind.TYPE_TAG})
_REFERS = frozenset({Kind.PTR, Kind.FUNC, Kind.VAR, Kind.DECL_TAG} | _TRANSPARENT)
_PATH = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,127})((?:\[\d{1,6}\]){0,4})$")


@dataclass(frozen=True)
class BtfMember:
    """One member of a struct or union: its name ('' for anonymous), type id and
    bit offset; `bitfield_size` is 0 unless it is a bitfield."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


@dataclass(frozen=True)
class MemberInfo:
    """Where a member path lives in its outermost struct.

    `offset` is in bytes; `size` the member's type size in bytes. For a bitfield,
    `bit_shift` (0-7) is its first bit within the byte at `offset` and `bit_size` its
    width; both 0 otherwise. `count` is the element count when the member is an array
    (0 when it is not). `type_id` is the member's type, modifiers stripped.
    """

    offset: int
    size: int
    type_id: int
    count: int = 0
    bit_shift: int = 0
    bit_size: int = 0


class Btf:
    """The types of one `.BTF` blob. Build with `parse_btf`."""

    def __init__(self, data: bytes, where: str) -> None:
        self._where = where
        if len(data) < 24:
            raise self._err(f"{len(data)} bytes is too short for a BTF header", 0)
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise self._err(f"magic {magic:#06x}, expected {MAGIC:#06x}", 0)
        if version != 1:
            raise self._err(f"BTF version {version}, only version 1 is known", 2)
        if not 24 <= hdr_len <= min(len(data), 256) or hdr_len % 4:
            raise self._err(f"header length {hdr_len} is not plausible", 4)
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        for what, off, ln in (("type", type_off, type_len), ("string", str_off, str_len)):
            if hdr_len + off + ln > len(data):
                raise self._err(f"{what} section [{off:#x}+{ln:#x}] past the end of "
                                f"{len(data) - hdr_len:#x} bytes", 8)
        if type_off % 4 or type_len % 4:
            raise self._err(f"type section at {type_off:#x}, {type_len:#x} B is unaligned", 8)
        self._types = memoryview(data)[hdr_len + type_off:hdr_len + type_off + type_len]
        self._strs = bytes(data[hdr_len + str_off:hdr_len + str_off + str_len])
        if self._strs and self._strs[0] != 0:
            raise self._err("string section does not start with an empty string", str_off)
        # Per type id (index 0 = void): kind, name offset, vlen, kind_flag, third word,
        # offset of the record in the type section.
        self._kind = bytearray(1)
        self._name_off: list[int] = [0]
        self._vlen: list[int] = [0]
        self._kflag = bytearray(1)
        self._word: list[int] = [0]
        self._rec: list[int] = [0]
        self._index()
        self._by_name: dict[tuple[int, str], int] | None = None

    def _err(self, msg: str, offset: int) -> KernelImageError:
        return KernelImageError(f"BTF: {msg} (at {offset:#x})", path=self._where)

    def _index(self) -> None:
        buf = self._types
        end = len(buf)
        pos = 0
        unpack = struct.Struct("<III").unpack_from
        while pos < end:
            if len(self._kind) > MAX_TYPES:
                raise self._err(f"more than {MAX_TYPES} types", pos)
            if pos + 12 > end:
                raise self._err("truncated type record", pos)
            name_off, info, word = unpack(buf, pos)
            k = (info >> 24) & 0x1F
            try:
                kind = Kind(k)
            except ValueError:
                raise self._err(f"type {len(self._kind)} has unknown kind {k}", pos) from None
            vlen = info & 0xFFFF
            fixed, per = _EXTRA[kind]
            size = 12 + fixed + per * vlen
            if pos + size > end:
                raise self._err(f"type {len(self._kind)} ({kind.name}, vlen {vlen}) runs "
                                "past the type section", pos)
            self._kind.append(kind)
            self._name_off.append(name_off)
            self._vlen.append(vlen)
            self._kflag.append(info >> 31)
            self._word.append(word)
            self._rec.append(pos)
            pos += size

    # -- basic accessors -------------------------------------------------------------
    def __len__(self) -> int:
        """Number of type ids, void included."""
        return len(self._kind)

    def _check_id(self, tid: int) -> None:
        if not 0 <= tid < len(self._kind):
            raise self._err(f"type id {tid} out of range (have {len(self._kind)})", 0)

    def kind(self, tid: int) -> Kind:
        self._check_id(tid)
        return Kind(self._kind[tid])

    def string(self, off: int) -> str:
        if not 0 <= off < len(self._strs):
            if off == 0:
                return ""
            raise self._err(f"string offset {off:#x} past {len(self._strs):#x}", off)
        end = self._strs.find(b"\0", off, off + MAX_NAME + 1)
        if end < 0:
            raise self._err(f"string at {off:#x} is unterminated or longer than {MAX_NAME}",
                            off)
        return self._strs[off:end].decode("utf-8", "replace")

    def name(self, tid: int) -> str:
        self._check_id(tid)
        return self.string(self._name_off[tid])

    def _u32(self, tid: int, extra: int) -> int:
        (v,) = struct.unpack_from("<I", self._types, self._rec[tid] + 12 + extra)
        return int(v)

    def find(self, kind: Kind, name: str) -> int | None:
        """Id of the first type of `kind` named `name` (None if there is none)."""
        if self._by_name is None:
            index: dict[tuple[int, str], int] = {}
            wanted = {Kind.STRUCT, Kind.UNION, Kind.TYPEDEF, Kind.ENUM, Kind.ENUM64,
                      Kind.INT, Kind.VAR, Kind.FUNC, Kind.DATASEC}
            for tid in range(1, len(self._kind)):
                k = self._kind[tid]
                if k in wanted and self._name_off[tid]:
                    index.setdefault((k, self.string(self._name_off[tid])), tid)
            self._by_name = index
        return self._by_name.get((int(kind), name))

    def struct_id(self, name: str) -> int | None:
        """A complete `struct name` (or `union name`) with members; a typedef to one."""
        for kind in (Kind.STRUCT, Kind.UNION, Kind.TYPEDEF):
            tid = self.find(kind, name)
            if tid is not None:
                tid = self.strip(tid)
                if self.kind(tid) in (Kind.STRUCT, Kind.UNION):
                    return tid
        return None

    # -- resolution ------------------------------------------------------------------
    def strip(self, tid: int) -> int:
        """Follow typedefs and modifiers to the type that has the layout."""
        for _ in range(MAX_DEPTH):
            self._check_id(tid)
            if Kind(self._kind[tid]) not in _TRANSPARENT:
                return tid
            tid = self._word[tid]
        raise self._err(f"typedef/modifier chain longer than {MAX_DEPTH} at type {tid}", 0)

    def size_of(self, tid: int) -> int:
        """Size in bytes of type `tid` (void and functions have none: error)."""
        mult = 1
        for _ in range(MAX_DEPTH):
            tid = self.strip(tid)
            kind = Kind(self._kind[tid])
            if kind in _SIZED:
                size = mult * self._word[tid]
                break
            if kind is Kind.PTR:
                size = mult * 8
                break
            if kind is Kind.ARRAY:
                elem, _index, nelems = self.array(tid)
                mult *= nelems
                if mult > MAX_SIZE:
                    raise self._err(f"array type {tid} is implausibly large", 0)
                tid = elem
                continue
            raise self._err(f"type {tid} ({kind.name}) has no size", 0)
        else:
            raise self._err(f"array nesting deeper than {MAX_DEPTH} at type {tid}", 0)
        if size > MAX_SIZE:
            raise self._err(f"type {tid} size {size:#x} is implausible", 0)
        return size

    def array(self, tid: int) -> tuple[int, int, int]:
        """(element type, index type, element count) of an ARRAY."""
        if self.kind(tid) is not Kind.ARRAY:
            raise self._err(f"type {tid} is not an array", 0)
        elem, index, n = struct.unpack_from("<III", self._types, self._rec[tid] + 12)
        self._check_id(elem)
        return int(elem), int(index), int(n)

    def int_encoding(self, tid: int) -> tuple[int, int, int]:
        """(encoding flags, bit offset, bits) of an INT."""
        if self.kind(tid) is not Kind.INT:
            raise self._err(f"type {tid} is not an int", 0)
        v = self._u32(tid, 0)
        return (v >> 24) & 0xF, (v >> 16) & 0xFF, v & 0xFF

    def members(self, tid: int) -> list[BtfMember]:
        """The members of a STRUCT or UNION, in order."""
        kind = self.kind(tid)
        if kind not in (Kind.STRUCT, Kind.UNION):
            raise self._err(f"type {tid} ({kind.name}) is not a struct or union", 0)
        out = []
        base = self._rec[tid] + 12
        kflag = self._kflag[tid]
        for i in range(self._vlen[tid]):
            name_off, mtype, off = struct.unpack_from("<III", self._types, base + 12 * i)
            self._check_id(mtype)
            bits = off >> 24 if kflag else 0
            bit_off = off & 0xFFFFFF if kflag else off
            out.append(BtfMember(self.string(name_off), int(mtype), int(bit_off), int(bits)))
        return out

    def enumerators(self, tid: int) -> list[tuple[str, int]]:
        """(name, value) of an ENUM or ENUM64; signed when kind_flag says so."""
        kind = self.kind(tid)
        base = self._rec[tid] + 12
        signed = bool(self._kflag[tid])
        out = []
        if kind is Kind.ENUM:
            for i in range(self._vlen[tid]):
                name_off, v = struct.unpack_from("<Ii" if signed else "<II", self._types,
                                                 base + 8 * i)
                out.append((self.string(name_off), int(v)))
        elif kind is Kind.ENUM64:
            for i in range(self._vlen[tid]):
                name_off, lo, hi = struct.unpack_from("<III", self._types, base + 12 * i)
                v = lo | hi << 32
                if signed and v >= 1 << 63:
                    v -= 1 << 64
                out.append((self.string(name_off), int(v)))
        else:
            raise self._err(f"type {tid} ({kind.name}) is not an enum", 0)
        return out

    def enum_ids(self) -> list[int]:
        return [t for t in range(1, len(self._kind))
                if self._kind[t] in (Kind.ENUM, Kind.ENUM64)]

    # -- member paths ----------------------------------------------------------------
    def _find_member(self, tid: int, name: str, depth: int = 0,
                     seen: set[int] | None = None) -> tuple[BtfMember, int] | None:
        """Member `name` of struct/union `tid`, looking through anonymous members;
        with the bit offset of the anonymous container(s) it was found in. Each struct
        is searched once per lookup (`seen`): hostile BTF whose anonymous members all
        share one type would otherwise make the search exponential in the depth."""
        if depth > MAX_DEPTH:
            raise self._err(f"anonymous members nested deeper than {MAX_DEPTH}", 0)
        seen = set() if seen is None else seen
        seen.add(tid)
        members = self.members(tid)
        for m in members:
            if m.name == name:
                return m, 0
        for m in members:
            if m.name:
                continue
            inner = self.strip(m.type_id)
            if inner in seen:
                continue
            if self.kind(inner) in (Kind.STRUCT, Kind.UNION):
                hit = self._find_member(inner, name, depth + 1, seen)
                if hit is not None:
                    return hit[0], hit[1] + m.bit_offset
        return None

    def member(self, struct_name: str, path: str) -> MemberInfo | None:
        """Offset and size of `path` (e.g. ``core_layout.base``, ``mem[1].size``) in
        ``struct struct_name``; None when the struct or a member does not exist."""
        tid = self.struct_id(struct_name)
        if tid is None:
            return None
        return self.member_of(tid, path)

    def member_of(self, tid: int, path: str) -> MemberInfo | None:
        parts = path.split(".")
        if not path or len(parts) > MAX_DEPTH:
            raise ValueError(f"bad member path {path!r}")
        bit = 0
        mtype = tid
        bits = 0
        for part in parts:
            m = _PATH.match(part)
            if m is None:
                raise ValueError(f"bad member path component {part!r} in {path!r}")
            cur = self.strip(mtype)
            if self.kind(cur) not in (Kind.STRUCT, Kind.UNION):
                return None
            hit = self._find_member(cur, m.group(1))
            if hit is None:
                return None
            mem, outer = hit
            bit += outer + mem.bit_offset
            bits = mem.bitfield_size
            mtype = mem.type_id
            for idx in re.findall(r"\[(\d+)\]", m.group(2)):
                arr = self.strip(mtype)
                if self.kind(arr) is not Kind.ARRAY:
                    return None
                elem, _i, n = self.array(arr)
                if int(idx) >= n:
                    return None
                bit += int(idx) * self.size_of(elem) * 8
                mtype = elem
                bits = 0
        final = self.strip(mtype)
        size = self.size_of(final)
        count = self.array(final)[2] if self.kind(final) is Kind.ARRAY else 0
        if not bits and self.kind(final) is Kind.INT:
            # Old-style bitfield: the int's own encoding narrows it.
            _enc, ioff, nbits = self.int_encoding(final)
            if nbits != size * 8 or ioff:
                bit += ioff
                bits = nbits
        if bits:
            return MemberInfo(bit // 8, size, final, count, bit % 8, bits)
        if bit % 8:
            raise self._err(f"member {path} at bit {bit} is not byte aligned", 0)
        return MemberInfo(bit // 8, size, final, count)


def parse_btf(data: bytes | bytearray | memoryview, *, where: str = "<bytes>") -> Btf:
    """Index a `.BTF` blob (raises `KernelImageError` if it is not one)."""
    try:
        return Btf(bytes(data), where)
    except (struct.error, ValueError) as err:
        if isinstance(err, KernelImageError):
            raise
        raise KernelImageError(f"BTF: {err}", path=where) from err

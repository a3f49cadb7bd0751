"""BTF reader and struct layouts: synthetic BTF built here, hostile BTF, real Debian images.

The synthetic blobs are written by `BtfBuilder` straight from include/uapi/linux/btf.h,
independently of the reader. On the real images the expected offsets come from the
kernel sources (struct module starts `state; list; name[MODULE_NAME_LEN]`,
MODULE_NAME_LEN = 64 - sizeof(long); 6.4+ has MOD_MEM_NUM_TYPES = 7 `mem[]` entries).
"""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import orjson
import pytest
import zstandard

from scanner.errors import KernelImageError
from scanner.image.btf import Btf, Kind, MemberInfo, parse_btf
from scanner.image.kernel_profile import KernelProfile, profile_from_image
from scanner.image.layouts import Field, Layouts, StructLayout, layouts_from_btf
from tests.needs import unavailable
from tests.realkernels import real_image


class BtfBuilder:
    """Writes a BTF blob type by type (ids from 1, in order)."""

    def __init__(self) -> None:
        self.strs = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strs)
        self.strs += name.encode() + b"\0"
        return off

    def _rec(self, name: str, kind: Kind, vlen: int, word: int, extra: bytes = b"",
             kflag: int = 0) -> int:
        info = vlen | int(kind) << 24 | kflag << 31
        self.types += struct.pack("<III", self.s(name), info, word) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int, bits: int | None = None, offset: int = 0) -> int:
        enc = (offset << 16) | (size * 8 if bits is None else bits)
        return self._rec(name, Kind.INT, 0, size, struct.pack("<I", enc))

    def ptr(self, to: int) -> int:
        return self._rec("", Kind.PTR, 0, to)

    def typedef(self, name: str, to: int) -> int:
        return self._rec(name, Kind.TYPEDEF, 0, to)

    def mod(self, kind: Kind, to: int) -> int:
        return self._rec("", kind, 0, to)

    def array(self, elem: int, n: int, index: int = 1) -> int:
        return self._rec("", Kind.ARRAY, 0, 0, struct.pack("<III", elem, index, n))

    def struct(self, name: str, size: int, members: list[tuple[str, int, int, int]],
               *, union: bool = False, kflag: int = 0) -> int:
        extra = b"".join(struct.pack("<III", self.s(n), t, (bits << 24 | off) if kflag else off)
                         for n, t, off, bits in members)
        return self._rec(name, Kind.UNION if union else Kind.STRUCT, len(members), size,
                         extra, kflag)

    def enum(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(struct.pack("<Ii" if signed else "<II", self.s(n), v)
                         for n, v in values)
        return self._rec(name, Kind.ENUM, len(values), 4, extra, int(signed))

    def enum64(self, name: str, values: list[tuple[str, int]]) -> int:
        extra = b"".join(struct.pack("<III", self.s(n), v & 0xFFFFFFFF, v >> 32)
                         for n, v in values)
        return self._rec(name, Kind.ENUM64, len(values), 8, extra)

    def raw(self, kind: int, vlen: int, word: int, extra: bytes = b"") -> int:
        self.types += struct.pack("<III", 0, vlen | kind << 24, word) + extra
        self.count += 1
        return self.count

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strs))
        return hdr + bytes(self.types) + bytes(self.strs)


def sample() -> tuple[BtfBuilder, dict[str, int]]:
    """A miniature `struct module`: typedefs, const, nested anonymous union/struct,
    arrays of structs, kind_flag and old-style bitfields."""
    b = BtfBuilder()
    ids: dict[str, int] = {}
    u8 = b.int_("unsigned char", 1)
    u16 = b.int_("unsigned short", 2)
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long unsigned int", 8)
    boolean = b.int_("_Bool", 1)
    voidp = b.ptr(0)
    lhp = b.ptr(b.count + 2)                           # forward reference, as BTF has
    ids["list_head"] = lh = b.struct("list_head", 16, [("next", lhp, 0, 0),
                                                       ("prev", lhp, 64, 0)])
    td = b.typedef("u32_t", b.typedef("u32_inner", u32))
    cst = b.mod(Kind.CONST, b.mod(Kind.VOLATILE, td))
    name = b.array(u8, 56, u32)
    mm = b.struct("module_memory", 16, [("base", voidp, 0, 0), ("size", u32, 64, 0)])
    mem = b.array(mm, 3, u32)
    anon_s = b.struct("", 8, [("lo", u32, 0, 0), ("hi", cst, 32, 0)])
    anon_u = b.struct("", 8, [("whole", u64, 0, 0), ("", anon_s, 0, 0)], union=True)
    bf_old = b.int_("", 2, bits=3, offset=0)       # old-style: int of 3 bits
    ids["module"] = b.struct("module", 200, [
        ("state", u32, 0, 0), ("list", lh, 64, 0), ("name", name, 192, 0),
        ("", anon_u, 640, 0), ("mem", mem, 704, 0), ("sig_ok", boolean, 1088, 0),
        ("old_bits", bf_old, 1093, 0), ("tail", u16, 1104, 0),
    ])
    ids["flags"] = b.struct("flagged", 4, [("a", u16, 0, 1), ("b", u16, 1, 5),
                                           ("c", u16, 16, 0)], kflag=1)
    ids["state"] = b.enum("module_state", [("MODULE_STATE_LIVE", 0),
                                           ("MODULE_STATE_GOING", 2)])
    b.enum("", [("FTRACE_OPS_FL_ENABLED", 1), ("FTRACE_OPS_FL_IPMODIFY", 1 << 12),
                ("OTHER_THING", 7)])
    b.enum("neg", [("NEG", -5)], signed=True)
    b.enum64("big", [("BIG", 1 << 40)])
    b.typedef("module_t", ids["module"])
    return b, ids


def test_member_paths_through_typedefs_anonymous_members_and_arrays() -> None:
    b, _ids = sample()
    btf = parse_btf(b.blob())
    assert len(btf) == b.count + 1
    assert btf.member("module", "state") == MemberInfo(0, 4, 3)
    assert btf.member("module", "list").offset == 8
    assert btf.member("module", "list.prev").offset == 16
    name = btf.member("module", "name")
    assert (name.offset, name.size, name.count) == (24, 56, 56)
    # Anonymous union, then an anonymous struct inside it; through typedef + const.
    assert btf.member("module", "whole") == MemberInfo(80, 8, 4)
    assert btf.member("module", "hi") == MemberInfo(84, 4, 3)
    mem = btf.member("module", "mem")
    assert (mem.offset, mem.size, mem.count) == (88, 48, 3)
    assert btf.member("module", "mem[2].size").offset == 88 + 32 + 8
    assert btf.member("module", "mem[3].size") is None        # past the array
    assert btf.member("module", "sig_ok").offset == 136
    old = btf.member("module", "old_bits")
    assert (old.offset, old.bit_shift, old.bit_size) == (136, 5, 3)
    assert btf.member("module", "nope") is None
    assert btf.member("nope", "state") is None
    assert btf.member("module_t", "tail").offset == 138     # a typedef names the struct
    a, bb, c = (btf.member("flagged", p) for p in "abc")
    assert (a.offset, a.bit_shift, a.bit_size) == (0, 0, 1)
    assert (bb.offset, bb.bit_shift, bb.bit_size) == (0, 1, 5)
    assert (c.offset, c.bit_size) == (2, 0)
    assert btf.size_of(btf.struct_id("module") or 0) == 200
    with pytest.raises(ValueError):
        btf.member("module", "mem[x]")


def test_enums_and_layouts() -> None:
    b, ids = sample()
    btf = parse_btf(b.blob())
    assert btf.enumerators(ids["state"]) == [("MODULE_STATE_LIVE", 0), ("MODULE_STATE_GOING", 2)]
    values = dict(v for t in btf.enum_ids() for v in btf.enumerators(t))
    assert values["NEG"] == -5 and values["BIG"] == 1 << 40
    lay = layouts_from_btf(btf)
    assert lay.enums == {"MODULE_STATE_LIVE": 0, "MODULE_STATE_GOING": 2,
                         "FTRACE_OPS_FL_ENABLED": 1, "FTRACE_OPS_FL_IPMODIFY": 1 << 12}
    assert lay["module"]["name"] == Field(24, 56, 56)
    assert "core_layout.base" not in lay["module"]          # this "kernel" has mem[]
    assert lay["module"]["mem"].count == 3 and lay["module_memory"].size == 16
    assert "ftrace_ops" not in lay
    again = Layouts.from_plain(orjson.loads(orjson.dumps(lay.to_plain())))
    assert again == lay


@pytest.mark.parametrize("plain", [
    None, {"format": 2}, {"format": 1, "structs": {}, "enums": []},
    {"format": 1, "structs": {"m": [8, {"x": [4, 8, 0, 0, 0]}]}, "enums": {}},   # past end
    {"format": 1, "structs": {"m": [8, {"x": [0, 8, 0, 9, 0]}]}, "enums": {}},   # shift 9
    {"format": 1, "structs": {"m": [8, {"x": [0, 8, 0]}]}, "enums": {}},
    {"format": 1, "structs": {"m": [-1, {}]}, "enums": {}},
    {"format": 1, "structs": {}, "enums": {"A": "1"}},
])
def test_stored_layouts_are_checked(plain: object) -> None:
    with pytest.raises(KernelImageError):
        Layouts.from_plain(plain)


def _header(types: bytes, strs: bytes = b"\0", **kw: int) -> bytes:
    h = {"magic": 0xEB9F, "version": 1, "hdr_len": 24, "type_off": 0,
         "type_len": len(types), "str_off": len(types), "str_len": len(strs), **kw}
    return struct.pack("<HBBIIIII", h["magic"], h["version"], 0, h["hdr_len"],
                       h["type_off"], h["type_len"], h["str_off"], h["str_len"]) + types + strs


@pytest.mark.parametrize("blob, what", [
    (b"\x9f\xeb", "too short"),
    (_header(b"", magic=0x1234), "magic 0x1234"),
    (_header(b"", version=2), "version 2"),
    (_header(b"", hdr_len=7), "header length"),
    (_header(b"", type_len=1 << 30), "past the end"),
    (_header(struct.pack("<III", 0, 4 << 24 | 50, 8)), "runs past"),        # vlen 50
    (_header(struct.pack("<III", 0, 25 << 24, 8)), "unknown kind 25"),
    (_header(struct.pack("<II", 0, 0)), "truncated"),
    (_header(b"", strs=b"x\0"), "does not start with an empty string"),
])
def test_malformed_btf_is_a_clear_error(blob: bytes, what: str) -> None:
    with pytest.raises(KernelImageError, match=what):
        parse_btf(blob)


def test_hostile_references_are_bounded() -> None:
    b = BtfBuilder()
    t1 = b.typedef("loop_a", 2)                       # 1 -> 2 -> 1: a typedef cycle
    b.typedef("loop_b", t1)
    b.raw(Kind.PTR, 0, 999)                           # 3: pointer to a missing id
    b.struct("bad_member", 8, [("x", 999, 0, 0)])     # 4: member of a missing type
    # 5: struct whose anonymous member is itself: endless nesting.
    b.struct("selfish", 8, [("", 5, 0, 0)])
    b.struct("cyc", 8, [("t", 1, 0, 0)])              # 6: member typed by the cycle
    arr = b.array(b.int_("u8", 1), 1 << 30)           # 8: 1 GiB array of u8 ...
    big = b.array(arr, 1 << 30)                       # 9: ... of 1 GiB arrays
    b.struct("huge", 8, [("h", big, 0, 0)])
    b.struct("unaligned", 8, [("u", 7, 3, 0)])       # a u8 at bit 3, not a bitfield
    # 12: a chain of structs, each with 2,000 anonymous members of the next one: a
    # search that does not remember where it looked would visit 2000**5 of them.
    b.raw(Kind.INT, 0, 4, struct.pack("<I", 32))
    first = b.count + 1
    for level in range(6):
        target = first + level + 1 if level < 5 else first - 1
        b.struct(f"fan{level}", 8, [("", target, 0, 0)] * 2000)
    btf = parse_btf(b.blob())
    assert btf.member("fan0", "no_such_member") is None
    assert btf.member("selfish", "y") is None        # searched once, not forever
    for call in (lambda: btf.strip(1), lambda: btf.size_of(3) and btf.size_of(999),
                 lambda: btf.member("bad_member", "x"),
                 lambda: btf.member("cyc", "t"), lambda: btf.member("huge", "h"),
                 lambda: btf.member("unaligned", "u")):
        with pytest.raises(KernelImageError):
            call()
    assert btf.size_of(3) == 8                      # a pointer's size needs no target


def test_mutated_btf_never_crashes() -> None:
    """Random corruption: either a Btf whose lookups answer or raise KernelImageError."""
    good = sample()[0].blob()
    rng = random.Random(16)
    for _ in range(400):
        blob = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        try:
            btf = parse_btf(bytes(blob))
            layouts_from_btf(btf)
            for path in ("state", "list.next", "name", "mem[1].size", "hi", "old_bits"):
                btf.member("module", path)
        except KernelImageError:
            pass


# ------------------------------------------------------------------------ real images


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_real_image_layouts(which: str) -> None:
    img = real_image(which)
    btf = parse_btf(img.section_bytes(".BTF"))
    assert len(btf) > 50_000
    lay = layouts_from_btf(btf)
    mod = lay["module"]
    assert (mod["state"].offset, mod["list"].offset, mod["name"]) == (0, 8, Field(24, 56, 56))
    assert lay["list_head"].size == 16 and lay["list_head"]["prev"].offset == 8
    assert mod["sig_ok"].size == 1 and mod["taints"].size == 8
    assert lay.enums["MODULE_STATE_LIVE"] == 0 and lay.enums["MODULE_STATE_UNFORMED"] == 3
    assert lay.enums["FTRACE_OPS_FL_IPMODIFY"] == 1 << 12
    for s in ("ftrace_ops", "ftrace_hash", "ftrace_func_entry", "kprobe", "optimized_kprobe",
              "bpf_prog", "bpf_prog_aux", "hlist_node", "mod_kallsyms"):
        assert s in lay, s
    for path in ("func", "next", "flags", "trampoline", "trampoline_size", "func_hash",
                 "local_hash", "private"):
        assert path in lay["ftrace_ops"], path
    for path in ("addr", "pre_handler", "post_handler", "hlist", "symbol_name", "flags",
                 "opcode", "ainsn"):
        assert path in lay["kprobe"], path
    jited = lay["bpf_prog"]["jited"]
    assert jited.bit_size == 1 and jited.size == 2     # `u16 jited:1`
    if which == "6.1":
        assert "mem" not in mod and mod["core_layout.base"].size == 8
        assert mod["core_layout.text_size"].offset == mod["core_layout.base"].offset + 12
    else:
        assert "core_layout.base" not in mod
        assert mod["mem"].count == 7 == lay.enums["MOD_MEM_NUM_TYPES"]
        assert mod["mem"].size == 7 * lay["module_memory"].size
        assert lay.enums["MOD_TEXT"] == 0


def _strip_header(blob: bytes, *keys: str) -> bytes:
    """The same profile as an older kscan stored it: without `keys` in its header."""
    raw = zstandard.ZstdDecompressor().decompress(blob[8:], max_output_size=1 << 30)
    (n,) = struct.unpack_from("<I", raw)
    h = orjson.loads(raw[4:4 + n])
    for k in keys:
        h.pop(k)
    head = orjson.dumps(h)
    return blob[:8] + zstandard.ZstdCompressor().compress(
        struct.pack("<I", len(head)) + head + raw[4 + n:])


def test_profile_keeps_layouts_and_data_symbols_and_reads_older_ones() -> None:
    from scanner.commands.handlers import knows_less as _knows_less

    prof = profile_from_image(real_image("6.1"))
    assert prof.layouts is not None and prof.layouts_off is None
    ks = prof.kallsyms
    assert ks is not None
    for name in ("modules", "ftrace_ops_list", "kprobe_table", "sys_call_table", "prog_idr"):
        assert prof.data_symbol(name) is not None, name
    assert prof.data_symbols["modules"].type == "D"
    kt = prof.data_symbols["kprobe_table"]
    assert kt.type == "b" and kt.span >= 64 * 8            # KPROBE_TABLE_SIZE hlist_heads
    again = KernelProfile.from_bytes(prof.to_bytes())
    assert again.layouts == prof.layouts and again.data_symbols == prof.data_symbols
    old = KernelProfile.from_bytes(_strip_header(prof.to_bytes(), "layouts", "btf_note",
                                                 "data_symbols"))
    assert old.layouts is None and old.data_symbols == {}
    assert "profile add" in (old.layouts_off or "")
    assert _knows_less(old, prof) and not _knows_less(again, prof)


def test_image_without_btf_says_what_is_off() -> None:
    img = real_image("6.1")
    sections = {k: v for k, v in img.sections.items() if k != ".BTF"}
    nobtf = dataclasses.replace(img, sections=sections)
    prof = profile_from_image(nobtf)
    assert prof.layouts is None
    assert prof.layouts_off is not None and "no .BTF" in prof.layouts_off
    assert "\n" not in prof.layouts_off
    assert KernelProfile.from_bytes(prof.to_bytes()).layouts_off == prof.layouts_off


def test_btf_class_is_what_parse_returns() -> None:
    assert isinstance(parse_btf(sample()[0].blob()), Btf)
    assert StructLayout("x", 8, {}).get("y") is None


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_real_image_against_bpftool(which: str, tmp_path: Path) -> None:
    """Every type of the real images as bpftool (the kernel tree's own BTF reader) dumps
    it: kind and name of each id, size and members (bit offsets, bitfield sizes) of every
    struct and union, values of every enum."""
    bpftool = shutil.which("bpftool") or ("/usr/sbin/bpftool"
                                          if Path("/usr/sbin/bpftool").exists() else None)
    if bpftool is None:
        unavailable("bpftool not installed")
    raw = real_image(which).section_bytes(".BTF")
    blob = tmp_path / "btf"
    blob.write_bytes(raw)
    dump = subprocess.run([bpftool, "btf", "dump", "file", str(blob), "format", "raw"],
                          capture_output=True, text=True, check=True).stdout
    btf = parse_btf(raw)
    head = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(?: size=(\d+))?")
    member = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?")
    enumval = re.compile(r"^\t'([^']*)' val=(-?\d+)")
    ids = 0
    cur: int | None = None
    members: list[tuple[str, int, int, int]] = []
    values: list[tuple[str, int]] = []
    compared = {"members": 0, "enumerators": 0}

    def finish() -> None:
        if cur is None:
            return
        kind = btf.kind(cur)
        if kind in (Kind.STRUCT, Kind.UNION):
            got = [(m.name or "(anon)", m.type_id, m.bit_offset, m.bitfield_size)
                   for m in btf.members(cur)]
            assert got == members, cur
            compared["members"] += len(got)
        elif kind in (Kind.ENUM, Kind.ENUM64):
            assert btf.enumerators(cur) == values, cur
            compared["enumerators"] += len(values)

    for line in dump.splitlines():
        h = head.match(line)
        if h:
            finish()
            cur, kind, name, size = int(h[1]), h[2], h[3], h[4]
            ids += 1
            assert btf.kind(cur).name == kind, (cur, kind)
            assert (btf.name(cur) or "(anon)") == name, cur
            if size is not None and btf.kind(cur) in (Kind.STRUCT, Kind.UNION):
                assert btf.size_of(cur) == int(size), cur
            members, values = [], []
            continue
        m = member.match(line)
        if m:
            members.append((m[1], int(m[2]), int(m[3]), int(m[4] or 0)))
            continue
        e = enumval.match(line)
        if e:
            values.append((e[1], int(e[2])))
    finish()
    assert ids == len(btf) - 1 > 50_000
    assert compared["members"] > 50_000 and compared["enumerators"] > 5_000, compared


def test_profile_add_upgrades_a_profile_stored_without_layouts(tmp_path: Path) -> None:
    """`kscan profile add` of a kernel whose stored profile predates struct layouts
    replaces it (the way kallsyms and patch sites were added before)."""
    import asyncio

    from store import Store
    from tests.kscan_proc import kscan
    from tools.guests import ensure_kernel

    db = str(tmp_path / "k.db")
    prof = profile_from_image(real_image("6.1"))
    old = _strip_header(prof.to_bytes(), "layouts", "btf_note", "data_symbols")

    async def put() -> None:
        async with Store.open(db) as st:
            await st.add_profile(prof.build_id, prof.release, prof.version, old)

    async def get() -> KernelProfile:
        async with Store.open(db) as st:
            row = await st.get_profile(prof.build_id)
            assert row is not None
            return KernelProfile.from_bytes(row.data)

    asyncio.run(put())
    assert asyncio.run(get()).layouts is None
    out = kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", db)
    assert out.returncode == 0 and out.stdout.startswith("upgraded profile "), out
    assert "struct layouts from BTF" in out.stdout
    stored = asyncio.run(get())
    assert stored.layouts == prof.layouts and stored.data_symbol("modules") is not None

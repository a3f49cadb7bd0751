"""Layouts of the kernel structures kscan reads from guest memory, taken from BTF.

`WANTED` is the one table of what is read: for each struct the member paths kscan (the
module list here, attribution of hooks after it) needs. `layouts_from_btf` resolves each
against the image's own BTF (`scanner.image.btf`), so nothing is hard-coded per kernel
version; a member a kernel does not have (6.1's `core_layout` vs 6.4+'s `mem[]`) is just
absent, and readers choose by what is present. Also the values of a few enums
(`module_state`, `mod_mem_type`, `FTRACE_OPS_FL_*`).

`DATA_SYMBOLS` is the table of kernel variables those readers start from; their link-time
addresses come from kallsyms (`data_symbols_from`).

A `Layouts` is small (a few KB of JSON) and stored in the kernel profile; `from_plain`
checks what it reads (a stored profile is input too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scanner.errors import KernelImageError
from scanner.image.btf import Btf
from scanner.image.kallsyms import Kallsyms

__all__ = ["DATA_SYMBOLS", "WANTED", "DataSymbol", "Field", "Layouts", "StructLayout",
           "data_symbols_from", "layouts_from_btf"]

#: struct → member paths. Paths absent from a kernel are left out of its layouts.
WANTED: dict[str, tuple[str, ...]] = {
    "list_head": ("next", "prev"),
    "hlist_head": ("first",),
    "hlist_node": ("next", "pprev"),
    "module": (
        "state", "list", "name", "sig_ok", "taints", "init", "exit",
        # 6.1-6.3: two layouts; 6.4+: mem[MOD_MEM_NUM_TYPES]
        "core_layout", "core_layout.base", "core_layout.size", "core_layout.text_size",
        "core_layout.ro_size", "core_layout.ro_after_init_size",
        "init_layout", "init_layout.base", "init_layout.size", "init_layout.text_size",
        "init_layout.ro_size", "mem",
        "kallsyms", "core_kallsyms", "core_kallsyms.symtab", "core_kallsyms.num_symtab",
        "core_kallsyms.strtab", "core_kallsyms.typetab",
        "num_syms", "syms", "num_ftrace_callsites", "ftrace_callsites",
        "num_kprobe_blacklist", "kprobe_blacklist",
    ),
    "module_memory": ("base", "size"),
    "module_layout": ("base", "size", "text_size", "ro_size", "ro_after_init_size"),
    "mod_kallsyms": ("symtab", "num_symtab", "strtab", "typetab"),
    "ftrace_ops": ("func", "next", "flags", "private", "trampoline", "trampoline_size",
                   "local_hash", "local_hash.filter_hash", "local_hash.notrace_hash",
                   "func_hash", "saved_func", "direct_call", "ops_func", "list"),
    "ftrace_ops_hash": ("notrace_hash", "filter_hash"),
    "ftrace_hash": ("size_bits", "buckets", "count", "flags"),
    "ftrace_func_entry": ("hlist", "ip", "direct"),
    "kprobe": ("hlist", "list", "addr", "symbol_name", "offset", "pre_handler",
               "post_handler", "opcode", "ainsn", "ainsn.insn", "flags"),
    "arch_specific_insn": ("insn", "boostable", "size", "emulate_op"),
    "optimized_kprobe": ("kp", "list", "optinsn", "optinsn.insn", "optinsn.size"),
    "arch_optimized_insn": ("copied_insn", "insn", "size"),
    "bpf_prog": ("len", "jited_len", "jited", "type", "aux", "bpf_func", "tag"),
    "bpf_prog_aux": ("id", "name", "ksym", "ksym.start", "ksym.end", "func_cnt", "prog"),
    "bpf_ksym": ("start", "end", "name", "lnode", "tnode", "prog"),
    "idr": ("idr_rt", "idr_base", "idr_next"),
    # Owners of executable kernel memory (scanner.check.kernel_lists.exec_owners).
    "kprobe_insn_cache": ("pages", "insn_size", "sym"),
    "kprobe_insn_page": ("list", "insns", "cache", "nused"),
    "bpf_prog_pack": ("list", "ptr", "bitmap"),
    "real_mode_header": ("text_start", "ro_end"),
}
#: Enums whose every value is kept, and prefixes of enumerators kept from any enum.
WANTED_ENUMS = ("module_state", "mod_mem_type")
WANTED_ENUM_PREFIXES = ("FTRACE_OPS_FL_", "BPF_PROG_TYPE_")

#: Kernel variables the readers start from (link-time addresses from kallsyms).
DATA_SYMBOLS = (
    "modules", "module_mutex", "ftrace_ops_list", "ftrace_list_end", "ftrace_trace_function",
    "kprobe_table", "optimizing_list", "kprobe_insn_slots", "kprobe_optinsn_slots",
    "sys_call_table", "x32_sys_call_table", "ia32_sys_call_table", "x64_sys_call",
    "prog_idr", "bpf_kallsyms", "bpf_tree", "__x86_return_thunk", "ftrace_ops_assist_func",
    "ftrace_regs_caller", "ftrace_caller", "ftrace_stub", "klp_patches", "init_task",
    "_stext", "_etext", "__start_rodata", "__end_rodata", "_sdata", "_edata",
    "tainted_mask", "direct_functions",
    "pack_list", "ftrace_ops_trampoline_list", "real_mode_header", "real_mode_blob",
    "real_mode_blob_end", "page_offset_base", "idt_table",
)

#: Bounds on stored layouts (far above the tables here).
_MAX_STRUCTS = 256
_MAX_FIELDS = 256
_MAX_ENUMS = 4096


@dataclass(frozen=True)
class Field:
    """A member of a struct: byte offset and size; for an array its element count; for
    a bitfield its first bit in the byte at `offset` and its width."""

    offset: int
    size: int
    count: int = 0
    bit_shift: int = 0
    bit_size: int = 0

    def to_plain(self) -> list[int]:
        return [self.offset, self.size, self.count, self.bit_shift, self.bit_size]

    @classmethod
    def from_plain(cls, v: Any) -> Field:
        if not (isinstance(v, list) and len(v) == 5 and all(type(x) is int for x in v)):
            raise ValueError(f"bad field {v!r}")
        f = cls(*v)
        if not (0 <= f.offset < 1 << 20 and 0 <= f.size < 1 << 20 and 0 <= f.count < 1 << 20
                and 0 <= f.bit_shift < 8 and 0 <= f.bit_size <= 64):
            raise ValueError(f"implausible field {v!r}")
        return f


@dataclass(frozen=True)
class StructLayout:
    name: str
    size: int
    fields: Mapping[str, Field]

    def __contains__(self, path: str) -> bool:
        return path in self.fields

    def __getitem__(self, path: str) -> Field:
        try:
            return self.fields[path]
        except KeyError:
            raise KeyError(f"struct {self.name} has no member {path} in this kernel") from None

    def get(self, path: str) -> Field | None:
        return self.fields.get(path)


@dataclass(frozen=True)
class Layouts:
    """The structures and enum values of one kernel build."""

    structs: Mapping[str, StructLayout]
    enums: Mapping[str, int]

    def __contains__(self, name: str) -> bool:
        return name in self.structs

    def __getitem__(self, name: str) -> StructLayout:
        try:
            return self.structs[name]
        except KeyError:
            raise KeyError(f"no layout of struct {name} for this kernel") from None

    def get(self, name: str) -> StructLayout | None:
        return self.structs.get(name)

    def field(self, struct: str, path: str) -> Field | None:
        s = self.structs.get(struct)
        return None if s is None else s.fields.get(path)

    def to_plain(self) -> dict[str, Any]:
        return {"format": 1,
                "structs": {n: [s.size, {p: f.to_plain() for p, f in s.fields.items()}]
                            for n, s in self.structs.items()},
                "enums": dict(self.enums)}

    @classmethod
    def from_plain(cls, v: Any) -> Layouts:
        """Check and rebuild stored layouts (raises `KernelImageError`)."""
        try:
            if not isinstance(v, dict) or v.get("format") != 1:
                raise ValueError("unknown format")
            structs_in, enums_in = v["structs"], v["enums"]
            if not (isinstance(structs_in, dict) and len(structs_in) <= _MAX_STRUCTS
                    and isinstance(enums_in, dict) and len(enums_in) <= _MAX_ENUMS):
                raise ValueError("bad tables")
            structs = {}
            for name, (size, fields) in structs_in.items():
                if type(size) is not int or not 0 < size < 1 << 20 or not isinstance(
                        fields, dict) or len(fields) > _MAX_FIELDS:
                    raise ValueError(f"bad struct {name}")
                fs = {str(p): Field.from_plain(f) for p, f in fields.items()}
                if any(f.offset + (f.size if not f.bit_size else 1) > size for f in fs.values()):
                    raise ValueError(f"a member of {name} lies past its size {size}")
                structs[str(name)] = StructLayout(str(name), size, fs)
            enums = {}
            for k, val in enums_in.items():
                if type(val) is not int or not -(1 << 63) <= val < 1 << 64:
                    raise ValueError(f"bad enum value {k}")
                enums[str(k)] = val
            return cls(structs, enums)
        except (KeyError, TypeError, ValueError) as err:
            raise KernelImageError(f"stored struct layouts are corrupt: {err}",
                                   path="<db>") from err


def layouts_from_btf(btf: Btf) -> Layouts:
    """Resolve `WANTED` against `btf`. Structs the kernel lacks are left out."""
    structs: dict[str, StructLayout] = {}
    for name, paths in WANTED.items():
        tid = btf.struct_id(name)
        if tid is None:
            continue
        fields: dict[str, Field] = {}
        for path in paths:
            m = btf.member_of(tid, path)
            if m is not None:
                fields[path] = Field(m.offset, m.size, m.count, m.bit_shift, m.bit_size)
        structs[name] = StructLayout(name, btf.size_of(tid), fields)
    enums: dict[str, int] = {}
    for tid in btf.enum_ids():
        whole = btf.name(tid) in WANTED_ENUMS
        for ename, val in btf.enumerators(tid):
            if whole or ename.startswith(WANTED_ENUM_PREFIXES):
                enums.setdefault(ename, val)
    return Layouts(structs, enums)


@dataclass(frozen=True)
class DataSymbol:
    """A kernel variable: link-time address, kallsyms type (``D``, ``d``, ``B``, ``b``,
    ``R``, ...) and span (bytes up to the next symbol, as kallsyms sizes symbols: an
    upper bound of its size, e.g. of `kprobe_table`'s hash buckets; 0 if unknown)."""

    addr: int
    type: str
    span: int = 0


def data_symbols_from(ks: Kallsyms) -> dict[str, DataSymbol]:
    """Each of `DATA_SYMBOLS` the kernel has."""
    out: dict[str, DataSymbol] = {}
    for name in DATA_SYMBOLS:
        hit = ks.find(name)
        if hit is not None:
            addr, typ = hit
            span = ks.symbol_end(ks.index_at_or_below(addr)) - addr
            out[name] = DataSymbol(addr, typ, span if 0 < span < 1 << 30 else 0)
    return out

"""A listed module's own symbols, from its kallsyms copy in guest memory.

Each `struct module` keeps the symbols the kernel's kallsyms shows for it: `kallsyms`
(an RCU pointer to a `struct mod_kallsyms`: `symtab`, `num_symtab`, `strtab`) — or, when
that pointer cannot be read, the embedded `core_kallsyms`. `symtab` is an array of ELF64
symbols (`st_name` u32, `st_info` u8, `st_other` u8, `st_shndx` u16, `st_value` u64,
`st_size` u64) whose values are run-time addresses. With them an address inside a
module is named ``func+0xoff [module]``, as /proc/kallsyms would.

Hostile-safe: at most `MAX_SYMS` symbols, the string table read in bounded chunks (at
most `MAX_STRTAB` bytes), names bounded and escaped, symbols outside the kernel half
dropped. Whatever cannot be read leaves the module without names, not an error.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from scanner.check.kernel_lists.memory import (
    KernelReader,
    field_int,
    is_kernel_pointer,
)
from scanner.check.kernel_lists.modules import ModuleInfo
from scanner.image.layouts import Layouts

__all__ = ["MAX_SYMS", "ModuleSymbols", "read_module_symbols"]

MAX_SYMS = 1 << 16
MAX_STRTAB = 1 << 20
MAX_NAME = 128
_SYM = struct.Struct("<IBBHQQ")
_CHUNK = 1 << 15


@dataclass(frozen=True)
class ModuleSymbols:
    """A module's symbols sorted by address."""

    module: str
    addresses: tuple[int, ...]
    sizes: tuple[int, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self, name: str) -> int | None:
        try:
            return self.addresses[self.names.index(name)]
        except ValueError:
            return None

    def symbolize(self, addr: int) -> str | None:
        """``name+0xoff [module]`` of the symbol at or below `addr` that covers it
        (its size, or up to the next symbol when the size is 0); None otherwise."""
        i = bisect.bisect_right(self.addresses, addr) - 1
        if i < 0:
            return None
        base, size = self.addresses[i], self.sizes[i]
        end = base + size if size else (self.addresses[i + 1] if i + 1 < len(self)
                                        else base + 1)
        if not base <= addr < end:
            return None
        off = addr - base
        return f"{self.names[i]}{f'+{off:#x}' if off else ''} [{self.module}]"


def _escape(raw: bytes) -> str:
    return "".join(c if c.isprintable() and c != "\\" else f"\\x{ord(c):02x}"
                   for c in raw.decode("latin-1"))


def read_module_symbols(mem: KernelReader, layouts: Layouts, mod: ModuleInfo, *,
                        max_syms: int = MAX_SYMS) -> ModuleSymbols | None:
    """The symbols of one listed module (None if its kallsyms cannot be read)."""
    m = layouts.get("module")
    mk = layouts.get("mod_kallsyms")
    if m is None or mk is None or not all(f in mk for f in ("symtab", "num_symtab", "strtab")):
        return None
    buf = mem.struct(mod.address, m)
    if buf is None:
        return None
    mkbuf = None
    ptr_f = m.get("kallsyms")
    if ptr_f is not None:
        ptr = field_int(buf, ptr_f)
        if is_kernel_pointer(ptr):
            mkbuf = mem.struct(ptr, mk)
    if mkbuf is None and "core_kallsyms" in m:
        at = m["core_kallsyms"].offset
        mkbuf = buf[at:at + mk.size]
    if mkbuf is None or len(mkbuf) < mk.size:
        return None
    symtab, n, strtab = (field_int(mkbuf, mk[f]) for f in ("symtab", "num_symtab", "strtab"))
    if not (is_kernel_pointer(symtab) and is_kernel_pointer(strtab)) or not 0 < n <= max_syms:
        return None
    raw = bytearray()
    for at in range(0, n * _SYM.size, _CHUNK):
        part = mem.read(symtab + at, min(_CHUNK, n * _SYM.size - at))
        if part is None:
            break
        raw += part
    syms = [_SYM.unpack_from(raw, i * _SYM.size) for i in range(len(raw) // _SYM.size)]
    syms = [s for s in syms if s[0] and is_kernel_pointer(s[4])]
    if not syms:
        return None
    need = min(max(s[0] for s in syms) + MAX_NAME, MAX_STRTAB)
    strs = bytearray()
    while len(strs) < need:
        part = mem.read(strtab + len(strs), min(_CHUNK, need - len(strs)))
        if part is None:
            break
        strs += part
    out = []
    for st_name, _info, _other, _shndx, value, size in syms:
        if st_name >= len(strs):
            continue
        end = strs.find(b"\0", st_name, st_name + MAX_NAME)
        name = bytes(strs[st_name:end if end >= 0 else st_name + MAX_NAME])
        if name:
            out.append((value, min(size, 1 << 30), _escape(name)))
    out.sort()
    return ModuleSymbols(mod.name, tuple(a for a, _, _ in out), tuple(s for _, s, _ in out),
                         tuple(nm for _, _, nm in out))

"""Who owns a kernel address: a kernel function, a listed module, a BPF program, or nobody.

One lookup for every check that must say whose code an address is (patch attribution
here; pointer tables and executable memory elsewhere). `OwnerLookup.owner(addr)` answers
with an `Owner`:

* `kernel` — the address lies in the running kernel's `.text`; `symbol` is
  ``name+0xoff`` from the profile's symbols (kallsyms);
* `module` — it lies in the memory of a module on the kernel's module list; `name` is
  the module, `symbol` ``func+0xoff [module]`` from the module's own kallsyms copy
  where that can be read, `signed` its `sig_ok`, `trusted` whether the operator trusts
  it (``--trust-module``);
* `bpf` — it lies in a BPF program's JIT image (`bpf_kallsyms`): `name` the program's
  ksym name, `symbol` ``prog id N`` when its id is known;
* `unowned` — none of these: code in module space that no listed module holds (a
  module that unlinked itself), or anywhere else.

Everything it rests on is guest memory (the module list, each module's ranges and
symbols, the BPF ksym list) and so guest-writable; see README "Who patched the
kernel" for what cross-checks what. Pure: the lists come in already read.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kscan.addresses import hex_addr
from scanner.check.kernel_lists import BpfProgram, ModuleInfo, ModuleList, ModuleSymbols

__all__ = ["Owner", "OwnerKind", "OwnerLookup", "Trust", "judge"]


class OwnerKind(enum.StrEnum):
    KERNEL = "kernel"
    MODULE = "module"
    BPF = "bpf"
    UNOWNED = "unowned"


@dataclass(frozen=True)
class Owner:
    """Whose code one address is (see the module docstring)."""

    kind: OwnerKind
    address: int
    #: "vmlinux" for the kernel, the module's or BPF program's name, "" when unowned.
    name: str = ""
    symbol: str | None = None
    #: Modules: the kernel accepted the module's signature (None: not known).
    signed: bool | None = None
    #: Modules: the operator trusts it (--trust-module).
    trusted: bool = False

    @functools.cached_property
    def key(self) -> tuple[str, str, str | None]:
        """What groups sites in reports: kind, name and function (offset dropped)."""
        sym = self.symbol.split("+", 1)[0] if self.symbol else None
        return (self.kind.value, self.name, sym)

    def describe(self) -> str:
        if self.kind is OwnerKind.UNOWNED:
            return f"{self.address:#x} (unowned: in no kernel text, listed module or BPF program)"
        if self.kind is OwnerKind.MODULE:
            sig = ("signed" if self.signed else "UNSIGNED") + (", trusted" if self.trusted
                                                              else "")
            return f"{self.symbol or hex(self.address)} (module {self.name}, {sig})"
        if self.kind is OwnerKind.BPF:
            return f"{self.symbol or hex(self.address)} (BPF program {self.name})"
        return f"{self.symbol or hex(self.address)} (kernel)"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "name": self.name, "symbol": self.symbol,
                "address": hex_addr(self.address), "signed": self.signed,
                "trusted": self.trusted}


class Trust(enum.StrEnum):
    """What an owner makes of a runtime patch (issue 16 §6)."""

    #: A kernel function or a BPF program: `kernel_patched`, as any tracer.
    KERNEL = "kernel"
    #: A listed module the kernel accepted the signature of, or one the operator
    #: trusts: `kernel_patched` with the module named, severity warning.
    MODULE = "module"
    #: An unsigned, untrusted module, or nobody: tampering.
    TAMPER = "tamper"


def judge(owner: Owner) -> Trust:
    """The policy. Unowned code is tampering whatever the operator trusts."""
    if owner.kind in (OwnerKind.KERNEL, OwnerKind.BPF):
        return Trust.KERNEL
    if owner.kind is OwnerKind.MODULE and (owner.signed is True or owner.trusted):
        return Trust.MODULE
    return Trust.TAMPER


@dataclass
class OwnerLookup:
    """Owner of run-time kernel addresses, for one check (the lists are one reading)."""

    #: [start, end) of the running kernel's `.text` (run-time addresses).
    text_start: int
    text_end: int
    #: Names a *link-time* `.text` address (the profile's `symbolize`).
    symbolize: Callable[[int], str | None]
    slide: int
    modules: ModuleList | None = None
    #: Reads a listed module's symbols (None: cannot); called at most once per module.
    module_symbols: Callable[[ModuleInfo], ModuleSymbols | None] | None = None
    bpf: Sequence[BpfProgram] = ()
    trusted: frozenset[str] = frozenset()
    _syms: dict[str, ModuleSymbols | None] = field(default_factory=dict, init=False,
                                                   repr=False)

    def in_text(self, addr: int) -> bool:
        return self.text_start <= addr < self.text_end

    def owner(self, addr: int) -> Owner:
        if self.in_text(addr):
            return Owner(OwnerKind.KERNEL, addr, "vmlinux", self.symbolize(addr - self.slide))
        hit = self.modules.owner(addr) if self.modules is not None else None
        if hit is not None:
            mod = hit[0]
            sym = None
            if self.module_symbols is not None:
                if mod.name not in self._syms and len(self._syms) < 1024:
                    self._syms[mod.name] = self.module_symbols(mod)
                ms = self._syms.get(mod.name)
                sym = ms.symbolize(addr) if ms is not None else None
            return Owner(OwnerKind.MODULE, addr, mod.name, sym or f"{addr:#x} [{mod.name}]",
                         mod.sig_ok, mod.name in self.trusted)
        for p in self.bpf:
            if p.start <= addr < p.end:
                off = addr - p.start
                return Owner(OwnerKind.BPF, addr, p.name,
                             (f"prog id {p.id}" if p.id is not None else p.name)
                             + (f"+{off:#x}" if off else ""))
        return Owner(OwnerKind.UNOWNED, addr)

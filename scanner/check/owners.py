"""Who owns a kernel address: a kernel function, a listed module, a BPF program, or nobody.

One lookup (`OwnerLookup`) for every check that must say whose code an address is:
patch attribution (`scanner.check.attribution`), pointer tables
(`scanner.check.pointers`, through `describe`) and executable-memory accounting
(`scanner.check.execmem`, through the page-rounded `claims`, which add the run-time
owners the kernel lists: ftrace trampolines — held to start with the kernel's own
ftrace caller —, kprobe slot pages, BPF images and prog packs).
`OwnerLookup.owner(addr)` answers with an `Owner`:

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
kernel" for what cross-checks what. Pure but for the bounded reads of module symbol
tables and trampoline prefixes through `reader`: the lists come in already read.
"""

from __future__ import annotations

import bisect
import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kscan.addresses import hex_addr
from scanner.check.kernel_lists import (
    BpfProgram,
    KernelReader,
    ModuleInfo,
    ModuleList,
    ModuleSymbols,
    read_module_symbols,
)
from scanner.check.kernel_lists.exec_owners import ExecOwner, ExecOwners
from scanner.check.patching import ReadVA
from scanner.image.kernel_profile import KernelProfile

__all__ = ["PAGE", "TRAMPOLINE_PREFIX", "Claim", "Owner", "OwnerKind", "OwnerLookup",
           "Trust", "judge"]

PAGE = 4096
#: Bytes of the ftrace caller an ftrace trampoline must start with.
TRAMPOLINE_PREFIX = 32


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


@dataclass(frozen=True)
class Claim:
    """A page-rounded range of executable kernel memory and its owner's kind and name."""

    base: int
    end: int
    kind: str
    name: str


@dataclass
class OwnerLookup:
    """Every owner of kernel code kscan knows for one check (the lists are one reading):
    the image's text, listed modules, BPF images and — for executable-memory accounting
    (`scanner.check.execmem`) — the run-time owners the kernel's lists claim
    (`ExecOwners`: ftrace trampolines, kprobe slot pages, BPF images and packs).

    `owner(addr)` → `Owner` (patch attribution); `describe(addr)` → one line (pointer
    tables); `claim_at` / `pack_at` (page accounting)."""

    profile: KernelProfile
    slide: int
    #: [start, end) of the running kernel's `.text` (run-time addresses).
    text: tuple[int, int]
    modules: ModuleList | None = None
    #: Reads guest memory (module symbols, trampoline prefixes); None: names only.
    reader: ReadVA | None = None
    #: Reads a listed module's symbols (default: through `reader`); at most once each.
    module_symbols: Callable[[ModuleInfo], ModuleSymbols | None] | None = None
    #: BPF JIT images (default: the `bpf` claims of `exec_owners`).
    bpf: Sequence[BpfProgram] = ()
    trusted: frozenset[str] = frozenset()
    exec_owners: ExecOwners | None = None
    claims: list[Claim] = field(default_factory=list, init=False)
    packs: list[ExecOwner] = field(default_factory=list, init=False)
    #: Claims rejected (forged or stale list entries).
    rejected: list[str] = field(default_factory=list, init=False)
    _syms: dict[int, ModuleSymbols | None] = field(default_factory=dict, init=False,
                                                   repr=False)

    def __post_init__(self) -> None:
        claims = [Claim(_down(self.text[0]), _up(self.text[1]), "kernel_text", "kernel")]
        for mod in self.modules or ():
            for area in mod.text:
                claims.append(Claim(_down(area.base), _up(area.end), "module", mod.name))
        owners = self.exec_owners.owners if self.exec_owners is not None else ()
        prefixes = self._caller_prefixes() if any(
            o.kind == "ftrace_trampoline" for o in owners) else set()
        for o in owners:
            if o.kind == "bpf_pack":
                self.packs.append(o)
                continue
            if o.kind == "ftrace_trampoline":
                got = (self.reader(o.base, TRAMPOLINE_PREFIX) if self.reader is not None
                       else None)
                if got is None or got not in prefixes:
                    self.rejected.append(f"{o.name}: trampoline {o.base:#x} does not start "
                                         "with the kernel's ftrace caller: not a trampoline")
                    continue
            claims.append(Claim(_down(o.base), _up(o.end), o.kind, o.name))
        claims.sort(key=lambda c: (c.base, c.end))
        self.claims = claims
        self.packs.sort(key=lambda p: p.base)
        if not self.bpf:
            self.bpf = tuple(BpfProgram(o.base, o.end, o.name) for o in owners
                             if o.kind == "bpf")

    @classmethod
    def build(cls, profile: KernelProfile, slide: int, text: tuple[int, int],
              modules: ModuleList | None, owners: ExecOwners,
              read_va: ReadVA | None) -> OwnerLookup:
        """The lookup for executable-memory accounting and pointer tables."""
        return cls(profile, slide, text, modules, read_va, exec_owners=owners)

    def _caller_prefixes(self) -> set[bytes]:
        out: set[bytes] = set()
        if self.reader is None:
            return out
        for name in ("ftrace_regs_caller", "ftrace_caller"):
            at = self.profile.data_symbol(name)
            if at is None and self.profile.kallsyms is not None:
                at = self.profile.kallsyms.lookup(name)
            if at is not None:
                b = self.reader(at + self.slide, TRAMPOLINE_PREFIX)
                if b is not None:
                    out.add(b)
        return out

    # -- owners of addresses ------------------------------------------------------------
    def in_text(self, addr: int) -> bool:
        return self.text[0] <= addr < self.text[1]

    def _module_syms(self, mod: ModuleInfo) -> ModuleSymbols | None:
        if self.module_symbols is None and self.reader is None:
            return None     # a stored lookup (the guest memory is gone): names only
        if mod.address not in self._syms and len(self._syms) < 1024:
            got = None
            if self.module_symbols is not None:
                got = self.module_symbols(mod)
            elif self.reader is not None and self.profile.layouts is not None:
                got = read_module_symbols(KernelReader(self.reader, budget=4 << 20),
                                          self.profile.layouts, mod)
            self._syms[mod.address] = got
        return self._syms.get(mod.address)

    def owner(self, addr: int) -> Owner:
        if self.in_text(addr):
            return Owner(OwnerKind.KERNEL, addr, "vmlinux",
                         self.profile.symbolize(addr - self.slide))
        hit = self.modules.owner(addr) if self.modules is not None else None
        if hit is not None:
            mod = hit[0]
            ms = self._module_syms(mod)
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

    def describe(self, addr: int) -> str:
        """Who owns `addr`, in one line: `symbol+off` in the kernel, `module NAME
        (func+off)`, `bpf NAME`, an ftrace trampoline or kprobe slot page, kernel data,
        or "unowned memory"."""
        c = self.claim_at(addr)
        if c is not None:
            if c.kind == "kernel_text":
                return self.profile.symbolize(addr - self.slide) or f"kernel text {addr:#x}"
            if c.kind == "module":
                o = self.owner(addr)
                sym = (o.symbol.rsplit(" [", 1)[0] if o.kind is OwnerKind.MODULE and o.symbol
                       and not o.symbol.startswith("0x") else None)
                return f"module {c.name} ({sym})" if sym else f"module {c.name}"
            if c.kind == "bpf":
                return f"bpf {c.name}"
            return f"{c.kind.replace('_', ' ')} ({c.name})"
        if self.text[0] <= addr < self._image_end():
            # Kernel data (rodata, data, bss): a data symbol, not code.
            sym = self.profile.symbolize(addr - self.slide)
            if sym is None and self.profile.kallsyms is not None:
                ks = self.profile.kallsyms
                i = ks.index_at_or_below(addr - self.slide)
                if i >= 0:
                    sym = ks.symbolize(addr - self.slide)
            if sym is not None:
                return f"kernel data {sym}"
        if self.modules is not None:
            hit = self.modules.owner(addr)
            if hit is not None:
                return f"module {hit[0].name} ({hit[1].kind})"
        if self.pack_at(addr) is not None:
            return "BPF prog pack (no program there)"
        return "unowned memory"

    def _image_end(self) -> int:
        """Where the kernel image's data ends (`_end`, run-time VA): past it nothing is
        kernel data, however near (a module, with KASLR, can sit a few MB above)."""
        ks = self.profile.kallsyms
        end = ks.lookup("_end") if ks is not None else None
        return self.text[1] if end is None else end + self.slide

    # -- executable-memory claims -------------------------------------------------------
    def claim_at(self, addr: int) -> Claim | None:
        """The (first) claim holding `addr`. Claims of a sane kernel do not overlap; a
        hostile one's may: look back over the few that could still cover it."""
        k = bisect.bisect_right(self.claims, addr, key=lambda c: c.base) - 1
        for c in reversed(self.claims[max(0, k - 16):k + 1]):
            if c.base <= addr < c.end:
                return c
        return None

    def next_claim_base(self, addr: int) -> int | None:
        k = bisect.bisect_right(self.claims, addr, key=lambda c: c.base)
        return self.claims[k].base if k < len(self.claims) else None

    def pack_at(self, addr: int) -> ExecOwner | None:
        k = bisect.bisect_right(self.packs, addr, key=lambda p: p.base) - 1
        if k >= 0 and self.packs[k].base <= addr < self.packs[k].end:
            return self.packs[k]
        return None


def _down(a: int) -> int:
    return a & ~(PAGE - 1)


def _up(a: int) -> int:
    return (a + PAGE - 1) & ~(PAGE - 1)

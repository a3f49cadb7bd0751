"""Who patched the kernel: each verified run-time patch site attributed to its owner.

`scanner.check.patching` verifies *how* `.text` was patched; this module says *who* did
it and where execution now goes (issue 16 §3), from the kernel's own bookkeeping in
guest memory (`scanner.check.kernel_lists`):

* an ftrace site calling an allocated trampoline → the `ftrace_ops` whose `trampoline`
  it is (cross-checked: the ops pointer stored at the trampoline's end must be that
  ops, and the ops must be on `ftrace_ops_list` and trace the site);
* an ftrace site calling `ftrace_caller` / `ftrace_regs_caller` → every ops on
  `ftrace_ops_list` whose filter covers the site;
* an ops → its `func` (`saved_func` behind ftrace's own wrappers) and `flags`
  (IPMODIFY: execution may be redirected); `kprobe_ftrace_handler` (kprobes on ftrace)
  → the kprobes registered at the site, through their handlers;
* a kprobe `int3` or an optprobe `jmp` → the `struct kprobe` in `kprobe_table` whose
  `addr` is the site (members of an aggregate probe included) → its handlers;
* `ftrace_call` / `ftrace_graph_call` inside ftrace_caller → the kernel function called;
* `call_direct_funcs` (the direct-call ops, when other ops trace the function too) →
  the function's direct target (6.12: the ops' `direct_call`; 6.1: its
  `direct_functions` entry), owned as below;
* an ftrace direct call (the verifier matched the site's target to `direct_functions`)
  → a BPF trampoline listed on `bpf_kallsyms` (`bpf_trampoline_<key>`, called at its
  start) is decoded (`scanner.check.direct_calls`) and each `call` in it owned: the
  BPF programs whose JIT images it calls (at least one), kernel text (the trampoline's
  helpers) left out, anything else (a module, nobody) an owner too; any other target
  is owned as itself (a module's `register_ftrace_direct` trampoline → the module).

Each handler's owner comes from `scanner.check.owners`. A site with no handler found
(no ops covers it, no kprobe is registered there, a trampoline of no listed ops) is
**unowned**. `judge` turns owners into the policy: kernel and BPF owners are the kernel
patching itself; a module needs its signature accepted or the operator's trust; unowned
is tampering. Pure: reads through a `ReadVA`, no QMP, no database.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from scanner.check.direct_calls import TRAMPOLINE_PREFIX, direct_lookup, trampoline_calls
from scanner.check.kernel_lists import (
    NO_DIRECT_ENTRY,
    BpfProgram,
    FtraceOps,
    KernelReader,
    KprobeTable,
    OpsList,
    ftrace_off,
    kprobes_off,
    modules_off,
    read_bpf_programs,
    read_ftrace_ops,
    read_kprobes,
    read_module_symbols,
    read_modules,
)
from scanner.check.owners import Owner, OwnerKind, OwnerLookup, Trust, judge
from scanner.check.patching import ReadVA, VerifiedPatch
from scanner.image.kernel_profile import KernelProfile

__all__ = ["Attribution", "Hook", "OwnerSet", "SiteOwners", "attribute", "attribution_off"]

#: Forms of an ftrace `__mcount_loc` site that call into ftrace's callers.
_CALLER_FORMS = frozenset({"call ftrace_caller", "call ftrace_regs_caller"})
_TRAMP_FORM = "call allocated trampoline"
#: An ftrace direct call the verifier matched against `direct_functions`.
_DIRECT_CALL = "call direct"
#: Forms whose target is a kernel function called directly (ftrace_call, graph call).
_DIRECT_FORMS = frozenset({"call function", "jmp graph caller/stub"})
#: ftrace's own wrappers: the ops' real callback is in `saved_func`.
_WRAPPERS = ("ftrace_pid_func",)
_KPROBE_FTRACE = "kprobe_ftrace_handler"
#: ftrace's ops for direct calls on functions other ops trace too (kernel/trace/ftrace.c).
_DIRECT_FUNCS = "call_direct_funcs"
IPMODIFY_DEFAULT = 1 << 12
#: Read at most this much guest memory for one attribution.
BUDGET = 16 << 20


@dataclass(frozen=True)
class Hook:
    """One handler a patched site runs."""

    via: str                 #: "ftrace_ops", "kprobe", "call" or "direct"
    struct: int | None       #: the ftrace_ops / struct kprobe (run-time address)
    handler: int             #: run-time address of the handler
    ipmodify: bool           #: an ftrace ops that may redirect execution
    owner: Owner


_ORDER = (Trust.KERNEL, Trust.MODULE, Trust.TAMPER)


@dataclass(frozen=True)
class OwnerSet:
    """The distinct owners of a site's handlers (shared by the sites with the same
    handlers), the policy's verdict on them, and a signature for fingerprints."""

    owners: tuple[Owner, ...]
    trust: Trust
    sig: bytes

    @classmethod
    def of(cls, owners: Iterable[Owner]) -> OwnerSet:
        seen: dict[tuple[str, str, str | None], Owner] = {}
        for o in owners:
            seen.setdefault(o.key, o)
        got = tuple(seen.values())
        trust = max((judge(o) for o in got), key=_ORDER.index)
        return cls(got, trust, repr(sorted(seen)).encode())


@dataclass(frozen=True, slots=True)
class SiteOwners:
    site: int                #: link-time VA of the site
    mechanism: str
    #: The patched function (`symbol+0xoff` of the site): named for the sites the policy
    #: calls tampering, "" for the others (reports symbolize sites themselves).
    function: str
    hooks: tuple[Hook, ...]
    #: Why no owner was found (the site is then unowned).
    problem: str = ""
    #: The run-time address of the site (the unowned owner's address).
    runtime: int = 0
    group: OwnerSet | None = None

    def __post_init__(self) -> None:
        if self.group is None:
            object.__setattr__(self, "group", OwnerSet.of(
                [h.owner for h in self.hooks] if self.hooks
                else [Owner(OwnerKind.UNOWNED, self.runtime)]))

    @property
    def owners(self) -> tuple[Owner, ...]:
        assert self.group is not None
        return self.group.owners

    @property
    def trust(self) -> Trust:
        assert self.group is not None
        return self.group.trust

    @property
    def ipmodify(self) -> bool:
        return any(h.ipmodify for h in self.hooks)


@dataclass(frozen=True)
class Attribution:
    """The owners of one check's runtime patch sites."""

    sites: Mapping[int, SiteOwners] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    def of(self, site: int) -> SiteOwners | None:
        return self.sites.get(site)

    def tampering(self) -> list[SiteOwners]:
        return [s for s in self.sites.values() if s.trust is Trust.TAMPER]

    def owners(self) -> list[Owner]:
        """Distinct owners over all sites (module, unowned first)."""
        seen: dict[tuple[str, str, str | None], Owner] = {}
        for s in self.sites.values():
            for o in s.owners:
                seen.setdefault(o.key, o)
        rank = {OwnerKind.UNOWNED: 0, OwnerKind.MODULE: 1, OwnerKind.BPF: 2,
                OwnerKind.KERNEL: 3}
        return sorted(seen.values(), key=lambda o: (rank[o.kind], o.name, o.symbol or ""))


def attribution_off(profile: KernelProfile) -> str | None:
    """Why this kernel's patches cannot be attributed (one line), or None."""
    if profile.layouts_off:
        return profile.layouts_off
    for why in (modules_off(profile), ftrace_off(profile.layouts),
                kprobes_off(profile.layouts)):
        if why:
            return why
    for name in ("ftrace_ops_list", "ftrace_list_end", "kprobe_table"):
        if profile.data_symbol(name) is None:
            return f"no `{name}` in the kernel's kallsyms: attribution is off"
    return None


class _Attributor:
    def __init__(self, profile: KernelProfile, slide: int, read_va: ReadVA,
                 trusted: frozenset[str]) -> None:
        assert profile.layouts is not None
        self.layouts = profile.layouts
        self.slide = slide
        self.profile = profile
        self.mem = KernelReader(read_va, BUDGET)
        self.problems: list[str] = []
        mods_va = profile.data_symbol("modules")
        assert mods_va is not None
        ml = read_modules(self.mem, self.layouts, mods_va + slide)
        self.problems += ml.problems
        bpf: tuple[BpfProgram, ...] = ()
        whole = True
        bk = profile.data_symbol("bpf_kallsyms")
        if bk is not None:
            bpf, whole = read_bpf_programs(self.mem, self.layouts, bk + slide)
            if not whole:
                self.problems.append("bpf_kallsyms cannot be read in full")
        self.bpf = bpf
        self.bpf_note = f"bpf_kallsyms: {len(bpf)} images" + (
            "" if bk is None or whole else ", not read in full")
        text = profile.text
        self.lookup = OwnerLookup(
            profile, slide, (text.addr + slide, text.addr + text.size + slide), ml,
            module_symbols=lambda m: read_module_symbols(self.mem, self.layouts, m),
            bpf=bpf, trusted=trusted)
        self._ops: OpsList | None = None
        self._kprobes: KprobeTable | None = None
        self._owners: dict[int, Owner] = {}
        self._ops_hooks: dict[int, tuple[list[Hook], str]] = {}
        self._groups: dict[tuple[tuple[int | None, int], ...], OwnerSet] = {}
        self._special: frozenset[int] = frozenset()
        self._tramps: dict[int, tuple[FtraceOps | None, str]] = {}
        self._direct: dict[int, tuple[tuple[Hook, ...], str]] = {}
        self.direct = direct_lookup(profile, slide, read_va)
        #: id() of each hooks list cached in _ops_hooks → its owner set (None: not yet).
        self._shared: dict[int, OwnerSet | None] = {}
        self._default_key: tuple[int, ...] = ()
        self._covering: dict[tuple[int, ...], tuple[tuple[Hook, ...], str, OwnerSet]] = {}
        self.ipmodify = self.layouts.enums.get("FTRACE_OPS_FL_IPMODIFY", IPMODIFY_DEFAULT)

    def owner(self, addr: int) -> Owner:
        got = self._owners.get(addr)
        if got is None:
            got = self._owners[addr] = self.lookup.owner(addr)
        return got

    def sym(self, runtime: int) -> str:
        return self.profile.symbolize(runtime - self.slide) or f"{runtime:#x}"

    @property
    def ops(self) -> OpsList:
        if self._ops is None:
            head = self.profile.data_symbol("ftrace_ops_list")
            end = self.profile.data_symbol("ftrace_list_end")
            assert head is not None and end is not None
            self._ops = read_ftrace_ops(self.mem, self.layouts, head + self.slide,
                                        end + self.slide)
            self.problems += self._ops.problems
            # Which ops trace an ip depends on it only where some filter or notrace hash
            # names it; everywhere else it is the ops with no filter.
            special: set[int] = set()
            for o in self._ops.ops:
                special |= o.filter.ips or set()
                special |= o.notrace.ips or set()
            self._special = frozenset(special)
            self._default_key = tuple(o.address for o in self._ops.ops
                                      if o.filter.ips is None or not o.filter.complete)
        return self._ops

    @property
    def kprobes(self) -> KprobeTable:
        if self._kprobes is None:
            at = self.profile.data_symbol("kprobe_table")
            assert at is not None
            self._kprobes = read_kprobes(self.mem, self.layouts, at + self.slide)
            self.problems += self._kprobes.problems
        return self._kprobes

    def kprobe_hooks(self, ip: int) -> list[Hook]:
        return [Hook("kprobe", kp, h, False, self.owner(h))
                for p in self.kprobes.at(ip) for kp, h in p.handlers()]

    def ops_hooks(self, ops_addr: int, ip: int) -> tuple[list[Hook], str]:
        got = self._ops_hooks.get(ops_addr)
        if got is not None:
            return got
        hooks, why = self._ops_hooks_of(ops_addr, ip)
        if (not any(h.via in ("kprobe", "direct") for h in hooks)
                and not why.startswith(("kprobe", "direct"))):
            self._ops_hooks[ops_addr] = (hooks, why)   # the same for every site it traces
            self._shared[id(hooks)] = None             # (kept alive by _ops_hooks)
        return hooks, why

    def _ops_hooks_of(self, ops_addr: int, ip: int) -> tuple[list[Hook], str]:
        o = self.ops.by_address(ops_addr)
        if o is None:
            return [], f"ftrace_ops {ops_addr:#x} is not on ftrace_ops_list"
        func = o.func
        if self.sym(func).split("+", 1)[0] in _WRAPPERS and o.saved_func:
            func = o.saved_func
        if self.sym(func) == _DIRECT_FUNCS:
            # ftrace's direct-call ops, when the site is shared with other ops: it sends
            # execution to the ip's direct target (6.12: ops->direct_call; 6.1: the
            # direct_functions entry), owned like a site calling it directly.
            # No target: the callback does nothing for this ip (a complete hash without
            # an entry); an unknown one, or one nobody owns, is unowned code (never
            # hidden behind the other ops' owners).
            target, why = ((o.direct_call, "") if o.direct_call
                           else self.direct(ip) if self.direct is not None
                           else (None, "direct_functions cannot be read"))
            if target is None:
                return ([], "") if why == NO_DIRECT_ENTRY else (
                    [Hook("direct", o.address, 0, False, Owner(OwnerKind.UNOWNED, 0))],
                    f"direct-call ops: {why}")
            hooks, why = self.direct_hooks(target)
            if not hooks:
                hooks = [Hook("direct", o.address, target, False,
                              Owner(OwnerKind.UNOWNED, target))]
            return hooks, why and f"direct-call ops: {why}"
        if self.sym(func) == _KPROBE_FTRACE:
            hooks = self.kprobe_hooks(ip)
            return hooks, "" if hooks else ("kprobe ftrace ops covers the site but no "
                                            "kprobe is registered there")
        return [Hook("ftrace_ops", o.address, func, bool(o.flags & self.ipmodify),
                     self.owner(func))], ""

    def site(self, v: VerifiedPatch) -> SiteOwners | None:
        ip = v.site + self.slide
        func = ""     # named in `attribute` where the policy needs it (35,000 sites)
        hooks: list[Hook] = []
        why = ""
        if v.mechanism in ("kprobe", "optprobe"):
            hooks = self.kprobe_hooks(ip)
            if not hooks:
                why = "no registered kprobe at this address"
        elif v.mechanism != "ftrace":
            return None
        elif v.form in _DIRECT_FORMS and v.target is not None:
            t = v.target + self.slide     # a .text target: link-time VA
            hooks = [Hook("call", None, t, False, self.owner(t))]
        elif v.form == _DIRECT_CALL and v.target is not None:
            hooks, why = self.direct_hooks(v.target)   # outside .text: run-time VA
        elif v.form == _TRAMP_FORM and v.target is not None:
            hooks, why = self.trampoline_hooks(v.target, ip)
            if hooks and id(hooks) in self._shared:
                # the ops' cached hooks (the same for every site it traces): their group
                g = self._shared[id(hooks)]
                if g is None:
                    g = self._shared[id(hooks)] = self.group(hooks)
                return SiteOwners(v.site, v.mechanism, func, tuple(hooks), "", ip, g)
        elif v.form in _CALLER_FORMS:
            # Sites traced by the same ops share their hooks (35,000 under the function
            # tracer): cached by the covering ops, unless a hook depends on the site.
            ops = self.ops       # (read first: it sets the default key)
            key = (self._default_key if ip not in self._special
                   else tuple(o.address for o in ops.ops if o.covers(ip)))
            hit = self._covering.get(key)
            if hit is not None:
                return SiteOwners(v.site, v.mechanism, func, hit[0], hit[1], ip, hit[2])
            for o in self.ops.ops:
                if o.address in key:
                    got, w = self.ops_hooks(o.address, ip)
                    hooks += got
                    why = why or w
            if not hooks:
                why = why or "no ftrace_ops on ftrace_ops_list traces this function"
            elif all(a in self._ops_hooks for a in key):
                self._covering[key] = (tuple(hooks), why, self.group(hooks))
        else:
            return None   # the NOP, or text_poke_bp() from the baseline: no callee
        if (not hooks and v.mechanism == "ftrace" and v.form != _DIRECT_CALL
                and not self.ops.complete):
            why += f" ({'; '.join(self.ops.problems[:2])})"
        if not hooks and not self.kprobes.complete and v.mechanism != "ftrace":
            why += f" ({'; '.join(self.kprobes.problems[:2])})"
        return SiteOwners(v.site, v.mechanism, func, tuple(hooks), "" if hooks else why,
                          ip, self.group(hooks) if hooks else None)

    def direct_hooks(self, target: int) -> tuple[list[Hook], str]:
        """The owners of an ftrace direct-call target (run-time address), once each."""
        got = self._direct.get(target)
        if got is None:
            got = self._direct[target] = self._direct_hooks(target)
        return list(got[0]), got[1]

    def _direct_hooks(self, target: int) -> tuple[tuple[Hook, ...], str]:
        image = next((p for p in self.bpf if p.start <= target < p.end), None)
        if image is None:
            o = self.owner(target)
            if o.kind is OwnerKind.UNOWNED:
                near = ", ".join(f"{p.name} {p.start:#x}-{p.end:#x}" for p in sorted(
                    self.bpf, key=lambda p: abs(p.start - target))[:3])
                return (), (f"direct-call target {target:#x} is in no listed module or "
                            f"BPF trampoline ({self.bpf_note}" + (
                                f"; nearest {near}" if near else "") + ")")
            return (Hook("direct", None, target, False, o),), ""
        if not image.name.startswith(TRAMPOLINE_PREFIX) or image.start != target:
            return (), (f"direct call into BPF image {image.name!r} at "
                        f"+{target - image.start:#x}: not the start of a BPF trampoline")
        dec = trampoline_calls(self.mem.read, image.start, image.end)
        if dec.problem:
            return (), f"BPF trampoline {image.name}: {dec.problem}"
        hooks: list[Hook] = []
        progs = 0
        for c in dict.fromkeys(dec.calls):
            if self.lookup.in_text(c):
                continue       # __bpf_prog_enter/exit, the traced function, the thunk
            prog = next((p for p in self.bpf if p.start == c
                         and not p.name.startswith(("bpf_trampoline_", "bpf_dispatcher_"))),
                        None)
            if prog is not None:
                progs += 1
                hooks.append(Hook("direct", image.start, c, False, self.owner(c)))
            else:
                o = self.owner(c)
                hooks.append(Hook("direct", image.start, c, False,
                                  o if o.kind is not OwnerKind.BPF
                                  else Owner(OwnerKind.UNOWNED, c)))
        if not progs:
            return (), f"BPF trampoline {image.name} calls no BPF program"
        return tuple(hooks), ""

    def group(self, hooks: list[Hook]) -> OwnerSet:
        key = tuple((h.struct, h.handler) for h in hooks)
        got = self._groups.get(key)
        if got is None:
            got = self._groups[key] = OwnerSet.of(h.owner for h in hooks)
        return got

    def trampoline_hooks(self, tramp: int, ip: int) -> tuple[list[Hook], str]:
        got = self._tramps.get(tramp)
        if got is None:
            got = self._tramps[tramp] = self._tramp_ops(tramp)
        o, why = got
        if o is None:
            return [], why
        if not o.covers(ip):
            return [], f"ftrace_ops {o.address:#x} does not trace this function"
        return self.ops_hooks(o.address, ip)

    def _tramp_ops(self, tramp: int) -> tuple[FtraceOps | None, str]:
        """The ops a trampoline belongs to, cross-checked (once per trampoline)."""
        mine = [o for o in self.ops.ops if o.trampoline == tramp]
        if len(mine) != 1:
            return None, (f"trampoline {tramp:#x} belongs to no ftrace_ops on "
                          "ftrace_ops_list" if not mine
                          else f"trampoline {tramp:#x} claimed by {len(mine)} ops")
        o = mine[0]
        if not 8 < o.trampoline_size <= 1 << 16:
            return None, f"ftrace_ops {o.address:#x}: trampoline size {o.trampoline_size}"
        stored = self.mem.u64(tramp + o.trampoline_size - 8)
        if stored != o.address:
            return None, (f"trampoline {tramp:#x} stores ops pointer "
                          f"{stored if stored is None else hex(stored)}, not its ops "
                          f"{o.address:#x}")
        return o, ""


def attribute(profile: KernelProfile, slide: int, read_va: ReadVA,
              patches: Iterable[VerifiedPatch], trusted: frozenset[str] = frozenset()
              ) -> Attribution:
    """The owners of the run-time patch sites among `patches` (`attribution_off` must
    be None). Sites of mechanisms that call no one (jump labels, static calls, boot-
    time patching) and NOP forms are left out."""
    a = _Attributor(profile, slide, read_va, trusted)
    out: dict[int, SiteOwners] = {}
    for v in patches:
        s = a.site(v)
        if s is not None:
            if s.trust is Trust.TAMPER:
                s = dataclasses.replace(s, function=a.sym(s.runtime))
            out[v.site] = s
    return Attribution(out, tuple(dict.fromkeys(a.problems))[:32])

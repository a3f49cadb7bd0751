"""Owner attribution of runtime patches on synthetic kernel memory laid out with the real
kernels' BTF layouts: the ftrace ops list and its filter hashes, the kprobe table with
aggregate probes, the owner lookup (kernel, listed module, BPF, unowned), the policy, and
`attribute` end to end — hostile lists included."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from scanner.check.attribution import attribute
from scanner.check.kernel_lists import (
    BpfProgram,
    KernelReader,
    read_ftrace_ops,
    read_kprobes,
    read_modules,
)
from scanner.check.owners import Owner, OwnerKind, OwnerLookup, Trust, judge
from scanner.check.patch_report import PatchReport
from scanner.check.patching import VerifiedPatch
from scanner.check.verify import owner_findings
from scanner.image.layouts import Layouts
from tests.test_kernel_lists import MODULES, FakeKernel, build

SLIDE = 0x1000_0000
IPM = 1 << 12                         # FTRACE_OPS_FL_IPMODIFY (6.1, 6.12)
TEXT = 0xFFFF_FFFF_8100_0000          # link-time .text
TEXT_SIZE = 0x100_0000
OPS_LIST = 0xFFFF_FFFF_82C0_0000      # link-time `ftrace_ops_list` (a pointer)
LIST_END = 0xFFFF_FFFF_82C0_0100      # link-time `ftrace_list_end`
KPROBE_TABLE = 0xFFFF_FFFF_82C1_0000
DATA = 0xFFFF_8880_0100_0000          # where ops, hashes, kprobes live (direct map)
FUNCS = {"function_trace_call": TEXT + 0x1000, "kprobe_ftrace_handler": TEXT + 0x2000,
         "kprobe_dispatcher": TEXT + 0x3000, "aggr_pre_handler": TEXT + 0x4000,
         "__x64_sys_getdents64": TEXT + 0x10000, "__x64_sys_sync": TEXT + 0x20000,
         "vfs_read": TEXT + 0x30000, "call_direct_funcs": TEXT + 0x5000}
MOD_TEXT = 0xFFFF_FFFF_C100_0000     # text of the first module `build` lays out
HIDDEN = 0xFFFF_FFFF_C800_0000       # module space no listed module holds


def rt(link: int) -> int:
    return link + SLIDE


def put(k: FakeKernel, lay: Layouts, struct: str, at: int, **values: int) -> None:
    for path, v in values.items():
        f = lay[struct][path]
        k.write(at + f.offset, v.to_bytes(f.size, "little"))


class Mem:
    """A FakeKernel with a bump allocator."""

    def __init__(self, k: FakeKernel, lay: Layouts) -> None:
        self.k, self.lay, self.next = k, lay, DATA
        k.alloc(DATA, 0x10_0000)
        k.alloc(rt(OPS_LIST), 0x200)
        k.alloc(rt(KPROBE_TABLE), 64 * 8)

    def new(self, size: int) -> int:
        at = self.next
        self.next += (size + 63) // 64 * 64
        return at

    def hash(self, ips: list[int]) -> int:
        """A ftrace_hash with 2^2 buckets holding `ips` (count 0: the empty hash)."""
        lay = self.lay
        h = self.new(lay["ftrace_hash"].size)
        buckets = self.new(4 * 8)
        e = lay["ftrace_func_entry"]
        heads = [0] * 4
        for ip in ips:
            ent = self.new(e.size)
            node = ent + e["hlist"].offset
            b = ip & 3
            put(self.k, lay, "ftrace_func_entry", ent, ip=ip)
            self.k.u64(node, heads[b])
            heads[b] = node
        for i, n in enumerate(heads):
            self.k.u64(buckets + 8 * i, n)
        put(self.k, lay, "ftrace_hash", h, size_bits=2, buckets=buckets, count=len(ips))
        return h

    def ops(self, func: int, flags: int = 0, ips: list[int] | None = None,
            notrace: list[int] | None = None, trampoline: int = 0) -> int:
        lay = self.lay
        o = self.new(lay["ftrace_ops"].size)
        hh = self.new(lay["ftrace_ops_hash"].size)
        put(self.k, lay, "ftrace_ops_hash", hh, filter_hash=self.hash(ips or []),
            notrace_hash=self.hash(notrace or []))
        put(self.k, lay, "ftrace_ops", o, func=func, flags=flags, func_hash=hh)
        if trampoline:
            size = 0x100
            put(self.k, lay, "ftrace_ops", o, trampoline=trampoline, trampoline_size=size)
            self.k.alloc(trampoline, size)
            self.k.u64(trampoline + size - 8, o)
        return o

    def link_ops(self, ops: list[int]) -> None:
        nxt = self.lay["ftrace_ops"]["next"].offset
        chain = [*ops, rt(LIST_END)]
        self.k.u64(rt(OPS_LIST), chain[0])
        for a, b in itertools.pairwise(chain):
            self.k.u64(a + nxt, b)

    def kprobe(self, addr: int, pre: int, post: int = 0, children: tuple[int, ...] = ()
               ) -> int:
        lay = self.lay
        kp = lay["kprobe"]
        at = self.new(kp.size)
        put(self.k, lay, "kprobe", at, addr=addr, pre_handler=pre, post_handler=post)
        head = at + kp["list"].offset
        ring = [head, *(c + kp["list"].offset for c in children)]
        for i, n in enumerate(ring):
            self.k.u64(n, ring[(i + 1) % len(ring)])
            self.k.u64(n + 8, ring[i - 1])
        return at

    def table(self, probes: list[int]) -> None:
        hl = self.lay["kprobe"]["hlist"].offset
        heads: dict[int, list[int]] = {}
        for p in probes:
            heads.setdefault(len(heads) % 64, []).append(p)
        for b, ps in heads.items():
            nodes = [p + hl for p in ps]
            self.k.u64(rt(KPROBE_TABLE) + 8 * b, nodes[0])
            for a, n in zip(nodes, [*nodes[1:], 0], strict=True):
                self.k.u64(a, n)


MODS = [{"name": "kscan_ftrace_hook", "sig_ok": False},
        {"name": "signed_tracer", "sig_ok": True}]


def setup(which: str = "6.1") -> Mem:
    k, lay = build(which, MODS)
    # `build` lays the list head out at MODULES: the fake profile's `modules` is there.
    return Mem(k, lay)


class FakeProfile:
    """What `attribute` reads of a KernelProfile."""

    def __init__(self, lay: Layouts) -> None:
        self.layouts = lay
        self.layouts_off = None
        self.text = dataclasses.make_dataclass("T", ["addr", "size"])(TEXT, TEXT_SIZE)
        self.syms = {"ftrace_ops_list": OPS_LIST, "ftrace_list_end": LIST_END,
                     "kprobe_table": KPROBE_TABLE, "modules": MODULES - SLIDE}
        self.names = sorted((a, n) for n, a in FUNCS.items())
        self.kallsyms = None

    def data_symbol(self, name: str) -> int | None:
        return self.syms.get(name)

    def symbolize(self, addr: int) -> str | None:
        best = None
        for a, n in self.names:
            if a <= addr:
                best = n if a == addr else f"{n}+{addr - a:#x}"
        return best


def site(mech: str, func: str, form: str, target: int | None = None) -> VerifiedPatch:
    at = FUNCS[func]
    return VerifiedPatch(mech, at, at, at + 5, b"\0" * 5, b"\0" * 5, form, target)


# -- readers -----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_ops_list_with_filters(which: str) -> None:
    m = setup(which)
    ip = rt(FUNCS["__x64_sys_getdents64"])
    tracer = m.ops(rt(FUNCS["function_trace_call"]), notrace=[rt(FUNCS["vfs_read"])])
    hook = m.ops(MOD_TEXT + 0x10, flags=IPM, ips=[ip])
    m.link_ops([tracer, hook])
    got = read_ftrace_ops(KernelReader(m.k.read), m.lay, rt(OPS_LIST), rt(LIST_END))
    assert got.complete and [o.address for o in got.ops] == [tracer, hook]
    t, h = got.ops
    assert t.filter.ips is None and t.covers(ip) and not t.covers(rt(FUNCS["vfs_read"]))
    assert h.filter.ips == {ip} and h.covers(ip) and not h.covers(ip + 0x10)
    assert h.func == MOD_TEXT + 0x10 and h.flags == IPM


def test_hostile_ops_list_and_hashes_are_bounded() -> None:
    m = setup()
    a = m.ops(1)
    b = m.ops(2)
    m.link_ops([a, b])
    m.k.u64(b + m.lay["ftrace_ops"]["next"].offset, a)          # a cycle
    got = read_ftrace_ops(KernelReader(m.k.read), m.lay, rt(OPS_LIST), rt(LIST_END))
    assert not got.complete and "cycle" in got.problems[0] and len(got.ops) == 2
    # a hash chain that loops on itself, and a count it does not hold
    c = m.ops(3, ips=[0xFFFF_FFFF_9000_0000])
    hh = int.from_bytes(m.k.read(c + m.lay["ftrace_ops"]["func_hash"].offset, 8) or b"",
                        "little")
    fh = int.from_bytes(m.k.read(hh + m.lay["ftrace_ops_hash"]["filter_hash"].offset, 8)
                        or b"", "little")
    buckets = int.from_bytes(m.k.read(fh + m.lay["ftrace_hash"]["buckets"].offset, 8)
                             or b"", "little")
    node = int.from_bytes(m.k.read(buckets, 8) or b"", "little")
    m.k.u64(node, node)
    m.link_ops([c])
    got = read_ftrace_ops(KernelReader(m.k.read), m.lay, rt(OPS_LIST), rt(LIST_END))
    assert not got.complete and not got.ops[0].filter.complete
    # size_bits out of bounds: not read; taken to cover everything (fail closed: its
    # callback is attributed to every ftrace site, never hidden from one)
    put(m.k, m.lay, "ftrace_hash", fh, size_bits=40)
    got = read_ftrace_ops(KernelReader(m.k.read), m.lay, rt(OPS_LIST), rt(LIST_END))
    assert not got.complete and not got.ops[0].filter.complete
    assert got.ops[0].covers(0xFFFF_FFFF_9000_0000) and got.ops[0].covers(0xFFFF_FFFF_9100_0000)


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_kprobe_table_with_an_aggregate(which: str) -> None:
    m = setup(which)
    at = rt(FUNCS["vfs_read"]) + 4
    c1 = m.kprobe(at, MOD_TEXT + 0x40)
    c2 = m.kprobe(at, rt(FUNCS["kprobe_dispatcher"]), post=MOD_TEXT + 0x80)
    aggr = m.kprobe(at, rt(FUNCS["aggr_pre_handler"]), children=(c1, c2))
    plain = m.kprobe(rt(FUNCS["__x64_sys_sync"]), rt(FUNCS["kprobe_dispatcher"]))
    m.table([aggr, plain])
    got = read_kprobes(KernelReader(m.k.read), m.lay, rt(KPROBE_TABLE))
    assert got.complete, got.problems
    (p,) = got.at(at)
    assert {h for _, h in p.handlers()} == {rt(FUNCS["aggr_pre_handler"]), MOD_TEXT + 0x40,
                                            rt(FUNCS["kprobe_dispatcher"]), MOD_TEXT + 0x80}
    assert got.at(rt(FUNCS["__x64_sys_sync"]))[0].children == ()
    # a chain looping back on itself stops, and says so
    hl = m.lay["kprobe"]["hlist"].offset
    m.k.u64(plain + hl, aggr + hl)
    m.k.u64(aggr + hl, plain + hl)
    got = read_kprobes(KernelReader(m.k.read), m.lay, rt(KPROBE_TABLE))
    assert not got.complete and len(got.probes) <= 4


# -- owner lookup and policy --------------------------------------------------------------

def lookup(m: Mem, trusted: frozenset[str] = frozenset()) -> OwnerLookup:
    ml = read_modules(KernelReader(m.k.read), m.lay, MODULES)
    prof = FakeProfile(m.lay)
    return OwnerLookup(prof, SLIDE, (rt(TEXT), rt(TEXT + TEXT_SIZE)), ml,  # type: ignore[arg-type]
                       bpf=(BpfProgram(0xFFFF_FFFF_A000_0000, 0xFFFF_FFFF_A000_0100,
                                       "bpf_prog_x", 42),), trusted=trusted)


def test_owner_of_each_kind() -> None:
    m = setup()
    lk = lookup(m)
    o = lk.owner(rt(FUNCS["function_trace_call"]) + 5)
    assert (o.kind, o.name, o.symbol) == (OwnerKind.KERNEL, "vmlinux",
                                          "function_trace_call+0x5")
    o = lk.owner(MOD_TEXT + 0x10)
    assert (o.kind, o.name, o.signed, o.trusted) == (OwnerKind.MODULE, "kscan_ftrace_hook",
                                                     False, False)
    assert judge(o) is Trust.TAMPER
    assert judge(lk.owner(0xFFFF_FFFF_C110_0000)) is Trust.MODULE      # the signed one
    o = lk.owner(0xFFFF_FFFF_A000_0010)
    assert (o.kind, o.name, o.symbol) == (OwnerKind.BPF, "bpf_prog_x", "prog id 42+0x10")
    assert judge(o) is Trust.KERNEL
    o = lk.owner(HIDDEN)
    assert o.kind is OwnerKind.UNOWNED and judge(o) is Trust.TAMPER
    assert o.to_json() == {"kind": "unowned", "name": "", "symbol": None,
                           "address": hex(HIDDEN), "signed": None, "trusted": False}


def test_trust_covers_a_listed_module_never_unowned_code() -> None:
    m = setup()
    lk = lookup(m, frozenset({"kscan_ftrace_hook", "kscan_hide"}))
    assert judge(lk.owner(MOD_TEXT + 0x10)) is Trust.MODULE
    # kscan_hide unlinked itself: its code is in no listed module, trusted or not
    assert judge(lk.owner(HIDDEN)) is Trust.TAMPER
    # a forged owner claiming trust is judged by kind first
    assert judge(Owner(OwnerKind.UNOWNED, HIDDEN, "kscan_hide", trusted=True)) is Trust.TAMPER


# -- attribution end to end ----------------------------------------------------------------

def scenario(m: Mem) -> dict[str, Any]:
    """The function tracer on everything, a module's IPMODIFY hook on getdents64 through
    its trampoline, a kprobe on ftrace at sys_sync from tracefs, an int3 kprobe in
    vfs_read from a module, and a hidden module's hook on ftrace_regs_caller."""
    g = rt(FUNCS["__x64_sys_getdents64"])
    tramp = 0xFFFF_FFFF_C200_0000
    tracer = m.ops(rt(FUNCS["function_trace_call"]), notrace=[g])
    hook = m.ops(MOD_TEXT + 0x10, flags=IPM, ips=[g], trampoline=tramp)
    kpops = m.ops(rt(FUNCS["kprobe_ftrace_handler"]), ips=[rt(FUNCS["__x64_sys_sync"])])
    m.link_ops([tracer, hook, kpops])
    m.table([m.kprobe(rt(FUNCS["__x64_sys_sync"]), rt(FUNCS["kprobe_dispatcher"])),
             m.kprobe(rt(FUNCS["vfs_read"]) + 4, MOD_TEXT + 0x40)])
    return {"tramp": tramp, "hook": hook, "tracer": tracer}


def test_attribute_each_mechanism() -> None:
    m = setup()
    sc = scenario(m)
    prof = FakeProfile(m.lay)
    vr = FUNCS["vfs_read"] + 4
    patches = [site("ftrace", "__x64_sys_getdents64", "call allocated trampoline",
                    sc["tramp"]),
               site("ftrace", "__x64_sys_sync", "call ftrace_regs_caller", TEXT),
               VerifiedPatch("kprobe", vr, vr, vr + 1, b"\x48", b"\xcc", "int3"),
               site("ftrace", "vfs_read", "call ftrace_caller", TEXT),
               site("jump_label", "vfs_read", "jmp target", TEXT)]
    a = attribute(prof, SLIDE, m.k.read, patches)   # type: ignore[arg-type]
    s = a.of(FUNCS["__x64_sys_getdents64"])
    assert s is not None and s.ipmodify and s.trust is Trust.TAMPER
    assert [(o.kind, o.name) for o in s.owners] == [(OwnerKind.MODULE, "kscan_ftrace_hook")]
    s = a.of(FUNCS["__x64_sys_sync"])      # tracer (all) + kprobe via ftrace from tracefs
    assert s is not None and s.trust is Trust.KERNEL
    assert {o.symbol for o in s.owners} == {"function_trace_call", "kprobe_dispatcher"}
    s = a.of(vr)
    assert s is not None and s.owners[0].name == "kscan_ftrace_hook" and s.hooks[0].via == \
        "kprobe"
    assert a.of(FUNCS["vfs_read"]) is not None   # the ftrace site
    assert len(a.sites) == 4                                       # no jump label owner
    # trusted: the same hook is the kernel's patching with the module named
    a = attribute(prof, SLIDE, m.k.read, patches, frozenset({"kscan_ftrace_hook"}))  # type: ignore[arg-type]
    assert not a.tampering()
    assert [o.name for o in a.owners()][:1] == ["kscan_ftrace_hook"]


def test_unexplained_sites_are_unowned() -> None:
    m = setup()
    sc = scenario(m)
    prof = FakeProfile(m.lay)
    g = FUNCS["__x64_sys_getdents64"]
    # the trampoline's stored ops pointer names an ops that is not the list's
    m.k.u64(sc["tramp"] + 0x100 - 8, sc["tracer"])
    # an int3 no kprobe explains; a trampoline of no ops; a call to ftrace_caller in a
    # function only a hidden module's unlisted ops would trace
    patches = [site("ftrace", "__x64_sys_getdents64", "call allocated trampoline",
                    sc["tramp"]),
               VerifiedPatch("kprobe", g + 8, g + 8, g + 9, b"\x48", b"\xcc", "int3"),
               site("ftrace", "vfs_read", "call allocated trampoline", 0xFFFF_FFFF_C300_0000)]
    a = attribute(prof, SLIDE, m.k.read, patches)    # type: ignore[arg-type]
    assert len(a.tampering()) == 3
    probs = {s.site: s.problem for s in a.tampering()}
    assert "stores ops pointer" in probs[g]
    assert probs[g + 8] == "no registered kprobe at this address"
    assert "belongs to no ftrace_ops" in probs[FUNCS["vfs_read"]]
    assert all(s.owners[0].kind is OwnerKind.UNOWNED for s in a.tampering())


def test_hidden_module_hook_is_unowned_and_a_finding() -> None:
    m = setup()
    g = rt(FUNCS["__x64_sys_getdents64"])
    hidden = m.ops(HIDDEN + 0x20, flags=IPM, ips=[g], trampoline=0xFFFF_FFFF_C200_0000)
    m.link_ops([hidden])
    prof = FakeProfile(m.lay)
    v = site("ftrace", "__x64_sys_getdents64", "call allocated trampoline",
             0xFFFF_FFFF_C200_0000)
    a = attribute(prof, SLIDE, m.k.read, [v], frozenset({"kscan_hide"}))  # type: ignore[arg-type]
    (s,) = a.tampering()
    assert s.owners[0].kind is OwnerKind.UNOWNED and s.owners[0].address == HIDDEN + 0x20
    rep = PatchReport((v,), (0,), prof.symbolize, a)
    (f,) = owner_findings(rep)
    assert f.kind == "patch_owner" and "__x64_sys_getdents64" in f.message
    assert "IPMODIFY" in f.message and f.detail["owner"]["kind"] == "unowned"
    doc = rep.to_json()
    assert doc["sites"][0]["owner"]["kind"] == "unowned"
    assert doc["owners"][0]["address"] == hex(HIDDEN + 0x20)


def test_owner_change_changes_the_fingerprint() -> None:
    m = setup()
    scenario(m)
    prof = FakeProfile(m.lay)
    v = site("ftrace", "__x64_sys_sync", "call ftrace_regs_caller", TEXT)
    a1 = attribute(prof, SLIDE, m.k.read, [v])    # type: ignore[arg-type]
    m.link_ops([m.ops(MOD_TEXT + 0x10, ips=[rt(FUNCS["__x64_sys_sync"])])])
    a2 = attribute(prof, SLIDE, m.k.read, [v])    # type: ignore[arg-type]
    r1 = PatchReport((v,), (0,), prof.symbolize, a1)
    r2 = PatchReport((v,), (0,), prof.symbolize, a2)
    assert r1.fingerprint() != r2.fingerprint()
    assert a2.of(v.site).owners[0].name == "kscan_ftrace_hook"   # type: ignore[union-attr]


# -- operator surface ----------------------------------------------------------------------

def test_trust_module_option_and_config(tmp_path: Any) -> None:
    import argparse

    from scanner.commands.cli import build_parser
    from scanner.commands.config import load_config, subparser
    from scanner.commands.options import module_name as _module_name

    assert _module_name("kscan-ftrace-hook") == "kscan_ftrace_hook"
    for bad in ("", "a b", "x" * 56, "../evil", "m\n"):
        with pytest.raises(argparse.ArgumentTypeError):
            _module_name(bad)
    args = build_parser().parse_args(["check", "--qmp", "s", "--trust-module", "a-b",
                                      "--trust-module", "c"])
    assert args.trust_module == ["a_b", "c"]
    conf = tmp_path / "k.toml"
    conf.write_text('trust_module = ["my-tracer"]\n')
    run_parser = subparser(build_parser(), "run")
    assert load_config(conf, run_parser)["trust_module"] == ["my_tracer"]


def test_kernel_patched_by_a_module_is_a_warning() -> None:
    from scanner.run.events import severity

    mod = Owner(OwnerKind.MODULE, MOD_TEXT, "signed_tracer", "f [signed_tracer]", True)
    kern = Owner(OwnerKind.KERNEL, rt(TEXT), "vmlinux", "function_trace_call")
    assert severity("kernel_patched", {"owners": [kern.to_json(), mod.to_json()]}) == "warning"
    assert severity("kernel_patched", {"owners": [kern.to_json()]}) == "notice"
    assert severity("kernel_patched", {}) == "notice"


def test_an_unreadable_filter_does_not_hide_a_hook() -> None:
    """A module's ops whose filter hash cannot be read (a looping bucket) beside the
    function tracer: its callback is attributed to the traced site, not left out."""
    m = setup()
    tracer = m.ops(rt(FUNCS["function_trace_call"]))
    hook = m.ops(MOD_TEXT + 0x10, flags=IPM, ips=[rt(FUNCS["vfs_read"])])
    lay = m.lay
    hh = int.from_bytes(m.k.read(hook + lay["ftrace_ops"]["func_hash"].offset, 8) or b"",
                        "little")
    fh = int.from_bytes(m.k.read(hh + lay["ftrace_ops_hash"]["filter_hash"].offset, 8)
                        or b"", "little")
    put(m.k, lay, "ftrace_hash", fh, buckets=0x10)          # not a kernel pointer
    m.link_ops([tracer, hook])
    v = site("ftrace", "__x64_sys_getdents64", "call ftrace_caller", TEXT)
    a = attribute(FakeProfile(lay), SLIDE, m.k.read, [v])   # type: ignore[arg-type]
    s = a.of(v.site)
    assert s is not None and s.trust is Trust.TAMPER
    assert {o.name for o in s.owners} == {"vmlinux", "kscan_ftrace_hook"}
    assert any("hash could not be read" in p for p in a.problems)


def test_owner_events_match_the_exact_schema() -> None:
    """`kernel_patched` with owners and a `tamper` with a `patch_owner` finding, as the
    attribution builds them, validate against kscan/contrib/events.schema.json (exact)."""
    import json

    import jsonschema

    from kscan.shipped import contrib_path

    schema = json.loads(contrib_path("events.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    m = setup()
    sc = scenario(m)
    prof = FakeProfile(m.lay)
    vr = FUNCS["vfs_read"] + 4
    patches = (site("ftrace", "__x64_sys_getdents64", "call allocated trampoline",
                    sc["tramp"]),
               VerifiedPatch("kprobe", vr, vr, vr + 1, b"\x48", b"\xcc", "int3"))
    a = attribute(prof, SLIDE, m.k.read, patches)    # type: ignore[arg-type]
    rep = PatchReport(patches, (0,), prof.symbolize, a)
    base = {"ts": 1.0, "host": "h", "vm": "v", "build_id": "ab", "slide": hex(SLIDE)}
    patched = {"event": "kernel_patched", "severity": "warning", **base, **rep.to_json()}
    assert sorted(e.message for e in validator.iter_errors(patched)) == []
    findings = [f.to_json() for f in owner_findings(rep)]
    assert {f["owner"]["name"] for f in findings} == {"kscan_ftrace_hook"}
    finding = jsonschema.Draft202012Validator({"$ref": "#/$defs/finding",
                                               "$defs": schema["$defs"]})
    for f in findings:
        assert [e.message for e in finding.iter_errors(f)] == []
    bad = dict(findings[0], owner={**findings[0]["owner"], "extra": 1})
    assert list(finding.iter_errors(bad))

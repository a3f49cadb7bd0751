"""ftrace direct calls (BPF trampolines, modules' direct trampolines) on synthetic data:
the `direct_functions` reader, the verifier's cross-check of a site's call against it,
the BPF trampoline decode, and the attribution — hostile memory included (a forged hash
entry, a trampoline-looking image not on bpf_kallsyms, images that loop or overrun)."""

from __future__ import annotations

import struct

import pytest

from scanner.check.attribution import attribute
from scanner.check.direct_calls import direct_lookup, trampoline_calls
from scanner.check.kernel_lists import KernelReader, read_direct_calls
from scanner.check.owners import OwnerKind, Trust
from scanner.check.patching import VerifiedPatch
from tests import test_owners as to
from tests import test_patching as tp

DIRECT_VAR = 0xFFFF_FFFF_82C2_0000          # link-time `direct_functions` (a pointer)
BPF_KALLSYMS = 0xFFFF_FFFF_82C3_0000        # link-time `bpf_kallsyms` (a list_head)
TRAMP = 0xFFFF_FFFF_A000_0000               # a BPF trampoline image (run-time)
PROG = 0xFFFF_FFFF_A000_1000                # a BPF program's JIT image
FORGED = 0xFFFF_FFFF_A000_3000              # a trampoline-looking image, not listed


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def call(at: int, target: int) -> bytes:
    return b"\xe8" + i32(target - (at + 5))


def jmp(at: int, target: int) -> bytes:
    return b"\xe9" + i32(target - (at + 5))


def tramp_code(start: int, calls: list[int], ret: int | None = None) -> bytes:
    """endbr64; push rbp; mov rbp,rsp; a `call` each; leave; then `ret`, or `jmp ret`."""
    code = bytearray(bytes.fromhex("f30f1efa 55 4889e5"))
    for t in calls:
        code += call(start + len(code), t)
    code += b"\xc9"
    code += b"\xc3" if ret is None else jmp(start + len(code), ret)
    return bytes(code)


# -- direct_functions ----------------------------------------------------------------------

def direct_hash(m: to.Mem, entries: dict[int, int]) -> int:
    lay = m.lay
    h = m.hash([])
    buckets = m.new(4 * 8)
    e = lay["ftrace_func_entry"]
    heads = [0] * 4
    for ip, d in entries.items():
        ent = m.new(e.size)
        node = ent + e["hlist"].offset
        to.put(m.k, lay, "ftrace_func_entry", ent, ip=ip, direct=d)
        m.k.u64(node, heads[ip & 3])
        heads[ip & 3] = node
    for i, n in enumerate(heads):
        m.k.u64(buckets + 8 * i, n)
    to.put(m.k, lay, "ftrace_hash", h, size_bits=2, buckets=buckets, count=len(entries))
    m.k.alloc(to.rt(DIRECT_VAR), 8)
    m.k.u64(to.rt(DIRECT_VAR), h)
    return h


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_direct_functions_read(which: str) -> None:
    m = to.setup(which)
    a, b = to.rt(to.FUNCS["__x64_sys_sync"]), to.rt(to.FUNCS["vfs_read"])
    direct_hash(m, {a: TRAMP, b: to.MOD_TEXT + 0x20})
    got = read_direct_calls(KernelReader(m.k.read), m.lay, to.rt(DIRECT_VAR))
    assert got.complete and got.targets == {a: TRAMP, b: to.MOD_TEXT + 0x20}
    assert got.lookup(a) == (TRAMP, "")
    assert got.lookup(a + 1)[0] is None and "no entry" in got.lookup(a + 1)[1]


def test_hostile_direct_functions_are_bounded() -> None:
    m = to.setup()
    a = to.rt(to.FUNCS["__x64_sys_sync"])
    h = direct_hash(m, {a: TRAMP})
    lay = m.lay
    buckets = int.from_bytes(m.k.read(h + lay["ftrace_hash"]["buckets"].offset, 8) or b"",
                             "little")
    node = next(n for i in range(4)
                if (n := int.from_bytes(m.k.read(buckets + 8 * i, 8) or b"", "little")))
    m.k.u64(node, node)                                   # the chain loops on itself
    got = read_direct_calls(KernelReader(m.k.read), lay, to.rt(DIRECT_VAR))
    assert not got.complete and "cannot be read in full" in got.lookup(a + 5)[1]
    to.put(m.k, lay, "ftrace_hash", h, size_bits=40)      # absurd bucket count: not read
    assert not read_direct_calls(KernelReader(m.k.read), lay, to.rt(DIRECT_VAR)).complete
    m.k.u64(to.rt(DIRECT_VAR), 0x1234)                    # not a kernel pointer
    got = read_direct_calls(KernelReader(m.k.read), lay, to.rt(DIRECT_VAR))
    assert not got.complete and got.targets == {}


# -- the verifier ----------------------------------------------------------------------------

def _site_calls(target: int) -> bytearray:
    live = bytearray(tp.TEXT)
    site = tp.SYM["ftrace_a"]
    tp.patch(live, site, tp.rel_insn(b"\xe8", site, target, runtime=True))
    return live


def test_a_site_calling_its_direct_target_verifies() -> None:
    ip = tp.SYM["ftrace_a"] + tp.SLIDE
    table = {ip: tp.TRAMP_VA}
    v = tp.check(_site_calls(tp.TRAMP_VA), tp.Mem(),
                 direct=lambda i: (table.get(i), "" if i in table else "no entry"))
    tp.only(v, "ftrace")
    assert v.verified[0].form == "call direct" and v.verified[0].target == tp.TRAMP_VA


def test_a_direct_call_the_hash_does_not_name_is_unverified() -> None:
    site = tp.SYM["ftrace_a"]
    ip = site + tp.SLIDE
    # no lookup at all (no BTF, attribution off): unverified as before
    assert "ftrace site" in tp.bad(tp.check(_site_calls(tp.TRAMP_VA), tp.Mem()), site,
                                   site + 5)
    # the function has no entry
    why = tp.bad(tp.check(_site_calls(tp.TRAMP_VA), tp.Mem(),
                          direct=lambda i: (None, "direct_functions has no entry")),
                 site, site + 5)
    assert "not a direct call: direct_functions has no entry" in why
    # the entry names another target than the bytes call (a retargeted site)
    why = tp.bad(tp.check(_site_calls(tp.TRAMP_VA + 0x40), tp.Mem(),
                          direct=lambda i: (tp.TRAMP_VA if i == ip else None, "no")),
                 site, site + 5)
    assert f"names {tp.TRAMP_VA:#x}" in why and f"calls {tp.TRAMP_VA + 0x40:#x}" in why


# -- the trampoline decode -------------------------------------------------------------------

def reader(regions: dict[int, bytes]):  # type: ignore[no-untyped-def]
    def read(va: int, size: int) -> bytes | None:
        for start, data in regions.items():
            if start <= va and va + size <= start + len(data):
                return data[va - start:va - start + size]
        return None
    return read


def test_decode_lists_the_calls_up_to_the_return() -> None:
    code = tramp_code(TRAMP, [0xFFFF_FFFF_8100_1000, PROG, 0xFFFF_FFFF_8100_2000],
                      ret=0xFFFF_FFFF_8100_3000)
    img = code + b"\xe8" + bytes(4) + b"\xcc" * 64     # garbage after the return
    d = trampoline_calls(reader({TRAMP: img}), TRAMP, TRAMP + len(img))
    assert d.problem == "" and d.calls == (0xFFFF_FFFF_8100_1000, PROG,
                                           0xFFFF_FFFF_8100_2000, 0xFFFF_FFFF_8100_3000)
    d = trampoline_calls(reader({TRAMP: tramp_code(TRAMP, [PROG]) + bytes(64)}), TRAMP,
                         TRAMP + 64)
    assert d.problem == "" and d.calls == (PROG,)


def test_decode_of_hostile_images() -> None:
    # a loop (jmp to itself) never returns inside the image: a problem, in bounded time
    loop = bytes.fromhex("f30f1efa") + call(TRAMP + 4, PROG) + b"\xeb\xfe"
    d = trampoline_calls(reader({TRAMP: loop + b"\x90" * 0x800}), TRAMP, TRAMP + 0x806)
    assert "no return" in d.problem
    # an image whose ksym end lies past readable memory: overrun, said so
    page = loop + b"\x90" * (0x1000 - len(loop))
    d = trampoline_calls(reader({TRAMP: page}), TRAMP, TRAMP + 0x10000)
    assert "unreadable before its return" in d.problem
    # absurd sizes are not read at all
    assert "out of range" in trampoline_calls(reader({}), TRAMP, TRAMP + (1 << 30)).problem
    assert "out of range" in trampoline_calls(reader({}), TRAMP, TRAMP - 1).problem
    # an indirect call: nothing the kernel's trampolines emit
    ind = bytes.fromhex("f30f1efa ffd0 c3")
    assert "indirect" in trampoline_calls(reader({TRAMP: ind}), TRAMP, TRAMP + 7).problem
    # undecodable bytes
    bad = bytes.fromhex("f30f1efa 0f0b0f ff") + bytes.fromhex("06 06 06")
    d = trampoline_calls(reader({TRAMP: bad}), TRAMP, TRAMP + len(bad))
    assert d.problem


# -- attribution ------------------------------------------------------------------------------

def bpf_list(m: to.Mem, images: list[tuple[int, int, str, int | None]]) -> None:
    """bpf_kallsyms with a ksym per (start, end, name, prog id or None)."""
    lay = m.lay
    ks, aux = lay["bpf_ksym"], lay["bpf_prog_aux"]
    head = to.rt(BPF_KALLSYMS)
    m.k.alloc(head, 16)
    nodes = []
    for start, end, name, pid in images:
        a = m.new(aux.size + 64)
        k = a + aux["ksym"].offset
        to.put(m.k, lay, "bpf_ksym", k, start=start, end=end, prog=int(pid is not None))
        m.k.write(k + ks["name"].offset, name.encode() + b"\0")
        if pid is not None:
            to.put(m.k, lay, "bpf_prog_aux", a, id=pid)
        nodes.append(k + ks["lnode"].offset)
    ring = [head, *nodes]
    for i, n in enumerate(ring):
        m.k.u64(n, ring[(i + 1) % len(ring)])
        m.k.u64(n + 8, ring[i - 1])


def direct_site(func: str, target: int) -> VerifiedPatch:
    at = to.FUNCS[func]
    # (a target outside .text is a run-time VA)
    return VerifiedPatch("ftrace", at, at, at + 5, b"\0" * 5, b"\0" * 5, "call direct",
                         target)


def _profile(m: to.Mem) -> to.FakeProfile:
    prof = to.FakeProfile(m.lay)
    prof.syms["bpf_kallsyms"] = BPF_KALLSYMS
    prof.syms["direct_functions"] = DIRECT_VAR
    return prof


def test_a_bpf_trampoline_is_owned_by_the_programs_it_calls() -> None:
    m = to.setup()
    helper = to.rt(to.FUNCS["function_trace_call"])       # kernel text: left out
    code = tramp_code(TRAMP, [helper, PROG, helper])
    m.k.alloc(TRAMP, 0x1000)
    m.k.write(TRAMP, code)
    bpf_list(m, [(TRAMP, TRAMP + 0x1000, "bpf_trampoline_6442", None),
                 (PROG, PROG + 0x80, "bpf_prog_6deef7357e7b4530_kscan_fentry", 7)])
    prof = _profile(m)
    a = attribute(prof, to.SLIDE, m.k.read, [direct_site("__x64_sys_sync", TRAMP)])  # type: ignore[arg-type]
    s = a.of(to.FUNCS["__x64_sys_sync"])
    assert s is not None and s.trust is Trust.KERNEL and not a.tampering()
    ((o),) = s.owners
    assert (o.kind, o.name, o.symbol) == (OwnerKind.BPF,
                                          "bpf_prog_6deef7357e7b4530_kscan_fentry",
                                          "prog id 7")
    assert s.hooks[0].via == "direct" and s.hooks[0].struct == TRAMP


def test_forged_trampolines_are_tampering() -> None:
    m = to.setup()
    m.k.alloc(TRAMP, 0x1000)
    m.k.alloc(FORGED, 0x1000)
    m.k.write(FORGED, tramp_code(FORGED, [PROG]))
    ok_tramp = tramp_code(TRAMP, [PROG, to.MOD_TEXT + 0x10])   # also calls module code
    m.k.write(TRAMP, ok_tramp)
    bpf_list(m, [(TRAMP, TRAMP + 0x1000, "bpf_trampoline_1", None),
                 (PROG, PROG + 0x80, "bpf_prog_aa_p", 3),
                 (PROG + 0x1000, PROG + 0x1080, "bpf_trampoline_2", None)])
    prof = _profile(m)
    sites = [direct_site("__x64_sys_sync", TRAMP),          # calls a prog and module code
             direct_site("vfs_read", FORGED),               # an image not on bpf_kallsyms
             direct_site("__x64_sys_getdents64", PROG + 0x8)]   # into a program
    a = attribute(prof, to.SLIDE, m.k.read, sites)  # type: ignore[arg-type]
    s = a.of(to.FUNCS["__x64_sys_sync"])
    assert s is not None and s.trust is Trust.TAMPER
    assert {(o.kind, o.name) for o in s.owners} == {(OwnerKind.BPF, "bpf_prog_aa_p"),
                                                    (OwnerKind.MODULE, "kscan_ftrace_hook")}
    s = a.of(to.FUNCS["vfs_read"])
    assert s is not None and s.trust is Trust.TAMPER and s.owners[0].kind is \
        OwnerKind.UNOWNED
    assert "no listed module or BPF trampoline" in s.problem
    s = a.of(to.FUNCS["__x64_sys_getdents64"])
    assert s is not None and s.trust is Trust.TAMPER and "not the start" in s.problem
    # a listed trampoline that calls no program, or never returns
    m.k.write(TRAMP, tramp_code(TRAMP, [to.rt(to.FUNCS["function_trace_call"])]))
    a = attribute(prof, to.SLIDE, m.k.read, sites[:1])  # type: ignore[arg-type]
    s = a.of(to.FUNCS["__x64_sys_sync"])
    assert s is not None and s.trust is Trust.TAMPER and "calls no BPF program" in s.problem
    m.k.write(TRAMP, bytes.fromhex("f30f1efa") + call(TRAMP + 4, PROG) + b"\xeb\xfe"
              + b"\x90" * 0x100)
    a = attribute(prof, to.SLIDE, m.k.read, sites[:1])  # type: ignore[arg-type]
    s = a.of(to.FUNCS["__x64_sys_sync"])
    assert s is not None and s.trust is Trust.TAMPER
    assert s.problem.startswith("BPF trampoline bpf_trampoline_1: "), s.problem


def test_a_module_direct_trampoline_is_the_modules() -> None:
    m = to.setup()
    bpf_list(m, [])
    prof = _profile(m)
    sites = [direct_site("__x64_sys_sync", to.MOD_TEXT + 0x20)]
    a = attribute(prof, to.SLIDE, m.k.read, sites)  # type: ignore[arg-type]
    s = a.of(to.FUNCS["__x64_sys_sync"])
    assert s is not None and s.trust is Trust.TAMPER
    assert [(o.kind, o.name) for o in s.owners] == [(OwnerKind.MODULE, "kscan_ftrace_hook")]
    a = attribute(prof, to.SLIDE, m.k.read, sites, frozenset({"kscan_ftrace_hook"}))  # type: ignore[arg-type]
    assert not a.tampering()


def test_direct_lookup_from_the_profile() -> None:
    m = to.setup()
    ip = to.rt(to.FUNCS["__x64_sys_sync"])
    direct_hash(m, {ip: TRAMP})
    prof = _profile(m)
    look = direct_lookup(prof, to.SLIDE, m.k.read)  # type: ignore[arg-type]
    assert look is not None and look(ip) == (TRAMP, "") and look(ip + 1)[0] is None
    del prof.syms["direct_functions"]
    assert direct_lookup(prof, to.SLIDE, m.k.read) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_a_shared_site_runs_the_direct_target_through_call_direct_funcs(which: str) -> None:
    """The function tracer and a module's direct call on one function: the site calls
    ftrace_regs_caller, and ftrace's direct ops (`call_direct_funcs`, a kernel function)
    sends execution to the module. The owner is the module, not the kernel."""
    m = to.setup(which)
    ip = to.rt(to.FUNCS["__x64_sys_sync"])
    target = to.MOD_TEXT + 0x20
    direct_hash(m, {ip: target})
    bpf_list(m, [])
    tracer = m.ops(to.rt(to.FUNCS["function_trace_call"]))
    dops = m.ops(to.rt(to.FUNCS["call_direct_funcs"]), ips=[ip])
    if "direct_call" in m.lay["ftrace_ops"]:       # 6.5+: the ops holds the target
        to.put(m.k, m.lay, "ftrace_ops", dops, direct_call=target)
        m.k.u64(to.rt(DIRECT_VAR), 0)              # (and the hash is not needed)
    m.link_ops([tracer, dops])
    prof = _profile(m)
    sites = [to.site("ftrace", "__x64_sys_sync", "call ftrace_regs_caller", to.TEXT),
             to.site("ftrace", "vfs_read", "call ftrace_regs_caller", to.TEXT)]
    a = attribute(prof, to.SLIDE, m.k.read, sites)  # type: ignore[arg-type]
    s = a.of(to.FUNCS["__x64_sys_sync"])
    assert s is not None and s.trust is Trust.TAMPER
    assert {(o.kind, o.name) for o in s.owners} == {(OwnerKind.KERNEL, "vmlinux"),
                                                    (OwnerKind.MODULE, "kscan_ftrace_hook")}
    s = a.of(to.FUNCS["vfs_read"])                    # only the tracer there
    assert s is not None and s.trust is Trust.KERNEL
    # a target in memory nobody owns: unowned, never hidden behind the tracer's owner
    hidden = to.HIDDEN + 0x40
    if "direct_call" in m.lay["ftrace_ops"]:
        to.put(m.k, m.lay, "ftrace_ops", dops, direct_call=hidden)
    else:
        direct_hash(m, {ip: hidden})
    s = attribute(prof, to.SLIDE, m.k.read, sites[:1]).of(ip - to.SLIDE)  # type: ignore[arg-type]
    assert s is not None and s.trust is Trust.TAMPER
    assert OwnerKind.UNOWNED in {o.kind for o in s.owners}
    if "direct_call" in m.lay["ftrace_ops"]:
        return
    # 6.1: an entry the hash does not hold — call_direct_funcs does nothing there
    direct_hash(m, {ip + 0x100: hidden})
    s = attribute(prof, to.SLIDE, m.k.read, sites[:1]).of(ip - to.SLIDE)  # type: ignore[arg-type]
    assert s is not None and s.trust is Trust.KERNEL
    # a hash that cannot be read: fail closed
    h = int.from_bytes(m.k.read(to.rt(DIRECT_VAR), 8) or b"", "little")
    to.put(m.k, m.lay, "ftrace_hash", h, size_bits=40)
    s = attribute(prof, to.SLIDE, m.k.read, sites[:1]).of(ip - to.SLIDE)  # type: ignore[arg-type]
    assert s is not None and s.trust is Trust.TAMPER

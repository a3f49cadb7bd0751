"""Patches shaped to pass as the kernel's own, written into real guests: each is found
as tampering and named by its function (issue 15 §2: exact verifiers).

Guests (TCG): `vx61` (Debian 6.1, 2 vCPUs) and `vx612` (Debian 6.12, 2 vCPUs), each
baselined on itself and checked once (the first check of the boot pins what later
checks compare with). Every attack writes bytes from the host, checks, and restores;
sites are chosen in code the idle busybox guest does not run (or that is harmless if
run), so the guest survives each attack."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import capstone
import numpy as np
import pytest

from scanner.check.patching import NOP2, NOP5, XOR5RAX
from scanner.image.kernel_profile import KernelProfile, profile_from_path
from tests.conftest import GuestPool
from tests.kscan_proc import RunProc, kscan, live_kernel
from tools.guests import Guest, GuestSpec, ensure_kernel
from tools.tamper import write_guest

pytestmark = pytest.mark.guest
TRACING = "/sys/kernel/tracing"


@dataclass
class Box:
    """One guest, its kernel's profile and its database."""

    guest: Guest
    profile: KernelProfile
    db: str

    def check(self) -> tuple[int, dict]:
        out = kscan("check", "--qmp", str(self.guest.qmp_aux), "--db", self.db, "--json")
        assert out.returncode in (0, 1), out.stderr
        return out.returncode, json.loads(out.stdout)

    def read(self, link_va: int, n: int) -> bytes:
        async def go() -> bytes:
            vm, lk = await live_kernel(self.guest.qmp_aux, self.profile)
            try:
                t = vm.walker().translate_range(link_va + lk.slide, n)
                return b"".join(bytes(vm.mem.view(g, k)) for g, k in t.gpa_runs())
            finally:
                await vm.close()
        return asyncio.run(go())

    def read_rt(self, va: int, n: int) -> bytes:
        return self.read(va - self.slide(), n)

    def slide(self) -> int:
        async def go() -> int:
            vm, lk = await live_kernel(self.guest.qmp_aux, self.profile)
            await vm.close()
            return lk.slide
        return asyncio.run(go())

    def write(self, link_va: int, data: bytes) -> bytes:
        """Write at a link-time VA (KASLR applied); returns the old bytes."""
        async def go() -> bytes:
            vm, lk = await live_kernel(self.guest.qmp_aux, self.profile)
            try:
                return bytes.fromhex(write_guest(vm, link_va + lk.slide, data)["old"])
            finally:
                await vm.close()
        return asyncio.run(go())

    def sh(self, command: str) -> str:
        rc, out = self.guest.run(command, timeout=240)
        assert rc == 0, f"{command}: {out}"
        return out

    def sym(self, name: str) -> int:
        ks = self.profile.kallsyms
        assert ks is not None
        a = ks.lookup(name)
        assert a is not None, name
        return a

    def name(self, va: int) -> str:
        ks = self.profile.kallsyms
        assert ks is not None
        return ks.symbolize(va).split("+")[0]


def _box(guests: GuestPool, tmp: pytest.TempPathFactory, name: str, kernel: str) -> Box:
    (g,) = guests.boot(GuestSpec(name, smp=2, kernel=kernel))
    vmlinuz = ensure_kernel(kernel).vmlinuz
    db = str(tmp.mktemp(name) / "kscan.db")
    r = kscan("profile", "add", str(vmlinuz), "--db", db)
    assert r.returncode == 0, r.stderr
    r = kscan("baseline", "--qmp", str(g.qmp_aux), "--db", db)
    assert r.returncode == 0, r.stderr
    box = Box(g, profile_from_path(vmlinuz), db)
    rc, doc = box.check()                     # the first check of the boot: pins
    assert rc == 0 and doc["per_vm_baseline_taken"], doc
    return box


@pytest.fixture(scope="module")
def k61(guests: GuestPool, tmp_path_factory: pytest.TempPathFactory) -> Box:
    return _box(guests, tmp_path_factory, "vx61", "6.1")


@pytest.fixture(scope="module")
def k612(guests: GuestPool, tmp_path_factory: pytest.TempPathFactory) -> Box:
    return _box(guests, tmp_path_factory, "vx612", "6.12")


def tampered_in(box: Box, func: str, why: str = "") -> dict:
    rc, doc = box.check()
    assert rc == 1 and doc["result"] == "tampered", doc.get("patched")
    texts = [m for r in doc["regions"] for m in r["mismatches"] if m["region"] == ".text"]
    assert func in [m["symbol"].split("+")[0] for m in texts], texts[:5]
    if why:
        assert any(why in str(m) for m in texts), texts[:3]
    return doc


def clean(box: Box) -> None:
    rc, doc = box.check()
    assert rc == 0, [m for r in doc["regions"] for m in r["mismatches"]][:3]


@pytest.fixture
def restore() -> Iterator[list[tuple[Box, int, bytes]]]:
    """Writes to undo after a test (last first)."""
    undo: list[tuple[Box, int, bytes]] = []
    yield undo
    for box, va, old in reversed(undo):
        box.write(va, old)


def put(undo: list[tuple[Box, int, bytes]], box: Box, va: int, data: bytes) -> None:
    undo.append((box, va, box.write(va, data)))


def rel32(site: int, target: int, length: int = 5) -> bytes:
    return struct.pack("<i", target - (site + length))


def boundary(box: Box, func: str, at_least: int) -> int:
    """Link VA of the first instruction of `func` at offset >= at_least that starts a
    run of whole non-branch instructions covering 5 bytes."""
    start = box.sym(func)
    code = box.read(start, 64)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    insns = list(md.disasm(code, start))
    for i, ins in enumerate(insns):
        if ins.address - start < at_least:
            continue
        covered, j = 0, i
        while covered < 5 and j < len(insns):
            if insns[j].mnemonic.startswith(("j", "call", "ret")) or insns[j].bytes[0] == 0xCC:
                break
            covered += insns[j].size
            j += 1
        if covered >= 5:
            return int(ins.address)
    raise AssertionError(f"no boundary in {func}")


# -- 6.1 ----------------------------------------------------------------------------

def test_second_site_jumping_into_a_verified_optprobe_slot(k61: Box, restore: list) -> None:
    """Item 1: a slot verified for vfs_read+0xf, jumped to from another function."""
    k61.sh(f"echo 'p:kscan_opt vfs_read+0xf' >> {TRACING}/kprobe_events && "
           f"echo 1 > {TRACING}/events/kprobes/kscan_opt/enable && sleep 2")
    try:
        site = k61.sym("vfs_read") + 0xF
        live = k61.read(site, 5)
        assert live[0] == 0xE9, live.hex()           # optimized: jmp to its slot
        slot_link = site + 5 + struct.unpack("<i", live[1:5])[0]
        other = boundary(k61, "tcp_v4_connect", 5)
        put(restore, k61, other, b"\xe9" + rel32(other, slot_link))
        tampered_in(k61, "tcp_v4_connect")
    finally:
        for box, va, old in reversed(restore):
            box.write(va, old)
        restore.clear()
        k61.sh(f"echo 0 > {TRACING}/events/kprobes/kscan_opt/enable && "
               f"echo '-:kscan_opt' >> {TRACING}/kprobe_events")
    clean(k61)


def test_optprobe_slot_calling_another_function(k61: Box, restore: list) -> None:
    """Item 7: the slot's `call optimized_callback` turned into a call to another
    function start (here the harmless __static_call_return0: the probe goes quiet)."""
    k61.sh(f"echo 'p:kscan_opt2 vfs_read+0xf' >> {TRACING}/kprobe_events && "
           f"echo 1 > {TRACING}/events/kprobes/kscan_opt2/enable && sleep 2")
    try:
        site = k61.sym("vfs_read") + 0xF
        live = k61.read(site, 5)
        assert live[0] == 0xE9, live.hex()
        slot = site + 5 + struct.unpack("<i", live[1:5])[0]     # link-time arithmetic
        code = k61.read(slot, 128)
        c = code.find(b"\xe8", code.find(b"\x48\xbf") + 10)
        assert c > 0 and slot + c + 5 + struct.unpack("<i", code[c + 1:c + 5])[0] == \
            k61.sym("optimized_callback")
        put(restore, k61, slot + c + 1,
            rel32(slot + c, k61.sym("__static_call_return0"))[:4])
        tampered_in(k61, "vfs_read", "optimized_callback")
    finally:
        for box, va, old in reversed(restore):
            box.write(va, old)
        restore.clear()
        k61.sh(f"echo 0 > {TRACING}/events/kprobes/kscan_opt2/enable && "
               f"echo '-:kscan_opt2' >> {TRACING}/kprobe_events")
    clean(k61)


def _tracepoint_static_call_site(box: Box) -> tuple[int, str]:
    """A non-tail static-call site of a tracepoint (only run while it is enabled)."""
    s = box.profile.patch_sites
    assert s is not None
    tramp_of = {int(k) & ~3: int(a) for a, k in s.static_call_trampolines.items()}
    for a, k, t in zip(s.static_call_addr.tolist(), s.static_call_key.tolist(),
                       s.static_call_tail.tolist(), strict=True):
        tr = tramp_of.get(int(k) & ~3)
        if t or tr is None or not box.name(tr).startswith("__SCT__tp_func_sched"):
            continue
        live = box.read(int(a), 5)
        if live[0] == 0xE8 and int(a) + 5 + struct.unpack("<i", live[1:5])[0] != tr:
            return int(a), box.name(int(a))
    raise AssertionError("no tracepoint static-call site")


def test_static_call_site_set_alone_to_return_0(k61: Box, restore: list) -> None:
    """Item 2: one site `xor eax,eax` while its key's trampoline is unchanged."""
    site, func = _tracepoint_static_call_site(k61)
    put(restore, k61, site, XOR5RAX)
    tampered_in(k61, func, "different functions")


def test_one_jump_label_site_of_a_key_flipped_alone(k61: Box, restore: list) -> None:
    """Item 2: a tracepoint key's sites are all flipped together, never one."""
    s = k61.profile.patch_sites
    assert s is not None
    keys, counts = np.unique(s.jump_key, return_counts=True)
    many = {int(k) for k, c in zip(keys.tolist(), counts.tolist(), strict=True) if c >= 2}
    for code, target, key in zip(s.jump_code.tolist(), s.jump_target.tolist(),
                                 s.jump_key.tolist(), strict=True):
        if int(key) in many and k61.name(int(key)).startswith("__tracepoint_sched"):
            live = k61.read(int(code), 5)
            if live == NOP5:
                put(restore, k61, int(code), b"\xe9" + rel32(int(code), int(target)))
                break
            if live[:2] == NOP2:
                d = int(target) - (int(code) + 2)
                if -128 <= d < 128:
                    put(restore, k61, int(code), bytes((0xEB, d & 0xFF)))
                    break
    else:
        raise AssertionError("no tracepoint jump-label site")
    tampered_in(k61, k61.name(int(code)), "not flipped")


def test_half_state_that_stays_is_tampering(k61: Box, restore: list) -> None:
    """Item 5: an int3 over an ftrace site with the NOP's tail (text_poke_bp's first
    step) accepted as "in progress" forever; `kscan check` looks again a second later."""
    s = k61.profile.patch_sites
    assert s is not None
    fn = k61.sym("tcp_v4_connect")
    site = int(s.ftrace[np.searchsorted(s.ftrace, np.uint64(fn))])
    assert site == fn and k61.read(site, 5) == NOP5
    put(restore, k61, site, b"\xcc")
    tampered_in(k61, "tcp_v4_connect", "half-state")


def test_lock_prefix_removed_on_a_two_vcpu_vm(k61: Box, restore: list) -> None:
    """Item 6: `lock` → `ds` at one site of a 2-vCPU VM."""
    s = k61.profile.patch_sites
    assert s is not None
    fn = k61.sym("tcp_v4_connect")
    i = int(np.searchsorted(s.smp_locks, np.uint64(fn)))
    site = int(s.smp_locks[i])
    assert k61.read(site, 1) == b"\xf0"
    put(restore, k61, site, b"\x3e")
    tampered_in(k61, k61.name(site), "2 vCPUs")


def flip_key(box: Box, undo: list[tuple[Box, int, bytes]], key_name: str) -> list[str]:
    """Flip every site of a static key, as static_branch_enable/disable would (all
    together: the sites agree); returns the functions."""
    s = box.profile.patch_sites
    assert s is not None
    key = box.sym(key_name)
    funcs = []
    for i in np.flatnonzero(s.jump_key == np.uint64(key)).tolist():
        code, target = int(s.jump_code[i]), int(s.jump_target[i])
        live = box.read(code, 5)
        if live == NOP5:
            new = b"\xe9" + rel32(code, target)
        elif live[0] == 0xE9:
            new = NOP5
        elif live[:2] == NOP2:
            new = bytes((0xEB, (target - (code + 2)) & 0xFF))
        elif live[0] == 0xEB:
            new = NOP2
        else:
            raise AssertionError(f"{key_name} site {code:#x}: {live.hex()}")
        put(undo, box, code, new)
        funcs.append(box.name(code))
    assert funcs, key_name
    return funcs


def test_cr_pinning_key_flipped(k61: Box, restore: list) -> None:
    """Item 4 on 6.1: cr_pinning (in __ro_after_init) switched off at all its sites:
    the pinned CR0.WP/CR4.SMEP/SMAP bits can then be cleared."""
    funcs = flip_key(k61, restore, "cr_pinning")
    assert "native_write_cr4" in funcs
    tampered_in(k61, funcs[0], "read-only data")    # (a page is named by its first)


# -- 6.12 ---------------------------------------------------------------------------

def test_612_user_ptr_max_set_to_all_ones(k612: Box, restore: list) -> None:
    """Item 3: every USER_PTR_MAX immediate 0xffff…ff: no user-pointer range check."""
    s = k612.profile.patch_sites
    assert s is not None
    sites = [c for c in s.runtime_const if c.name == "USER_PTR_MAX"]
    assert len(sites) > 100
    for c in sites:
        put(restore, k612, c.addr, b"\xff" * 8)
    tampered_in(k612, k612.name(sites[0].addr), "TASK_SIZE_MAX")


def test_612_dentry_hashtable_immediates_moved(k612: Box, restore: list) -> None:
    """Item 3: all dentry_hashtable immediates agree with each other, not with the
    variable (__ro_after_init) or the value pinned at the first check."""
    s = k612.profile.patch_sites
    assert s is not None
    sites = [c for c in s.runtime_const if c.name == "dentry_hashtable"]
    value = int.from_bytes(k612.read(sites[0].addr, 8), "little") + 0x1000
    for c in sites:
        put(restore, k612, c.addr, value.to_bytes(8, "little"))
    tampered_in(k612, k612.name(sites[0].addr), "dentry_hashtable")


def test_612_lsm_hook_key_flipped(k612: Box, restore: list) -> None:
    """Item 4: security_hook_active_capable_0 NOPed: cap_capable is skipped and every
    capable() succeeds. (In Debian's 6.12 the key is in .bss, not __ro_after_init;
    only boot code sets it: kscan pins the LSM hook keys at the first check.)"""
    s = k612.profile.patch_sites
    assert s is not None
    key = k612.sym("security_hook_active_capable_0")
    idx = np.flatnonzero(s.jump_key == np.uint64(key))
    assert idx.size >= 1
    funcs = set()
    for i in idx.tolist():
        code = int(s.jump_code[i])
        live = k612.read(code, 5)
        if live[0] == 0xE9:
            put(restore, k612, code, NOP5)
        elif live[0] == 0xEB:
            put(restore, k612, code, NOP2)
        else:
            continue
        funcs.add(k612.name(code))
    assert funcs, "the capability LSM's hook is active: its sites jump"
    tampered_in(k612, sorted(funcs)[0], "LSM hook")


def test_612_lsm_static_call_site_returns_0(k612: Box, restore: list) -> None:
    """Item 2 on 6.12: security_capable's call of the capability hook set to
    `xor eax,eax` ("return 0") while its trampoline still jumps to cap_capable."""
    s = k612.profile.patch_sites
    assert s is not None
    lo, hi = k612.sym("security_capable"), k612.sym("security_capable") + 0x100
    for a, t in zip(s.static_call_addr.tolist(), s.static_call_tail.tolist(), strict=True):
        if lo <= int(a) < hi and not t and k612.name(int(a)) == "security_capable":
            live = k612.read(int(a), 5)
            if live[0] == 0xE8:
                put(restore, k612, int(a), XOR5RAX)
                break
    else:
        raise AssertionError("no static call in security_capable")
    tampered_in(k612, "security_capable")


@pytest.mark.parametrize("on, off, expect", [
    (f"echo 1 > {TRACING}/events/sched/sched_switch/enable",
     f"echo 0 > {TRACING}/events/sched/sched_switch/enable", {"jump_label", "static_call"}),
    (f"echo function > {TRACING}/current_tracer", f"echo nop > {TRACING}/current_tracer",
     {"ftrace"}),
    (f"echo 'p:kscan_e vfs_read' >> {TRACING}/kprobe_events && "
     f"echo 1 > {TRACING}/events/kprobes/kscan_e/enable",
     f"echo 0 > {TRACING}/events/kprobes/kscan_e/enable && "
     f"echo '-:kscan_e' >> {TRACING}/kprobe_events", {"ftrace"}),
    (f"echo 'p:kscan_o vfs_read+0xf' >> {TRACING}/kprobe_events && "
     f"echo 1 > {TRACING}/events/kprobes/kscan_o/enable && sleep 2",
     f"echo 0 > {TRACING}/events/kprobes/kscan_o/enable && "
     f"echo '-:kscan_o' >> {TRACING}/kprobe_events", {"optprobe"}),
], ids=["tracepoint", "function-tracer", "kprobe-at-entry", "optprobe"])
def test_612_benign_patching_still_verified(k612: Box, on: str, off: str,
                                            expect: set[str]) -> None:
    """The rules above do not touch the kernel's ordinary life on 6.12 (6.1: in
    tests/test_patching_live.py)."""
    k612.sh(on)
    try:
        rc, doc = k612.check()
        assert rc == 0, [m for r in doc["regions"] for m in r["mismatches"]][:3]
        assert expect <= set(doc["patched"]["mechanisms"])
    finally:
        k612.sh(off)
    clean(k612)


def test_watcher_reports_a_half_state_that_stays(k61: Box, restore: list,
                                                 tmp_path: Path) -> None:
    """Item 5 under `kscan run`: the fast path sees "unchanged" after the half-state;
    the watcher looks in full again a second later and reports it."""
    s = k61.profile.patch_sites
    assert s is not None
    fn = k61.sym("tcp_v4_connect")
    proc = RunProc(["--qmp", str(k61.guest.qmp), "--db", k61.db, "--interval", "1",
                    "--forensics-dir", str(tmp_path / "f")], tmp_path / "run.err")
    try:
        proc.wait_for(lambda e: e["vm"] == "vx61" and e["event"] == "vm_clean", 120)
        mark = proc.mark()
        put(restore, k61, fn, b"\xcc")
        ev = proc.wait_for(lambda e: e["event"] == "tamper", 60, after=mark)
        names = [m["symbol"].split("+")[0] for m in ev["mismatches"]]
        assert "tcp_v4_connect" in names, ev["mismatches"]
    finally:
        proc.stop()

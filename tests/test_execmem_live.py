"""Executable kernel memory accounted for, and pointer tables named, on real guests.

One 6.1 guest of its own: clean first (every executable page owned: kernel text, the
BPF pack with the PTP classifier, the real-mode trampoline), then benign run-time code
(a module, a kprobe with its handler in a module, an optimized kprobe's slot page, the
function tracer's trampolines) must stay owned; then the rootkit techniques: a page
made executable by a module that unlinked itself, a module that hides then hooks, a
`sys_call_table` entry pointed into a module. One 6.12 guest: clean, then the page.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from scanner.check.execmem import ExecScan, address_owners, exec_findings, scan_exec
from scanner.check.kernel_lists import walker_reader
from scanner.image.kernel_profile import KernelProfile, profile_from_path
from tests.conftest import GuestPool
from tests.kscan_proc import RunProc, kscan, live_kernel
from tests.needs import unavailable
from tools.guests import Guest, GuestError, GuestSpec, ensure_kernel
from tools.tamper import write_guest
from tools.testmodules import MODULES, build, build_program, load, push
from tools.testmodules import dmesg as tools_dmesg


def _build_all(kernel: str) -> None:
    try:
        for name in MODULES:
            build(name, kernel)
    except (GuestError, OSError) as err:
        unavailable(f"test modules cannot be built for {kernel}: {err}")


def _addr(lines: tuple[str, ...], label: str) -> int:
    for line in reversed(lines):
        m = re.search(re.escape(label) + r"\s*([0-9a-f]{16})", line)
        if m:
            return int(m.group(1), 16)
    raise AssertionError(f"no {label!r} in {lines}")


def scan(g: Guest, profile: KernelProfile) -> ExecScan:
    return scan_and_name(g, profile)[0]


def scan_and_name(g: Guest, profile: KernelProfile, *addrs: int
                  ) -> tuple[ExecScan, dict[int, str]]:
    """The scan, and the owner of each of `addrs` named while the guest's memory is
    open (a module's symbols are read on demand)."""
    async def go() -> tuple[ExecScan, dict[int, str]]:
        vm, lk = await live_kernel(g.qmp_aux, profile)
        try:
            read = walker_reader(vm.walker())
            s = scan_exec(vm.mem, vm.vcpus, lk, read)
            owners = address_owners(read, lk)
            return s, {a: owners.describe(a) for a in addrs}
        finally:
            await vm.close()

    return asyncio.run(go())


def unowned(s: ExecScan) -> list[tuple[int, int]]:
    return [(u.va, u.pages) for u in s.account.unowned]


def check_json(g: Guest, db: str) -> tuple[int, dict[str, Any]]:
    out = kscan("check", "--qmp", str(g.qmp_aux), "--db", db, "--json")
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def _db(g: Guest, kernel: str, tmp: Path) -> str:
    path = str(tmp / "kscan.db")
    added = kscan("profile", "add", str(ensure_kernel(kernel).vmlinuz), "--db", path)
    assert added.returncode == 0, added
    base = kscan("baseline", "--qmp", str(g.qmp_aux), "--db", path)
    assert base.returncode == 0, base.stderr
    return path


# ---------------------------------------------------------------------------- 6.1


@pytest.fixture(scope="module")
def xguest(guests: GuestPool) -> Guest:
    _build_all("6.1")
    (g,) = guests.boot(GuestSpec("exec61"))
    return g


@pytest.fixture(scope="module")
def xdb(xguest: Guest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _db(xguest, "6.1", tmp_path_factory.mktemp("execmem"))


def test_clean_guest_has_only_owned_executable_memory(xguest: Guest, xdb: str,
                                                       kernel_profile: KernelProfile
                                                       ) -> None:
    s = scan(xguest, kernel_profile)
    assert s.complete and not exec_findings(s), exec_findings(s)
    kinds = s.account.by_kind
    # The whole of .text, the real-mode trampoline, and the boot-time BPF pack (the
    # PTP classifier, a classic-BPF program on no list but the pack's bitmap).
    assert kinds["kernel_text"] == 3586 and kinds["realmode_trampoline"] >= 1, kinds
    assert kinds.get("bpf_pack", 0) >= 1 and kinds["bpf_pack"] + kinds["bpf_pack_fill"] == 512
    assert s.account.pages == sum(kinds.values())
    rc, rep = check_json(xguest, xdb)
    assert rc == 0 and rep["result"] == "clean", rep["findings"]
    assert rep["execmem"]["unowned"] == [] and rep["execmem"]["pages"] == s.account.pages


def test_bpf_programs_loaded_and_freed_during_the_checks_are_not_unowned_code(
        xguest: Guest, xdb: str, kernel_profile: KernelProfile) -> None:
    """A guest whose processes load BPF all the time (seccomp filters at every process
    start; here classic socket filters, loaded and freed in a loop): the pack's chunks
    are allocated, written and freed while kscan reads the bitmap and then the pages.
    Every check stays clean, and the loop did run through them."""
    try:
        prog = build_program("kscan_sockfilter")
    except (GuestError, OSError) as err:
        unavailable(f"the socket-filter loader cannot be built: {err}")
    push(xguest, prog, "/tmp/kscan_sockfilter")
    rc, out = xguest.run("chmod +x /tmp/kscan_sockfilter && (/tmp/kscan_sockfilter "
                         "> /tmp/sockfilter.out 2>&1 & echo $! > /tmp/sockfilter.pid) "
                         "&& sleep 2 && cat /tmp/sockfilter.out")
    assert rc == 0 and "attached" in out, out
    try:
        for _ in range(6):
            s = scan(xguest, kernel_profile)
            assert s.complete and not exec_findings(s), exec_findings(s)
            assert s.account.by_kind.get("bpf_pack", 0) >= 1
        rc, rep = check_json(xguest, xdb)
        assert rc == 0 and rep["result"] == "clean", rep["findings"]
        rc, out = xguest.run("cat /tmp/sockfilter.out")
        rounds = [int(m) for m in re.findall(r"rounds (\d+)", out)]
        assert rounds and rounds[-1] >= 1000, out   # filters came and went meanwhile
    finally:
        xguest.run("kill $(cat /tmp/sockfilter.pid); sleep 1")


def test_benign_runtime_code_stays_owned(xguest: Guest, kernel_profile: KernelProfile
                                         ) -> None:
    ben = load(xguest, "kscan_benign")
    assert ben.ok, ben
    kp = load(xguest, "kscan_kprobe")                  # ftrace-based kprobe, handler in module
    assert kp.ok, kp
    rc, out = xguest.run("echo function > /sys/kernel/tracing/current_tracer")
    assert rc == 0, out
    text = _addr(ben.lines, "text")
    try:
        s, names = scan_and_name(xguest, kernel_profile, text)
    finally:
        xguest.run("echo nop > /sys/kernel/tracing/current_tracer")
    assert s.complete and not exec_findings(s), exec_findings(s)
    kinds = s.account.by_kind
    assert kinds["module"] >= 2 and kinds["ftrace_trampoline"] >= 2, kinds
    assert names[text] == "module kscan_benign (kscan_benign_hits)"
    # A stored scan names owners without reading guest memory again (no symbols).
    assert s.owners is not None and s.owners.describe(text) == "module kscan_benign"
    tramp = [o for o in s.owners.exec_owners.owners if o.kind == "ftrace_trampoline"]
    assert all(s.owners.claim_at(o.base) is not None for o in tramp)


def test_kprobe_slot_page_is_owned(xguest: Guest, kernel_profile: KernelProfile) -> None:
    # A probe inside a function (not at its ftrace site) single-steps a copy of the
    # instruction from a kprobe_insn_slots page.
    rc, out = xguest.run("echo 'p:kscan_mid vfs_read+9' >> /sys/kernel/tracing/kprobe_events"
                         " && echo 1 > /sys/kernel/tracing/events/kprobes/kscan_mid/enable"
                         " && cat /proc/version > /dev/null")
    assert rc == 0, out
    try:
        s = scan(xguest, kernel_profile)
    finally:
        xguest.run("echo 0 > /sys/kernel/tracing/events/kprobes/kscan_mid/enable; "
                   "echo '-:kscan_mid' >> /sys/kernel/tracing/kprobe_events")
    assert s.complete and not exec_findings(s), exec_findings(s)
    assert s.account.by_kind.get("kprobe_insn_page", 0) >= 1, s.account.by_kind


def test_run_reports_unowned_executable_memory(xguest: Guest, xdb: str,
                                               tmp_path: Path) -> None:
    """Under `kscan run`, a new executable page changes the tables the fast path
    fingerprints: the slow path runs and reports it as tampering."""
    # The modules an earlier test loaded hook the kernel (kscan_kprobe): trusted here, so
    # the verdict before the attack is clean (tests/test_owners_live.py covers the policy).
    proc = RunProc(["--qmp", str(xguest.qmp), "--db", xdb, "--interval", "1",
                    "--trust-module", "kscan_kprobe", "--trust-module", "kscan_benign",
                    "--forensics-dir", str(tmp_path / "forensics")], tmp_path / "run.err")
    try:
        proc.wait_for(lambda e: e["event"] == "vm_clean" and e["vm"] == "exec61", 300)
        mark = proc.mark()
        gone = load(xguest, "kscan_exec_page", "vanish=1")
        assert not gone.ok, gone
        page = _addr(gone.lines, "page at")
        ev = proc.wait_for(lambda e: e["event"] == "tamper", 120, mark)
        found = [f for f in ev["findings"] if f["kind"] == "unowned_exec"]
        assert any(int(f["va"], 16) == page and f["pages"] == 1 for f in found), ev["findings"]
        assert f"unowned executable kernel memory at {page:#x} (1 page, writable)" in [
            f["message"] for f in found]
    finally:
        assert proc.stop() == 0
    assert not proc.bad_lines


def test_executable_page_of_an_unlinked_module_is_unowned(xguest: Guest, xdb: str,
                                                           kernel_profile: KernelProfile
                                                           ) -> None:
    gone = load(xguest, "kscan_exec_page", "vanish=1")
    assert not gone.ok, gone
    orphan = _addr(gone.lines, "page at")
    loaded = load(xguest, "kscan_exec_page")
    assert loaded.ok, loaded
    page = _addr(loaded.lines, "page at")
    s = scan(xguest, kernel_profile)
    found = dict(unowned(s))
    assert found.get(orphan) == 1 and found.get(page) == 1, [hex(v) for v in found]
    # The unlinked module's own text is unowned too (it is in no listed module).
    assert len(found) >= 3
    rc, rep = check_json(xguest, xdb)
    assert rc == 1 and rep["result"] == "tampered"
    msgs = [f["message"] for f in rep["findings"] if f["kind"] == "unowned_exec"]
    assert f"unowned executable kernel memory at {page:#x} (1 page, writable)" in msgs, msgs
    out = kscan("check", "--qmp", str(xguest.qmp_aux), "--db", xdb)
    assert out.returncode == 1 and f"unowned executable kernel memory at {orphan:#x}" in \
        out.stdout, out.stdout


def test_hidden_hooking_module_text_is_unowned(xguest: Guest, kernel_profile: KernelProfile
                                               ) -> None:
    loaded = load(xguest, "kscan_hide")
    assert loaded.ok, loaded
    hook = _addr(loaded.lines, "->")
    s, names = scan_and_name(xguest, kernel_profile, hook)
    assert any(u.va <= hook < u.va + u.size for u in s.account.unowned), unowned(s)
    assert names[hook] == "unowned memory"


def test_sys_call_table_entry_named_with_its_module(xguest: Guest, xdb: str,
                                                    kernel_profile: KernelProfile) -> None:
    loaded = load(xguest, "kscan_sct")
    assert loaded.ok, loaded
    rc, rep = check_json(xguest, xdb)
    assert rc == 1 and rep["result"] == "tampered"
    ptrs = [p for m in rep["regions"] for mm in m["mismatches"] for p in mm.get("pointers", [])]
    hit = [p for p in ptrs if p["label"] == "sys_call_table[110]"]
    assert hit, ptrs
    # The old entry, named as the kernel names it (of aliases, kallsyms' first).
    old = kernel_profile.symbolize(int(hit[0]["old"], 16))
    assert old is not None and "getppid" in old and hit[0]["old_owner"] == old, hit
    # The hook named from the module's own kallsyms.
    assert hit[0]["new_owner"] == "module kscan_sct (hooked)", hit
    said = f"sys_call_table[110] = {old} now points into module kscan_sct (hooked)"
    assert hit[0]["message"] == said
    out = kscan("check", "--qmp", str(xguest.qmp_aux), "--db", xdb)
    assert said in out.stdout, out.stdout


def _idt_gate(g: Guest, profile: KernelProfile, vector: int,
              handler: int | None = None) -> bytes:
    """Gate `vector` of the guest's IDT; with `handler`, rewrite its handler first (the
    test plays the rootkit: a write through the backing file, as tools/tamper does)."""
    async def go() -> bytes:
        vm, lk = await live_kernel(g.qmp_aux, profile)
        try:
            va = lk.regions["idt"].va + vector * 16
            if handler is not None:
                old = walker_reader(vm.walker())(va, 16)
                assert old is not None
                new = bytearray(old)
                struct.pack_into("<H", new, 0, handler & 0xFFFF)
                struct.pack_into("<H", new, 6, handler >> 16 & 0xFFFF)
                struct.pack_into("<I", new, 8, handler >> 32)
                write_guest(vm, va, bytes(new))
            got = walker_reader(vm.walker())(va, 16)
            assert got is not None
            return got
        finally:
            await vm.close()

    return asyncio.run(go())


def test_idt_gate_named_by_vector_and_owner(xguest: Guest, xdb: str,
                                            kernel_profile: KernelProfile) -> None:
    ben = load(xguest, "kscan_benign")                       # loaded already, or now
    text = _addr(ben.lines if ben.ok else tools_dmesg(xguest, "kscan_benign"), "text")
    old = _idt_gate(xguest, kernel_profile, 0x80)
    try:
        _idt_gate(xguest, kernel_profile, 0x80, text)
        rc, rep = check_json(xguest, xdb)
        assert rc == 1
        ptrs = [p for m in rep["regions"] if m["region"] == "idt" for mm in m["mismatches"]
                for p in mm.get("pointers", [])]
        assert [p["label"] for p in ptrs] == ["idt[0x80]"], ptrs
        assert int(ptrs[0]["new"], 16) == text
        assert ptrs[0]["new_owner"] == "module kscan_benign (kscan_benign_hits)"
        assert ptrs[0]["old_owner"] == kernel_profile.symbolize(int(ptrs[0]["old"], 16))
    finally:
        async def restore() -> None:
            vm, lk = await live_kernel(xguest.qmp_aux, kernel_profile)
            try:
                write_guest(vm, lk.regions["idt"].va + 0x80 * 16, old)
            finally:
                await vm.close()

        asyncio.run(restore())
    assert _idt_gate(xguest, kernel_profile, 0x80) == old


# ---------------------------------------------------------------------------- 6.12


@pytest.fixture(scope="module")
def xguest612(guests: GuestPool) -> Guest:
    _build_all("6.12")
    (g,) = guests.boot(GuestSpec("exec612", kernel="6.12"))
    return g


def test_612_clean_then_an_unowned_page(xguest612: Guest, tmp_path: Path) -> None:
    profile = profile_from_path(ensure_kernel("6.12").vmlinuz)
    db = _db(xguest612, "6.12", tmp_path)
    s = scan(xguest612, profile)
    assert s.complete and not exec_findings(s), exec_findings(s)
    assert s.account.by_kind["kernel_text"] == 4096, s.account.by_kind
    # Benign run-time code: a module, the function tracer, a mid-function kprobe.
    ben = load(xguest612, "kscan_benign")
    assert ben.ok, ben
    rc, out = xguest612.run(
        "echo function > /sys/kernel/tracing/current_tracer && "
        "echo 'p:kscan_mid vfs_read+9' >> /sys/kernel/tracing/kprobe_events && "
        "echo 1 > /sys/kernel/tracing/events/kprobes/kscan_mid/enable && cat /proc/version")
    assert rc == 0, out
    text = _addr(ben.lines, "text")
    try:
        s, names = scan_and_name(xguest612, profile, text)
    finally:
        xguest612.run("echo nop > /sys/kernel/tracing/current_tracer; "
                      "echo 0 > /sys/kernel/tracing/events/kprobes/kscan_mid/enable; "
                      "echo '-:kscan_mid' >> /sys/kernel/tracing/kprobe_events")
    assert s.complete and not exec_findings(s), exec_findings(s)
    kinds = s.account.by_kind
    assert kinds["module"] >= 1 and kinds["ftrace_trampoline"] >= 1, kinds
    assert kinds.get("kprobe_insn_page", 0) >= 1, kinds
    assert names[text] == "module kscan_benign (kscan_benign_hits)"
    # Then the page, and a sys_call_table entry (6.12 dispatches through x64_sys_call:
    # the table still exists, in .rodata, and a changed entry is still named).
    loaded = load(xguest612, "kscan_exec_page")
    sct = load(xguest612, "kscan_sct")
    assert loaded.ok and sct.ok, (loaded, sct)
    page = _addr(loaded.lines, "page at")
    s = scan(xguest612, profile)
    assert dict(unowned(s)).get(page) == 1, unowned(s)
    rc, rep = check_json(xguest612, db)
    assert rc == 1
    ptrs = [p for m in rep["regions"] for mm in m["mismatches"] for p in mm.get("pointers", [])]
    hit = [p for p in ptrs if p["label"] == "sys_call_table[110]"]
    assert hit and hit[0]["new_owner"] == "module kscan_sct (hooked)" and "getppid" in hit[0][
        "old_owner"], ptrs

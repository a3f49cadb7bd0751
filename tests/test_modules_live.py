"""Test kernel modules in real guests: each technique does its thing, and kscan reads
the guest's module list (inspect, run) from its memory with the kernel's BTF layouts.

One 6.1 guest of its own takes the modules in order (benign first, under `kscan run`;
then the rootkit techniques, which it keeps); one 6.12 guest checks the `mem[]` layout.
The modules are described in tools/testmodules.py and their C files.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from scanner.check.kernel_lists import (
    KernelReader,
    ModuleList,
    read_guest_modules,
    read_module_symbols,
    walker_reader,
)
from scanner.image.kernel_profile import KernelProfile, profile_from_path
from tests.conftest import GuestPool, run
from tests.kscan_proc import RunProc, kscan, live_kernel
from tests.needs import unavailable
from tools.guests import Guest, GuestError, GuestSpec, ensure_kernel
from tools.testmodules import MODULES, build, load

INTERVAL = 1.0


def _build_all(kernel: str) -> None:
    try:
        for name in MODULES:
            build(name, kernel)
    except (GuestError, OSError) as err:
        unavailable(f"test modules cannot be built for {kernel}: {err}")


def _addr(lines: tuple[str, ...], label: str) -> int:
    """The hex address printed after `label` in a module's kernel log lines."""
    for line in lines:
        m = re.search(re.escape(label) + r"\s*([0-9a-f]{16})", line)
        if m:
            return int(m.group(1), 16)
    raise AssertionError(f"no {label!r} in {lines}")


@dataclass
class GuestView:
    """What kscan reads from the guest's memory, right now."""

    modules: ModuleList
    slide: int
    words: dict[int, int]        # u64 at each VA asked for (missing: unreadable)
    nx: dict[int, bool | None]   # NX of each VA asked for (None: unmapped)
    names: dict[int, str | None]  # each VA asked for named from its module's symbols


def view(g: Guest, profile: KernelProfile, u64_at: tuple[int, ...] = (),
         mapped: tuple[int, ...] = (), named: tuple[int, ...] = ()) -> GuestView:
    async def go() -> GuestView:
        vm, lk = await live_kernel(g.qmp_aux, profile)
        try:
            walker = vm.walker()
            read = walker_reader(walker)
            ml = read_guest_modules(profile, lk.slide, read)
            words = {}
            for va in u64_at:
                b = read(va, 8)
                if b is not None:
                    words[va] = struct.unpack("<Q", b)[0]
            nx = {}
            for va in mapped:
                m = walker.try_translate(va)
                nx[va] = None if m is None else m.nx
            names: dict[int, str | None] = {}
            for va in named:
                hit = ml.owner(va)
                syms = (read_module_symbols(KernelReader(read), profile.layouts, hit[0])
                        if hit is not None and profile.layouts is not None else None)
                names[va] = syms.symbolize(va) if syms is not None else None
            return GuestView(ml, lk.slide, words, nx, names)
        finally:
            await vm.close()

    return run(go())


def inspect_json(g: Guest, db: str) -> dict:
    out = kscan("inspect", "--qmp", str(g.qmp_aux), "--db", db, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------- 6.1


@pytest.fixture(scope="module")
def mguest(guests: GuestPool) -> Guest:
    _build_all("6.1")
    (g,) = guests.boot(GuestSpec("mods61"))
    return g


@pytest.fixture(scope="module")
def mdb(mguest: Guest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Profile and golden baseline, taken from the module guest before any module."""
    path = str(tmp_path_factory.mktemp("mods") / "kscan.db")
    added = kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", path)
    assert added.returncode == 0 and "struct layouts from BTF" in added.stdout, added
    base = kscan("baseline", "--qmp", str(mguest.qmp_aux), "--db", path)
    assert base.returncode == 0, base.stderr
    return path


def test_run_reports_a_module_loaded_then_unloaded(mguest: Guest, mdb: str,
                                                   tmp_path: Path) -> None:
    proc = RunProc(["--qmp", str(mguest.qmp), "--db", mdb, "--interval", str(INTERVAL),
                    "--forensics-dir", str(tmp_path / "forensics")], tmp_path / "run.err")
    try:
        proc.wait_for(lambda e: e["event"] == "vm_clean" and e["vm"] == "mods61", 300)
        assert not proc.of("module_loaded")        # nothing loaded at the first read
        mark = proc.mark()
        loaded = load(mguest, "kscan_benign")
        assert loaded.ok, loaded
        text = _addr(loaded.lines, "text")
        ev = proc.wait_for(lambda e: e["event"] == "module_loaded", 30, mark)
        assert ev["name"] == "kscan_benign" and ev["sig_ok"] is False
        assert ev["initial"] is False and ev["severity"] == "warning" and "E" in ev["taint"]
        assert any(a["base"] <= text < a["base"] + a["size"] for a in ev["text"]), ev
        mark = proc.mark()
        rc, out = mguest.run("rmmod kscan_benign")
        assert rc == 0, out
        ev = proc.wait_for(lambda e: e["event"] == "module_unloaded", 30 + 30 * INTERVAL,
                           mark)
        assert ev["name"] == "kscan_benign" and ev["severity"] == "notice"
    finally:
        assert proc.stop() == 0
    assert not proc.bad_lines


def test_inspect_lists_the_benign_module(mguest: Guest, mdb: str,
                                         kernel_profile: KernelProfile) -> None:
    loaded = load(mguest, "kscan_benign")
    assert loaded.ok, loaded
    rep = inspect_json(mguest, mdb)
    mods = {m["name"]: m for m in rep["modules"]["modules"]}
    assert rep["modules"]["complete"] is True
    ben = mods["kscan_benign"]
    assert ben["sig_ok"] is False and ben["state"] == "live" and "E" in ben["taint"]
    text = _addr(loaded.lines, "text")
    assert any(a["kind"] == "text" and a["base"] <= text < a["base"] + a["size"]
               for a in ben["memory"])
    out = kscan("inspect", "--qmp", str(mguest.qmp_aux), "--db", mdb)
    assert re.search(r"kscan_benign\s+live\s+UNSIGNED\s+taint OE", out.stdout), out.stdout


def test_ftrace_ipmodify_hook_from_a_module(mguest: Guest, kernel_profile: KernelProfile
                                            ) -> None:
    loaded = load(mguest, "kscan_ftrace_hook")
    assert loaded.ok, loaded
    rc, out = mguest.run("touch /tmp/kscan_hide_me /tmp/plain_file && ls /tmp")
    assert rc == 0 and "plain_file" in out and "kscan_hide_me" not in out, out
    assert mguest.run("cat /tmp/kscan_hide_me && echo opened")[1].strip() == "opened"
    assert int(mguest.run("cat /sys/module/kscan_ftrace_hook/parameters/hidden")[1]) >= 1
    rc, out = mguest.run("cat /sys/kernel/tracing/enabled_functions")
    assert re.search(r"__x64_sys_getdents64 .*R I .*\[kscan_ftrace_hook\]", out), out
    # What attribution will need: the ops and the hook function are in the module.
    ops, func = _addr(loaded.lines, "(ops"), _addr(loaded.lines, "->")
    v = view(mguest, kernel_profile, named=(func, func + 3))
    assert v.names[func] == "hook_getdents64 [kscan_ftrace_hook]"
    assert v.names[func + 3] == "hook_getdents64+0x3 [kscan_ftrace_hook]"
    for addr, kinds in ((func, ("text",)), (ops, ("data", "rodata", "ro_after_init"))):
        hit = v.modules.owner(addr)
        assert hit is not None and hit[0].name == "kscan_ftrace_hook", (hex(addr), hit)
        assert hit[1].kind in kinds


def test_kprobe_with_a_handler_in_a_module(mguest: Guest, kernel_profile: KernelProfile
                                           ) -> None:
    loaded = load(mguest, "kscan_kprobe")
    assert loaded.ok, loaded
    mguest.run("sync; sync")
    assert int(mguest.run("cat /sys/module/kscan_kprobe/parameters/hits")[1]) >= 2
    handler, kp = _addr(loaded.lines, "handler"), _addr(loaded.lines, "(kprobe")
    v = view(mguest, kernel_profile, named=(handler,))
    assert v.names[handler] == "pre [kscan_kprobe]"
    hit = v.modules.owner(handler)
    assert hit is not None and hit[0].name == "kscan_kprobe" and hit[1].kind == "text"
    hit = v.modules.owner(kp)
    assert hit is not None and hit[0].name == "kscan_kprobe"


def test_a_module_that_hides_then_hooks(mguest: Guest, mdb: str,
                                        kernel_profile: KernelProfile) -> None:
    loaded = load(mguest, "kscan_hide")
    assert loaded.ok, loaded
    assert "unlinked from the module list" in loaded.lines[-1] and loaded.lines[-1].endswith(
        ": 0"), loaded.lines
    assert mguest.run("uname -n")[1].strip() == "kscan-ghost"
    assert "kscan_hide" not in mguest.run("cat /proc/modules")[1]
    rep = inspect_json(mguest, mdb)
    names = {m["name"] for m in rep["modules"]["modules"]}
    assert "kscan_hide" not in names and rep["modules"]["complete"]
    # Its hook function lies in no listed module: the finding attribution will make.
    hook = _addr(loaded.lines, "->")
    v = view(mguest, kernel_profile, mapped=(hook,))
    assert v.modules.owner(hook) is None and v.nx[hook] is False


def test_sys_call_table_entry_into_a_module(mguest: Guest, kernel_profile: KernelProfile
                                            ) -> None:
    loaded = load(mguest, "kscan_sct")
    assert loaded.ok, loaded
    hooked = _addr(loaded.lines, "->")
    table = kernel_profile.data_symbol("sys_call_table")
    assert table is not None
    probe = view(mguest, kernel_profile)
    entry = table + probe.slide + 8 * 110
    assert _addr(loaded.lines, "sys_call_table") == table + probe.slide
    v = view(mguest, kernel_profile, u64_at=(entry,))
    assert v.words[entry] == hooked
    hit = v.modules.owner(hooked)
    assert hit is not None and hit[0].name == "kscan_sct" and hit[1].kind == "text"


def test_executable_page_left_by_a_module(mguest: Guest, mdb: str,
                                          kernel_profile: KernelProfile) -> None:
    # vanish=1 first: its init fails, so the kernel frees the module (and its sysfs
    # entry, which a second load of the same name would collide with).
    gone = load(mguest, "kscan_exec_page", "vanish=1")
    assert not gone.ok and "the page stays" in gone.lines[-1], gone
    page2 = _addr(gone.lines, "page at")
    loaded = load(mguest, "kscan_exec_page")
    assert loaded.ok, loaded
    assert "returned 4b53434e" in loaded.lines[-2], loaded.lines
    page = _addr(loaded.lines[-2:], "page at")
    assert page != page2
    v = view(mguest, kernel_profile, mapped=(page, page2))
    names = v.modules.names()
    assert "kscan_exec_page" not in names and v.modules.complete
    for p in (page, page2):
        assert v.nx[p] is False and v.modules.owner(p) is None


# ---------------------------------------------------------------------------- 6.12


@pytest.fixture(scope="module")
def guest612(guests: GuestPool) -> Guest:
    _build_all("6.12")
    (g,) = guests.boot(GuestSpec("mods612", kernel="6.12"))
    return g


def test_612_module_list_from_mem_layout(guest612: Guest) -> None:
    profile = profile_from_path(ensure_kernel("6.12").vmlinuz)
    assert profile.layouts is not None and "mem" in profile.layouts["module"]
    # The hiding module alone first: listed nowhere, but its taint stays on the kernel.
    hide = load(guest612, "kscan_hide")
    assert hide.ok, hide
    v = view(guest612, profile)
    assert v.modules.complete and len(v.modules) == 0
    assert v.modules.to_json()["unexplained_taint"] == "OE"
    ben = load(guest612, "kscan_benign")
    hook = load(guest612, "kscan_ftrace_hook")
    assert ben.ok and hook.ok, (ben, hook)
    assert guest612.run("uname -n")[1].strip() == "kscan-ghost"
    _, out = guest612.run("touch /tmp/kscan_hide_x /tmp/shown && ls /tmp")
    assert "shown" in out and "kscan_hide_x" not in out, out
    text = _addr(ben.lines, "text")
    v = view(guest612, profile, named=(text,))
    assert v.modules.complete
    assert v.names[text] == "kscan_benign_hits [kscan_benign]"
    mods = {m.name: m for m in v.modules}
    assert set(mods) == {"kscan_benign", "kscan_ftrace_hook"}
    assert mods["kscan_benign"].sig_ok is False and "E" in mods["kscan_benign"].taint
    kinds = {a.kind for a in mods["kscan_benign"].memory}
    assert {"text", "data"} <= kinds, kinds
    hit = v.modules.owner(text)
    assert hit is not None and hit[0].name == "kscan_benign" and hit[1].kind == "text"
    assert v.modules.owner(_addr(hide.lines, "->")) is None


def test_module_names_are_known() -> None:
    assert Path(__file__).with_name("modules").joinpath("kscan_benign.c").exists()
    assert set(MODULES) == {p.stem for p in Path(__file__).with_name("modules").glob("*.c")}

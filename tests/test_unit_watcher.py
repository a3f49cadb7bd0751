"""One VM watcher's whole life against a replayed VM, without booting anything.

The VM is a replay directory (`scanner.vm.replay`) whose memory file is built here: a
small synthetic kernel (`.text`, `.rodata`, `__ex_table`, `.notes` with the build-id
note, an IDT whose gates point into the slid `.text`) mapped by real page tables
(`tests.synthetic.SyntheticRam`) at a 2 MiB-aligned KASLR slide — so the real
`locate_kernel` identifies it. The profile is a `KernelProfile` made directly and stored
like `kscan profile add`; the golden baseline comes from `baseline_vms` on a second
replayed VM of the same kernel at another slide.

The test then drives the life by rewriting the memory file in place (kscan maps it
MAP_SHARED read-only, so it sees the writes): .text writable (not booted) → read-only
(identified, clean) → 5 bytes written into a .text page (tamper) → restored (cleared) →
the same kernel at another slide (rebooted) → QMP gone (lost). The watcher talks to a
small context of this file's own (`Ctx`), through the `WatchContext` protocol only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

import scanner.run.watcher as watcher_mod
from scanner.check.verify import CheckReport
from scanner.commands.oneshot import baseline_vms
from scanner.errors import QmpError
from scanner.examine import Examined, GoldenSet, golden_for, load_profiles
from scanner.hashing import file_page_fingerprints
from scanner.image.kernel_profile import KernelProfile, SectionInfo
from scanner.image.patchsites import PatchSites
from scanner.image.relocs import RegionRelocs
from scanner.qemu.qmp import RunState
from scanner.run.actions import Action, ActionKind
from scanner.run.scheduler import Policy, Scheduler
from scanner.run.watcher import VmWatcher, WatchState
from scanner.vm import SourceKind, VmSource
from scanner.vm.bootprofile import BootProfile
from scanner.vm.progress import Sample
from scanner.vm.replay import ReplayVm, write_replay
from store import Store
from tests.synthetic import NX, PAGE, RW, P, SyntheticRam
from translate.vcpu import VcpuState
from translate.x86 import CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_NXE

T = TypeVar("T")

# -- the synthetic kernel -------------------------------------------------------------

RAM = 4 << 20
#: Link-time layout: (address, size). `.notes` is not protected but must be readable:
#: the slide search confirms the build id from it.
LINK = {".text": (0xFFFF_FFFF_8100_0000, 8 * PAGE),
        ".rodata": (0xFFFF_FFFF_8200_0000, 4 * PAGE),
        "__ex_table": (0xFFFF_FFFF_8210_0000, 0x800),
        ".notes": (0xFFFF_FFFF_8220_0000, 36)}
#: Where each section sits in the loaded image (offset from the physical load address).
IMAGE_OFFSET = {".text": 0, ".rodata": 8 * PAGE, "__ex_table": 12 * PAGE,
                ".notes": 13 * PAGE}
IDT_VA = 0xFFFF_FE00_0000_0000
IDT_GPA = 0x8_0000
BUILD_ID = bytes(range(0xA0, 0xB4))  # 20 bytes, like a SHA-1 build id
PER_BOOT_PAGE = 3  # the .rodata page every boot writes (__ro_after_init)
TAMPER_PAGE, TAMPER_AT = 2, 0x40

GOLDEN_SLIDE = 0x0C00_0000
SLIDE = 0x1E00_0000
REBOOT_SLIDE = 0x2A40_0000
BOOT = BootProfile("qemu64-x86_64-cpu", "f00d", 1, smep=False, smap=False)
POLL = 0.05


def _content() -> dict[str, bytes]:
    rnd = random.Random(1234)
    notes = struct.pack("<III", 4, len(BUILD_ID), 3) + b"GNU\0" + BUILD_ID
    return {".text": rnd.randbytes(LINK[".text"][1]),
            ".rodata": rnd.randbytes(LINK[".rodata"][1]),  # as in the image file
            "__ex_table": rnd.randbytes(LINK["__ex_table"][1]),
            ".notes": notes}


CONTENT = _content()


def make_profile() -> KernelProfile:
    sections = {n: SectionInfo(n, a, s) for n, (a, s) in LINK.items()}
    return KernelProfile(
        build_id=BUILD_ID.hex(), release="6.1.0-synthetic",
        version="Linux version 6.1.0-synthetic (kscan tests)",
        sections=sections,
        relocs={n: RegionRelocs.empty() for n in (".text", ".rodata", "__ex_table")},
        text_head=CONTENT[".text"][:PAGE], ex_table=CONTENT["__ex_table"],
        rodata_file_pages=tuple(file_page_fingerprints(CONTENT[".rodata"])))


def build_ram(slide: int, load_gpa: int, boot_salt: int, *, text_writable: bool) -> SyntheticRam:
    """Guest RAM of one boot: the kernel loaded at `load_gpa`, mapped at its link
    addresses + `slide`, its IDT at IDT_VA; `boot_salt` is what this boot wrote into
    its per-boot .rodata page. Tables are allocated in the same order for every boot,
    so the PGD (and its kernel-half entries) sit at the same GPAs."""
    ram = SyntheticRam(RAM)
    for name, (addr, size) in LINK.items():
        gpa = load_gpa + IMAGE_OFFSET[name]
        data = bytearray(CONTENT[name])
        if name == ".rodata":
            at = PER_BOOT_PAGE * PAGE + 16
            data[at:at + 8] = boot_salt.to_bytes(8, "little")
        ram.data[gpa:gpa + size] = data
        flags = (P | RW if text_writable else P) if name == ".text" else P | NX
        for off in range(0, size, PAGE):
            ram.map(addr + slide + off, gpa + off, flags=flags)
    text_va = LINK[".text"][0] + slide
    for v in range(256):  # present interrupt gates, handlers inside the slid .text
        h = text_va + 16 * v
        struct.pack_into("<HHBBHII", ram.data, IDT_GPA + 16 * v, h & 0xFFFF, 0x10, 0, 0x8E,
                         (h >> 16) & 0xFFFF, h >> 32, 0)
    ram.map(IDT_VA, IDT_GPA, flags=P | NX)
    return ram


def vcpus(ram: SyntheticRam) -> list[VcpuState]:
    return [VcpuState(0, CR0_PG | CR0_WP | 1, ram.pgd, CR4_PAE, EFER_LMA | EFER_NXE | 0x100,
                      IDT_VA, 0xFFF, 0, 0x7F, 0, 0, False)]


def write_vm(directory: Path, name: str, ram: SyntheticRam) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mem").write_bytes(ram.data)
    write_replay(directory, name, [{"gpa": 0, "size": RAM, "file": "mem", "offset": 0}],
                 vcpus(ram), BOOT)
    return directory / "mem"


def leaf_entry_gpa(ram: SyntheticRam, va: int) -> int:
    """GPA of the 4 KiB leaf page-table entry that maps `va`."""
    table = ram.pgd
    for shift in ram.shifts()[:-1]:
        table = ram.get(table + ((va >> shift) & 0x1FF) * 8) & 0x000F_FFFF_FFFF_F000
    return table + ((va >> 12) & 0x1FF) * 8


def poke(path: Path, gpa: int, data: bytes) -> None:
    """Write into the guest's RAM file in place (never truncating: kscan has it mapped)."""
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, gpa) == len(data)
    finally:
        os.close(fd)


# -- the VM and the watcher's context -------------------------------------------------

class LosableVm(ReplayVm):
    """A replayed VM whose QMP connection can go away, as when QEMU exits."""

    lost: str | None = None
    closed = False
    reset_count = 0  # QMP RESET events "seen"

    def resets(self) -> int:
        return self.reset_count

    def _gone(self, command: str) -> None:
        if self.lost is not None:
            raise QmpError(self.lost, socket=str(self.directory), command=command)

    async def refresh_vcpus(self) -> list[VcpuState]:
        self._gone("query-cpus-fast")
        return await super().refresh_vcpus()

    async def run_state(self) -> RunState:
        self._gone("query-status")
        return await super().run_state()

    async def close(self) -> None:
        self.closed = True
        await super().close()


class Ctx:
    """A `WatchContext` of the test's own: events in a list, a real scheduler and store."""

    def __init__(self, store: Store, forensics_dir: Path) -> None:
        self.store = store
        self.scheduler = Scheduler(Policy(auto=False, fixed=POLL, budget=None,
                                          min_interval=0.01))
        self.action = Action(ActionKind.REPORT)
        self.forensics_dir = forensics_dir
        self.strict = False
        self.trusted_modules: frozenset[str] = frozenset()
        self.events: list[dict[str, Any]] = []
        self.scans = 0
        self._slots = asyncio.Semaphore(1)

    async def emit(self, event: str, vm: str | None, **fields: Any) -> dict[str, Any]:
        ev = {"ts": time.time(), "event": event, "vm": vm, **fields}
        self.events.append(ev)
        return ev

    async def profiles(self) -> list[KernelProfile]:
        return await load_profiles(self.store)

    async def golden(self, ex: Examined) -> GoldenSet:
        return await golden_for(self.store, ex)

    async def timed_in_worker(self, fn: Callable[[], T], vm: str | None = None) -> T:
        return fn()

    @contextlib.asynccontextmanager
    async def slow_slot(self) -> AsyncIterator[None]:
        async with self._slots:
            yield

    def count_scan(self, keyed: bool = False, cpu_seconds: float = 0.0) -> None:
        self.scans += 1

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    async def wait(self, kind: str, since: int, timeout: float = 5.0) -> dict[str, Any]:
        """The first event `kind` at index >= `since`, waiting at most `timeout`."""
        async def poll() -> dict[str, Any]:
            while True:
                for e in self.events[since:]:
                    if e["event"] == kind:
                        return e
                await asyncio.sleep(0.01)
        try:
            return await asyncio.wait_for(poll(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {kind} event within {timeout}s; "
                                 f"events since: {self.kinds()[since:]}") from None

    async def scans_after(self, n: int, timeout: float = 5.0) -> None:
        """Wait until `n` more fast scans have run."""
        target = self.scans + n

        async def poll() -> None:
            while self.scans < target:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(poll(), timeout)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A database with the synthetic kernel's profile and its golden baseline (taken
    from a clean VM at GOLDEN_SLIDE, loaded at another GPA, with its own per-boot data)."""
    monkeypatch.setattr(watcher_mod, "BOOT_POLL", POLL)
    monkeypatch.setattr(watcher_mod, "STATE_EVERY", POLL)
    return {"db": golden_db(tmp_path), "tmp": tmp_path}


def golden_db(tmp_path: Path) -> Path:
    """A database in `tmp_path` with the synthetic kernel's profile and its golden
    baseline, taken from a clean replayed VM at GOLDEN_SLIDE."""
    db = tmp_path / "kscan.db"
    prof = make_profile()

    async def setup() -> None:
        async with Store.open(db) as st:
            assert await st.add_profile(prof.build_id, prof.release, prof.version,
                                        prof.to_bytes())
        golden_dir = tmp_path / "golden"
        write_vm(golden_dir, "golden", build_ram(GOLDEN_SLIDE, 0x30_0000, 0x1111,
                                                 text_writable=False))
        (res,) = await baseline_vms([VmSource(SourceKind.REPLAY, str(golden_dir))], str(db))
        assert res.build.regions[".rodata"].per_boot_pages() == [PER_BOOT_PAGE]

    asyncio.run(asyncio.wait_for(setup(), 20))
    return db


async def _start(world: dict[str, Any], st: Store, ram: SyntheticRam
                 ) -> tuple[Ctx, LosableVm, VmWatcher, asyncio.Task[None], Path]:
    mem = write_vm(world["tmp"] / "life", "life", ram)
    ctx = Ctx(st, world["tmp"] / "forensics")
    vm = await LosableVm.open(world["tmp"] / "life")
    assert isinstance(vm, LosableVm)
    w = VmWatcher(ctx, vm, "replay:" + str(world["tmp"] / "life"))
    assert state_of(w) is WatchState.ATTACHED
    return ctx, vm, w, asyncio.create_task(w.run()), mem


def state_of(w: VmWatcher) -> WatchState:
    """The watcher's state now (a call, so a type checker does not narrow it)."""
    return w.state


async def _finish(task: asyncio.Task[None], timeout: float = 3.0) -> None:
    await asyncio.wait_for(task, timeout)


# -- the life ---------------------------------------------------------------------------

def test_a_watchers_whole_life(world: dict[str, Any]) -> None:
    asyncio.run(asyncio.wait_for(_life(world), 20))


async def _life(world: dict[str, Any]) -> None:
    booting = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=True)
    async with Store.open(world["db"]) as st:
        ctx, vm, w, task, mem = await _start(world, st, booting)
        name = vm.name

        # 1. Still booting: .text is writable (mark_rodata_ro() has not run). Said once,
        #    polled again every BOOT_POLL.
        ev = await ctx.wait("vm_booting", 0)
        assert "not finished booting" in ev["message"] and ".text" in ev["message"]
        assert ev["vm"] == name
        assert state_of(w) is WatchState.BOOTING
        await asyncio.sleep(4 * POLL)
        assert ctx.kinds() == ["vm_booting"]
        assert state_of(w) is WatchState.BOOTING and w.ref is None

        # 2. Booted: .text read-only (rewrite its PTEs) → identified, checked, clean.
        text_va = LINK[".text"][0] + SLIDE
        text_gpa = 0x10_0000
        for off in range(0, LINK[".text"][1], PAGE):
            poke(mem, leaf_entry_gpa(booting, text_va + off),
                 struct.pack("<Q", (text_gpa + off) | P))
        ident = await ctx.wait("vm_identified", 1)
        clean = await ctx.wait("vm_clean", 1)
        assert ctx.kinds() == ["vm_booting", "vm_identified", "vm_clean"]
        assert ident["slide"] == hex(SLIDE)  # addresses are hex strings
        assert ident["build_id"] == BUILD_ID.hex() and ident["release"] == "6.1.0-synthetic"
        assert ident["boot_profile"] == BOOT.key
        assert ident["per_vm_baseline_taken"] is True
        assert clean["per_vm_baseline_taken"] is True
        assert clean["regions"][".text"] == {"pages": 8, "golden_checked": 8,
                                             "per_boot_checked": 0, "accepted": 0}
        assert clean["regions"][".rodata"] == {"pages": 4, "golden_checked": 3,
                                               "per_boot_checked": 1, "accepted": 0}
        assert state_of(w) is WatchState.WATCHING and w.slide == SLIDE
        state = await st.get_vm_state(name)
        assert state is not None and state["boot"]["slide"] == SLIDE
        await ctx.scans_after(3)  # fast scans go on, and find nothing
        assert ctx.kinds() == ["vm_booting", "vm_identified", "vm_clean"]

        # 3. Tamper: 5 bytes into a golden .text page.
        at = text_gpa + TAMPER_PAGE * PAGE + TAMPER_AT
        original = bytes(booting.data[at:at + 5])
        poke(mem, at, b"\xe9\x11\x22\x33\x44")
        tamper = await ctx.wait("tamper", 3)
        assert ctx.kinds()[3:] == ["tamper"]
        assert tamper["action"] == "report" and tamper["slide"] == hex(SLIDE)
        assert tamper["build_id"] == BUILD_ID.hex()
        assert tamper["findings"] == []
        (m,) = tamper["mismatches"]
        assert (m["region"], m["page"], m["basis"]) == (".text", TAMPER_PAGE, "golden")
        assert m["va"] == hex(text_va + TAMPER_PAGE * PAGE)
        assert m["gpa"] == hex(text_gpa + TAMPER_PAGE * PAGE)
        (r,) = m["ranges"]
        assert (r["start"], r["end"], r["after"]) == (TAMPER_AT, TAMPER_AT + 5, "e911223344")
        assert r["before"] == original.hex()
        forensics = Path(tamper["forensics"])
        assert forensics.parent.parent == ctx.forensics_dir
        for _ in range(200):  # written after the event, off the loop
            if (forensics / "baseline.json").is_file():
                break
            await asyncio.sleep(0.01)
        assert (forensics / "report.json").is_file()
        live = (forensics / "pages" / f"text-{TAMPER_PAGE:05d}.live.bin").read_bytes()
        assert live[TAMPER_AT:TAMPER_AT + 5] == b"\xe9\x11\x22\x33\x44"
        assert (forensics / "pages" / f"text-{TAMPER_PAGE:05d}.normalized.bin").is_file()
        assert (forensics / "baseline.json").is_file()
        assert state_of(w) is WatchState.WATCHING
        await ctx.scans_after(3)  # reported once per distinct set of changes
        assert ctx.kinds().count("tamper") == 1

        # 4. Restored → cleared.
        poke(mem, at, original)
        cleared = await ctx.wait("tamper_cleared", 4)
        assert ctx.kinds()[4:] == ["tamper_cleared"]
        assert cleared["vm"] == name
        assert state_of(w) is WatchState.WATCHING
        await ctx.scans_after(3)
        assert len(ctx.events) == 5

        # 5. Reboot: the whole RAM rewritten at once (no await in between) with the same
        #    kernel at another slide and load address, its own per-boot .rodata data;
        #    same PGD GPA, same IDT VA.
        rebooted = build_ram(REBOOT_SLIDE, 0x20_0000, 0x3333, text_writable=False)
        assert rebooted.pgd == booting.pgd
        poke(mem, 0, bytes(rebooted.data))
        reboot = await ctx.wait("vm_rebooted", 5)
        assert reboot["slide"] == hex(REBOOT_SLIDE)
        await ctx.scans_after(3)
        # Clean again: a new boot, so a new per-VM baseline (its per-boot .rodata page
        # is not the previous boot's); identified and reported clean like the first.
        assert ctx.kinds()[5:] == ["vm_rebooted", "vm_identified", "vm_clean"]
        assert ctx.events[6]["slide"] == hex(REBOOT_SLIDE)
        assert state_of(w) is WatchState.WATCHING and w.slide == REBOOT_SLIDE
        assert w.last_report is not None and not w.last_report.tampered
        assert w.last_report.per_vm_baseline_taken
        state = await st.get_vm_state(name)
        assert state is not None
        assert state["boot"]["slide"] == REBOOT_SLIDE

        # 6. Gone: QEMU exited, its QMP socket closed → vm_lost, and the watcher stops.
        vm.lost = "connection closed"
        await _finish(task)
        lost = ctx.events[-1]
        assert ctx.kinds() == ["vm_booting", "vm_identified", "vm_clean", "tamper",
                               "tamper_cleared", "vm_rebooted", "vm_identified", "vm_clean",
                               "vm_lost"]
        assert lost["vm"] == name and "connection closed" in lost["reason"]
        assert vm.closed and w.ref is None
        assert name not in ctx.scheduler._costs and name not in ctx.scheduler._hot_until


# -- going away before and while watching ---------------------------------------------------

def test_a_vm_shut_down_while_booting_is_lost(world: dict[str, Any]) -> None:
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=True)
            ctx, vm, _, task, _ = await _start(world, st, ram)
            await ctx.wait("vm_booting", 0)
            vm._state = "shutdown"
            await _finish(task)
            assert ctx.kinds() == ["vm_booting", "vm_lost"]
            assert ctx.events[-1]["reason"] == "VM is shutdown"
            assert vm.closed and vm.name not in ctx.scheduler._costs

    asyncio.run(asyncio.wait_for(go(), 10))


def test_a_vm_shut_down_while_watching_is_lost(world: dict[str, Any]) -> None:
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            ctx, vm, _, task, _ = await _start(world, st, ram)
            await ctx.wait("vm_clean", 0)
            vm._state = "shutdown"  # QEMU -no-shutdown (libvirt): QMP stays up
            try:
                # Expected (docs/operating.md: vm_lost "the VM ... went away"; RunStatus.gone: "will
                # not run its kernel again without a reset"): the watcher ends.
                await _finish(task, timeout=1.0)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert ctx.kinds()[-1] == "vm_lost"

    asyncio.run(asyncio.wait_for(go(), 10))


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_replayed_vm_whose_recording_goes_away_is_lost(world: dict[str, Any],
                                                         how: str) -> None:
    """A replayed VM's directory removed (powered off) or replaced by another recording
    under the same name (rebooted): the watcher ends, so its old files are not mapped and
    scanned forever, and the new recording is attached afresh (`perf/soak.py`)."""
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            ctx, vm, _, task, _ = await _start(world, st, ram)
            await ctx.wait("vm_clean", 0)
            d = world["tmp"] / "life"
            if how == "removed":
                shutil.rmtree(d)
            else:
                write_vm(world["tmp"] / "other", "life", ram)
                shutil.rmtree(d)
                (world["tmp"] / "other").rename(d)
            await _finish(task, timeout=5.0)
            assert ctx.kinds()[-1] == "vm_lost"
            assert ctx.events[-1]["reason"] == "VM is shutdown"
            assert vm.closed and vm.name not in ctx.scheduler._costs

    asyncio.run(asyncio.wait_for(go(), 10))


def test_a_qemu_reset_retakes_the_per_vm_baseline_even_at_the_same_slide(
        world: dict[str, Any]) -> None:
    """A reboot that lands on the same slide is told by QEMU's RESET event: the VM's
    per-boot pages are taken afresh (the new boot wrote them anew), not reported."""
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            ctx, vm, _, task, mem = await _start(world, st, ram)
            await ctx.wait("vm_clean", 0)
            mark = len(ctx.events)
            # The "new boot": same kernel, same slide, its own per-boot .rodata data.
            again = build_ram(SLIDE, 0x10_0000, 0x4444, text_writable=False)
            poke(mem, 0, bytes(again.data))
            vm.reset_count += 1
            await ctx.wait("vm_clean", mark)
            assert ctx.kinds()[mark:] == ["vm_booting", "vm_identified", "vm_clean"]
            assert "reset" in ctx.events[mark]["message"]
            assert ctx.events[mark + 1]["per_vm_baseline_taken"]
            assert "tamper" not in ctx.kinds()
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 10))


def test_without_a_reset_new_per_boot_bytes_at_the_same_slide_are_tampering(
        world: dict[str, Any]) -> None:
    """The same rewrite with no reset: the guest cannot reset its per-boot baseline."""
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            ctx, vm, _, task, mem = await _start(world, st, ram)
            await ctx.wait("vm_clean", 0)
            again = build_ram(SLIDE, 0x10_0000, 0x4444, text_writable=False)
            poke(mem, 0, bytes(again.data))
            ev = await ctx.wait("tamper", 0)
            assert [(m["region"], m["page"], m["basis"]) for m in ev["mismatches"]] == [
                (".rodata", PER_BOOT_PAGE, "per-boot")]
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 10))


# -- a reboot seen through its boot window ------------------------------------------------

async def _reboot_through_boot_window(world: dict[str, Any], *, tampered: bool
                                      ) -> tuple[Ctx, CheckReport | None, list[str]]:
    """Watch a clean VM (tampered once if `tampered`), then reboot it the way real
    reboots are usually seen: a fast scan first finds the new kernel still booting
    (.text writable), then booted at another slide — with the same 5 bytes written
    into it again if `tampered` (a rootkit that reinstalls itself at boot)."""
    async with Store.open(world["db"]) as st:
        ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
        ctx, vm, w, task, mem = await _start(world, st, ram)
        await ctx.wait("vm_clean", 0)
        patch = b"\xe9\x11\x22\x33\x44"
        if tampered:
            poke(mem, 0x10_0000 + TAMPER_PAGE * PAGE + TAMPER_AT, patch)
            await ctx.wait("tamper", 0)
        mark = len(ctx.events)
        boot = build_ram(REBOOT_SLIDE, 0x20_0000, 0x3333, text_writable=True)
        if tampered:
            at = 0x20_0000 + TAMPER_PAGE * PAGE + TAMPER_AT
            boot.data[at:at + 5] = patch
        poke(mem, 0, bytes(boot.data))
        await ctx.wait("vm_booting", mark)
        assert state_of(w) is WatchState.BOOTING and w.ref is None
        text_va = LINK[".text"][0] + REBOOT_SLIDE
        for off in range(0, LINK[".text"][1], PAGE):
            poke(mem, leaf_entry_gpa(boot, text_va + off), struct.pack("<Q", (0x20_0000 + off) | P))
        await ctx.wait("vm_identified", mark)
        await ctx.scans_after(3)
        assert state_of(w) is WatchState.WATCHING and w.slide == REBOOT_SLIDE
        report = w.last_report  # the check of the new boot (dropped when the VM goes)
        vm.lost = "connection closed"
        await _finish(task)
        return ctx, report, ctx.kinds()[mark:]


def test_a_reboot_seen_while_booting_says_vm_rebooted(world: dict[str, Any]) -> None:
    ctx, _, kinds = asyncio.run(asyncio.wait_for(
        _reboot_through_boot_window(world, tampered=False), 15))
    # (vm_booting is said twice: "kernel no longer found" by the scan, then "not
    # finished booting" by the wait for boot — not asserted here.)
    assert kinds[0] == "vm_booting" and "vm_identified" in kinds
    assert "vm_rebooted" in kinds
    rebooted = next(e for e in ctx.events if e["event"] == "vm_rebooted")
    assert rebooted["slide"] == hex(REBOOT_SLIDE)


def test_the_same_tampering_after_a_reboot_is_reported_again(world: dict[str, Any]) -> None:
    _, report, kinds = asyncio.run(asyncio.wait_for(
        _reboot_through_boot_window(world, tampered=True), 15))
    # (vm_booting is said twice: "kernel no longer found" by the scan, then "not
    # finished booting" by the wait for boot — not asserted here.)
    assert kinds[0] == "vm_booting" and "vm_identified" in kinds
    # The check of the new boot did find it...
    assert report is not None and report.tampered
    assert [(m.region, m.page) for m in report.mismatches] == [(".text", TAMPER_PAGE)]
    # ...and reported again, though it is the change reported before the reboot.
    assert "tamper" in kinds


# -- a restart of kscan: resuming from the persisted state ----------------------------------

class Counted:
    """Counts the slow paths (`examine`, `reexamine`) a watcher takes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.examines = 0
        real_examine, real_reexamine = watcher_mod.examine, watcher_mod.reexamine

        async def examine(*a: Any, **k: Any) -> Examined:
            self.examines += 1
            return await real_examine(*a, **k)

        async def reexamine(*a: Any, **k: Any) -> Examined:
            self.examines += 1
            return await real_reexamine(*a, **k)

        monkeypatch.setattr(watcher_mod, "examine", examine)
        monkeypatch.setattr(watcher_mod, "reexamine", reexamine)


async def _first_run(world: dict[str, Any], st: Store, ram: SyntheticRam
                     ) -> tuple[Path, dict[str, Any]]:
    """kscan's first run over the VM: checked in full, clean; then kscan stops."""
    ctx, vm, _, task, mem = await _start(world, st, ram)
    clean = await ctx.wait("vm_clean", 0)
    assert clean["per_vm_baseline_taken"] and "resumed" not in clean
    assert await st.get_resume(vm.name) is not None
    vm.lost = "kscan stopped"
    await _finish(task)
    return mem, clean


async def _second_run(world: dict[str, Any], st: Store
                      ) -> tuple[Ctx, LosableVm, VmWatcher, asyncio.Task[None]]:
    """kscan started again over the same VM (its memory as the test left it)."""
    ctx = Ctx(st, world["tmp"] / "forensics")
    vm = await LosableVm.open(world["tmp"] / "life")
    assert isinstance(vm, LosableVm)
    w = VmWatcher(ctx, vm, "replay:" + str(world["tmp"] / "life"))
    return ctx, vm, w, asyncio.create_task(w.run())


def test_a_restart_resumes_an_unchanged_vm_with_one_fast_pass(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM did not change while kscan was down: its verdict comes from one fast pass
    against the persisted state, with no slow path; watching goes on from there (a
    tampering afterwards is found and localized as always)."""
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            mem, first = await _first_run(world, st, ram)
            counted = Counted(monkeypatch)
            ctx, vm, w, task = await _second_run(world, st)
            clean = await ctx.wait("vm_clean", 0)
            assert ctx.kinds() == ["vm_identified", "vm_clean"]
            assert counted.examines == 0 and ctx.scans == 1  # one fast pass, no slow path
            ident = ctx.events[0]
            assert ident["resumed"] is True and ident["slide"] == hex(SLIDE)
            assert ident["build_id"] == BUILD_ID.hex() and ident["boot_profile"] == BOOT.key
            assert clean["resumed"] is True and clean["per_vm_baseline_taken"] is False
            assert clean["regions"] == first["regions"]
            assert w.resumed and state_of(w) is WatchState.WATCHING and w.slide == SLIDE
            assert ctx.scheduler.cost(vm.name) < 0.05  # learnt from that fast pass
            await ctx.scans_after(3)
            assert counted.examines == 0 and ctx.kinds() == ["vm_identified", "vm_clean"]
            # Watching after a resume finds a tampering like after a full check.
            poke(mem, 0x10_0000 + TAMPER_PAGE * PAGE + TAMPER_AT, b"\xe9\x11\x22\x33\x44")
            tamper = await ctx.wait("tamper", 2)
            assert [(m["region"], m["page"]) for m in tamper["mismatches"]] == [
                (".text", TAMPER_PAGE)]
            assert counted.examines == 1
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 15))


def test_a_vm_changed_while_kscan_was_down_takes_the_full_path(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            mem, _ = await _first_run(world, st, ram)
            poke(mem, 0x10_0000 + TAMPER_PAGE * PAGE + TAMPER_AT, b"\xe9\x11\x22\x33\x44")
            counted = Counted(monkeypatch)
            ctx, vm, w, task = await _second_run(world, st)
            tamper = await ctx.wait("tamper", 0)
            assert counted.examines == 1 and not w.resumed
            assert "vm_clean" not in ctx.kinds()
            assert "resumed" not in ctx.events[ctx.kinds().index("vm_identified")]
            (m,) = tamper["mismatches"]
            assert (m["region"], m["page"], m["basis"]) == (".text", TAMPER_PAGE, "golden")
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 15))


def test_a_vm_rebooted_while_kscan_was_down_takes_the_full_path(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another slide: other page-table entries, other bytes — a new boot, checked in
    full, with a new per-VM baseline."""
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            mem, _ = await _first_run(world, st, ram)
            rebooted = build_ram(REBOOT_SLIDE, 0x20_0000, 0x3333, text_writable=False)
            poke(mem, 0, bytes(rebooted.data))
            counted = Counted(monkeypatch)
            ctx, vm, w, task = await _second_run(world, st)
            clean = await ctx.wait("vm_clean", 0)
            assert counted.examines == 1 and not w.resumed
            assert ctx.kinds() == ["vm_identified", "vm_clean"]
            assert ctx.events[0]["slide"] == hex(REBOOT_SLIDE) and "resumed" not in ctx.events[0]
            assert clean["per_vm_baseline_taken"] is True and "resumed" not in clean
            state = await st.get_vm_state(vm.name)
            assert state is not None and state["boot"]["slide"] == REBOOT_SLIDE
            vm.lost = "done"
            await _finish(task)
            # ...and the state persisted now is the new boot's: a restart resumes it.
            ctx2, vm2, w2, task2 = await _second_run(world, st)
            await ctx2.wait("vm_clean", 0)
            assert w2.resumed and counted.examines == 1 and w2.slide == REBOOT_SLIDE
            vm2.lost = "done"
            await _finish(task2)

    asyncio.run(asyncio.wait_for(go(), 15))


@pytest.mark.parametrize("corrupt", [
    b"", b"\x00\xff garbage", b"[]", b'{"format": 2}', b'{"format": 1}',
    "fields of the wrong type", "a saved run outside RAM", "another per-VM state",
])
def test_a_corrupt_or_stale_persisted_state_is_ignored(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, corrupt: bytes | str) -> None:
    """Whatever the persisted record holds, it is used only if it parses completely and
    proves the VM unchanged; otherwise the VM is checked in full, as on a first start,
    and a good record is written again."""
    async def go() -> None:
        import orjson

        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            await _first_run(world, st, ram)
            good = await st.get_resume("life")
            assert good is not None
            doc = orjson.loads(good)
            if corrupt == "fields of the wrong type":
                doc["slide"], doc["digests"][".text"] = str(doc["slide"]), 17
                blob = orjson.dumps(doc)
            elif corrupt == "a saved run outside RAM":
                doc["runs"][".text"] = [[RAM + 0x1000, PAGE]]
                blob = orjson.dumps(doc)
            elif corrupt == "another per-VM state":
                state = await st.get_vm_state("life")
                assert state is not None
                await st.put_vm_state("life", {**state, "taken_at": state["taken_at"] + 1})
                blob = good
            else:
                assert isinstance(corrupt, bytes)
                blob = corrupt
            await st.put_resume("life", blob)
            counted = Counted(monkeypatch)
            ctx, vm, w, task = await _second_run(world, st)
            clean = await ctx.wait("vm_clean", 0)
            assert counted.examines == 1 and not w.resumed and "resumed" not in clean
            assert "tamper" not in ctx.kinds()
            again = await st.get_resume("life")
            assert again is not None and again != blob
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 15))


def test_a_qemu_reset_drops_the_persisted_state(world: dict[str, Any]) -> None:
    """Deleting the per-VM state (a reset) deletes what the VM would resume from."""
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            await _first_run(world, st, ram)
            assert await st.delete_vm_state("life")
            assert await st.get_resume("life") is None

    asyncio.run(asyncio.wait_for(go(), 10))


def tracked_slot(plain: Callable[[Ctx], contextlib.AbstractAsyncContextManager[None]],
                 held: list[bool]) -> Callable[[Ctx], contextlib.AbstractAsyncContextManager[None]]:
    """`plain` (a context's `slow_slot`), with `held[0]` True while a slot is held."""
    @contextlib.asynccontextmanager
    async def slot(self: Ctx) -> AsyncIterator[None]:
        async with plain(self):
            held[0] = True
            try:
                yield
            finally:
                held[0] = False
    return slot


def test_qemu_is_asked_before_a_slow_path_slot_is_taken(world: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """A slow or hostile QMP peer must not hold one of the few slow-path slots every VM's
    slow path needs: registers and boot profile are asked for before a slot is taken
    (first checks, and full re-checks after a change)."""
    held = [False]
    asked_while_held: list[str] = []
    slot = tracked_slot(Ctx.slow_slot, held)

    def watch(name: str, fn: Any) -> Any:
        async def asked(self: LosableVm, *a: Any) -> Any:
            if held[0]:
                asked_while_held.append(name)
            return await fn(self, *a)
        return asked

    monkeypatch.setattr(Ctx, "slow_slot", slot)
    for name in ("refresh_vcpus", "boot_profile", "run_state"):
        monkeypatch.setattr(LosableVm, name, watch(name, getattr(LosableVm, name)))

    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            ctx, vm, _, task, mem = await _start(world, st, ram)
            await ctx.wait("vm_clean", 0)
            # A change to the IDT takes the full path (examine again).
            poke(mem, idt_gpa(ram), b"\x00\x11")
            await ctx.wait("tamper", 0)
            vm.lost = "done"
            await _finish(task)
            assert ctx.kinds()[:3] == ["vm_identified", "vm_clean", "tamper"]

    asyncio.run(asyncio.wait_for(go(), 10))
    assert asked_while_held == []


class BudgetCtx(Ctx):
    """A context with a CPU budget, charging worker CPU to the VM that caused it (as the
    engine does)."""

    def __init__(self, store: Store, forensics_dir: Path) -> None:
        super().__init__(store, forensics_dir)
        self.scheduler = Scheduler(Policy(auto=False, fixed=POLL, budget=1.0,
                                          min_interval=0.01))

    async def timed_in_worker(self, fn: Callable[[], T], vm: str | None = None) -> T:
        t0 = time.thread_time()
        try:
            return fn()
        finally:
            if vm is not None:
                self.scheduler.charge_vm(vm, time.thread_time() - t0)


def test_a_vm_past_its_slow_path_share_waits_says_so_and_holds_no_slot(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that changes its kernel in a loop must not spend the fleet's budget: once
    its checks have used their allowance, its next one waits for its share. It says so
    first (`slow_paced`, naming what waits), waits without a slow-path slot (other VMs'
    checks go on), and the change is still found and reported after the wait."""
    held = [False]
    turns_while_held: list[bool] = []
    slot = tracked_slot(BudgetCtx.slow_slot, held)
    plain_turn = Scheduler.slow_turn

    async def turn(self: Scheduler, vm: str) -> bool:
        turns_while_held.append(held[0])
        return await plain_turn(self, vm)

    monkeypatch.setattr(BudgetCtx, "slow_slot", slot)
    monkeypatch.setattr(Scheduler, "slow_turn", turn)

    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ram = build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False)
            mem = write_vm(world["tmp"] / "loop", "loop", ram)
            ctx = BudgetCtx(st, world["tmp"] / "forensics")
            vm = await LosableVm.open(world["tmp"] / "loop")
            assert isinstance(vm, LosableVm)
            task = asyncio.create_task(VmWatcher(ctx, vm, "replay:loop").run())
            await ctx.wait("vm_clean", 0)
            sched = ctx.scheduler
            assert sched.slow_level(vm.name) > 0  # its first check was charged to it
            # Its checks have spent the allowance and 0.3 CPU-s more: 1.2 s to drain at
            # a quarter of the budget, less what drains before its next pass sees the
            # change (the pass interval; more on a loaded machine).
            sched.charge_vm(vm.name, sched.slow_allowance() - sched.slow_level(vm.name)
                            + 0.3)
            mark = len(ctx.events)
            poke(mem, 0x10_0000 + 3 * PAGE + 0x40, b"\xcc\xcc")
            paced = await ctx.wait("slow_paced", mark)
            assert ".text" in paced["pending"] and paced["share"] == 0.25
            assert 0.4 <= paced["wait_s"] <= 1.2
            assert paced["level_cpu_s"] > paced["allowance_cpu_s"] == 7.5
            # The wait it names is the excess over the allowance at the drain rate.
            excess = paced["level_cpu_s"] - paced["allowance_cpu_s"]
            assert paced["wait_s"] == pytest.approx(excess / 0.25, abs=0.06)
            tamper = await ctx.wait("tamper", mark)
            # It waited before looking.
            assert tamper["ts"] - paced["ts"] >= paced["wait_s"] - 0.1
            assert sched.slow_paced == 1
            vm.lost = "done"
            await _finish(task)
            kinds = ctx.kinds()[mark:]
            assert kinds.index("slow_paced") < kinds.index("tamper")

    asyncio.run(asyncio.wait_for(go(), 15))
    assert turns_while_held == [False]


def idt_gpa(ram: SyntheticRam) -> int:
    return ram.mapped[IDT_VA][0]


# -- a tampering seen while the kernel patches itself: never only a log line ---------------

JL_SITE, JL_TARGET = 5 * PAGE + 0x10, 5 * PAGE + 0x80  # a jump label (offsets in .text)
NOP5 = b"\x0f\x1f\x44\x00\x00"


class SecondLook(VmWatcher):
    """A watcher whose pause before its second look runs `during` first (what the
    guest does in those 0.3 s)."""

    during: Callable[[], None] | None = None
    looks = 0

    async def _before_second_look(self) -> None:
        self.looks += 1
        if self.during is not None:
            self.during()
        await super()._before_second_look()


@pytest.fixture
def patching_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The synthetic kernel with one jump label (NOP5 in the image and the golden VM),
    so a VM with that label flipped is patching itself — verified, not tampering."""
    text = bytearray(CONTENT[".text"])
    text[JL_SITE:JL_SITE + 5] = NOP5
    monkeypatch.setitem(CONTENT, ".text", bytes(text))
    base = LINK[".text"][0]
    sites = PatchSites(
        jump_code=np.array([base + JL_SITE], dtype=np.uint64),
        jump_target=np.array([base + JL_TARGET], dtype=np.uint64),
        jump_key=np.array([LINK[".rodata"][0] + 8], dtype=np.uint64),
        function_starts=np.array([base, base + 5 * PAGE], dtype=np.uint64))
    real = make_profile
    monkeypatch.setattr(sys.modules[__name__], "make_profile",
                        lambda: dataclasses.replace(real(), patch_sites=sites))
    monkeypatch.setattr(watcher_mod, "BOOT_POLL", POLL)
    monkeypatch.setattr(watcher_mod, "STATE_EVERY", POLL)
    return {"db": golden_db(tmp_path), "tmp": tmp_path}


def _flipped(ram: SyntheticRam) -> SyntheticRam:
    """The jump label enabled (jmp to its own target), as the kernel patches it."""
    at = 0x10_0000 + JL_SITE
    ram.data[at:at + 5] = b"\xe9" + (JL_TARGET - (JL_SITE + 5)).to_bytes(4, "little",
                                                                           signed=True)
    return ram


async def _patching_vm(world: dict[str, Any], st: Store, kind: type[LosableVm] = LosableVm
                       ) -> tuple[Ctx, LosableVm, SecondLook, asyncio.Task[None], Path]:
    ram = _flipped(build_ram(SLIDE, 0x10_0000, 0x2222, text_writable=False))
    mem = write_vm(world["tmp"] / "life", "life", ram)
    ctx = Ctx(st, world["tmp"] / "forensics")
    vm = await kind.open(world["tmp"] / "life")
    assert isinstance(vm, kind)
    w = SecondLook(ctx, vm, "replay:" + str(world["tmp"] / "life"))
    task = asyncio.create_task(w.run())
    await ctx.wait("vm_clean", 0)
    assert "kernel_patched" in ctx.kinds() and "tamper" not in ctx.kinds()
    return ctx, vm, w, task, mem


def test_a_tampering_gone_on_the_second_look_is_a_critical_event(
        patching_world: dict[str, Any]) -> None:
    """Seen in a check that also verified patching, undone within the 0.3 s before the
    second look: before, only a log line said so. Now `tamper_transient`, with the
    bytes seen, and no action (the VM no longer shows it)."""
    async def go() -> None:
        async with Store.open(patching_world["db"]) as st:
            ctx, vm, w, task, mem = await _patching_vm(patching_world, st)
            at = 0x10_0000 + TAMPER_PAGE * PAGE + TAMPER_AT
            original = bytes(CONTENT[".text"][TAMPER_PAGE * PAGE + TAMPER_AT:][:5])
            w.during = lambda: poke(mem, at, original)  # the attacker undoes it at once
            mark = len(ctx.events)
            poke(mem, at, b"\xe9\x11\x22\x33\x44")
            ev = await ctx.wait("tamper_transient", mark)
            assert w.looks == 1
            assert ev["second_look"] == "clean" and ev["vm"] == vm.name
            (m,) = ev["mismatches"]
            assert (m["region"], m["page"]) == (".text", TAMPER_PAGE)
            (r,) = m["ranges"]
            assert (r["start"], r["after"], r["before"]) == (TAMPER_AT, "e911223344",
                                                             original.hex())
            assert ev["patched"]["mechanisms"] == {"jump_label": 1}
            await ctx.scans_after(3)
            assert "tamper" not in ctx.kinds() and "action" not in ctx.kinds()
            assert ctx.kinds().count("tamper_transient") == 1
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 15))


def test_a_tampering_still_there_on_the_second_look_is_a_tamper_only(
        patching_world: dict[str, Any]) -> None:
    async def go() -> None:
        async with Store.open(patching_world["db"]) as st:
            ctx, vm, w, task, mem = await _patching_vm(patching_world, st)
            mark = len(ctx.events)
            poke(mem, 0x10_0000 + TAMPER_PAGE * PAGE + TAMPER_AT, b"\xe9\x11\x22\x33\x44")
            ev = await ctx.wait("tamper", mark)
            assert w.looks == 1 and ev["patched"] is not None
            await ctx.scans_after(3)
            assert "tamper_transient" not in ctx.kinds()
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 15))


def test_a_different_tampering_on_the_second_look_reports_both(
        patching_world: dict[str, Any]) -> None:
    """Undone and replaced by another change in the pause: the first as transient, the
    second as a tamper — the first sighting's bytes are not lost."""
    async def go() -> None:
        async with Store.open(patching_world["db"]) as st:
            ctx, vm, w, task, mem = await _patching_vm(patching_world, st)
            at = 0x10_0000 + TAMPER_PAGE * PAGE + TAMPER_AT
            w.during = lambda: poke(mem, at, b"\xe9\x55\x66\x77\x88")
            mark = len(ctx.events)
            poke(mem, at, b"\xe9\x11\x22\x33\x44")
            first = await ctx.wait("tamper_transient", mark)
            second = await ctx.wait("tamper", mark)
            assert first["second_look"] == "tampered"
            assert first["mismatches"][0]["ranges"][0]["after"] == "e911223344"
            assert second["mismatches"][0]["ranges"][0]["after"] == "e955667788"
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 15))


class StarvedVm(LosableVm):
    """A VM whose vCPU the host has not let run (runnable, no run time) until the test
    says it ran — as a TCG or overcommitted guest waits for a core."""

    ran = 0.0

    async def progress(self) -> Sample | None:
        return Sample((self.ran,), (False,))


def test_the_second_look_waits_until_the_guest_has_run(
        patching_world: dict[str, Any]) -> None:
    """The kernel caught half-way on a starved guest: 0.3 s later it has not run, so the
    change is still there — a fixed delay took it for a tampering (and with `pause`,
    stopped the VM for good in the middle of its own patching). The second look waits
    for the host to say every vCPU ran; the kernel then has finished."""
    async def go() -> None:
        async with Store.open(patching_world["db"]) as st:
            ctx, vm, w, task, mem = await _patching_vm(patching_world, st, StarvedVm)
            assert isinstance(vm, StarvedVm)
            at = 0x10_0000 + TAMPER_PAGE * PAGE + TAMPER_AT
            original = bytes(CONTENT[".text"][TAMPER_PAGE * PAGE + TAMPER_AT:][:5])
            looked_at: list[float] = []

            def starve_then_run() -> None:
                looked_at.append(time.monotonic())

                async def later() -> None:
                    await asyncio.sleep(1.0)  # well past CONFIRM_DELAY
                    poke(mem, at, original)   # the kernel finishes once it runs
                    vm.ran = 1.0

                asyncio.get_running_loop().create_task(later())

            w.during = starve_then_run
            mark = len(ctx.events)
            poke(mem, at, b"\xe9\x11\x22\x33\x44")
            ev = await ctx.wait("tamper_transient", mark)
            assert time.monotonic() - looked_at[0] >= 1.0
            assert ev["second_look"] == "clean"
            await ctx.scans_after(3)
            assert "tamper" not in ctx.kinds() and "action" not in ctx.kinds()
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 20))


def test_a_starved_guest_is_looked_at_again_after_a_bound(
        patching_world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest the host says never runs cannot delay the second look past CONFIRM_MOST:
    a change still there then is a tamper (an attacker gains nothing by looking
    starved)."""
    monkeypatch.setattr(watcher_mod, "CONFIRM_MOST", 1.0)

    async def go() -> None:
        async with Store.open(patching_world["db"]) as st:
            ctx, vm, _w, task, mem = await _patching_vm(patching_world, st, StarvedVm)
            mark = len(ctx.events)
            t0 = time.monotonic()
            poke(mem, 0x10_0000 + TAMPER_PAGE * PAGE + TAMPER_AT, b"\xe9\x11\x22\x33\x44")
            await ctx.wait("tamper", mark)
            assert time.monotonic() - t0 >= 1.0
            assert "tamper_transient" not in ctx.kinds()
            vm.lost = "done"
            await _finish(task)

    asyncio.run(asyncio.wait_for(go(), 20))

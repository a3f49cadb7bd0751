# ruff: noqa: F401, F811, RUF059 - `world` is a fixture imported from test_unit_watcher
"""Faults around one watcher, on the synthetic replayed VM of `tests.test_unit_watcher`:
an unwritable forensics dir, a slow `exec:` hook, a memory file that shrinks, a VM whose
name would climb out of the forensics root, and a whole-`.text` tamper (capped payload).
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from pathlib import Path
from typing import Any

from scanner.run.actions import (
    MAX_EVENT_PAGES,
    MAX_FORENSIC_PAGES,
    Action,
    ActionKind,
    forensic_dir,
)
from store import Store
from tests.test_unit_watcher import (
    LINK,
    PAGE,
    SLIDE,
    TAMPER_AT,
    TAMPER_PAGE,
    _start,
    build_ram,
    poke,
    world,
)

TEXT_GPA = 0x10_0000


async def _watching(world: dict[str, Any], st: Store) -> Any:
    ram = build_ram(SLIDE, TEXT_GPA, 0x2222, text_writable=False)
    ctx, vm, w, task, mem = await _start(world, st, ram)
    await ctx.wait("vm_clean", 0)
    return ctx, vm, w, task, mem, ram


def test_unwritable_forensics_dir_still_reports_then_says_so(world: dict[str, Any]) -> None:
    """Before: the copy was written first, so a failing disk meant no event, no action.
    Now: tamper, then action, then forensics_failed naming the error."""
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ctx, vm, w, task, mem, ram = await _watching(world, st)
            blocker = world["tmp"] / "not-a-dir"
            blocker.write_bytes(b"")
            ctx.forensics_dir = blocker / "forensics"  # mkdir fails, even for root
            ctx.action = Action(ActionKind.PAUSE)
            poke(mem, TEXT_GPA + TAMPER_PAGE * PAGE + TAMPER_AT, b"\xcc\xcc")
            tamper = await ctx.wait("tamper", 2)
            action = await ctx.wait("action", 2)
            failed = await ctx.wait("forensics_failed", 2)
            kinds = ctx.kinds()
            assert kinds.index("tamper") < kinds.index("action") < \
                kinds.index("forensics_failed")
            assert action["ok"] is True and action["run_state"] == "paused"
            assert failed["forensics"] == tamper["forensics"]
            assert "Not a directory" in failed["message"] or "NotADirectory" in \
                failed["message"]
            vm.lost = "done"
            await asyncio.wait_for(task, 5)

    asyncio.run(asyncio.wait_for(go(), 30))


def test_slow_exec_hook_does_not_hold_the_slow_path(world: dict[str, Any]) -> None:
    """Before: the hook ran inside the slow-path slot (one slot here): nothing else could
    take a slow path for up to 30 s. Now the restore is seen while the hook still runs."""
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ctx, vm, w, task, mem, ram = await _watching(world, st)
            ctx.action = Action(ActionKind.EXEC, (sys.executable, "-c",
                                                  "import time; time.sleep(3)"))
            at = TEXT_GPA + TAMPER_PAGE * PAGE + TAMPER_AT
            original = bytes(ram.data[at:at + 2])
            poke(mem, at, b"\xcc\xcc")
            await ctx.wait("tamper", 2)
            poke(mem, at, original)
            await ctx.wait("tamper_cleared", 2, timeout=2.0)
            assert "action" not in ctx.kinds()  # the hook is still running
            action = await ctx.wait("action", 2, timeout=10)
            assert action["ok"] is True
            vm.lost = "done"
            await asyncio.wait_for(task, 5)

    asyncio.run(asyncio.wait_for(go(), 30))


def test_a_shrunk_memory_file_is_given_up_not_read(world: dict[str, Any]) -> None:
    """Before: the next read of a truncated mapping killed kscan with SIGBUS. Now the
    size is checked before each scan: vm_lost, and the engine re-attaches. (The last
    page is cut, which no scan reads, so the test itself can never fault.)"""
    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ctx, vm, w, task, mem, ram = await _watching(world, st)
            size = os.path.getsize(mem)
            os.truncate(mem, size - PAGE)
            await asyncio.wait_for(task, 5)
            lost = ctx.events[-1]
            assert lost["event"] == "vm_lost" and "shrank" in lost["reason"]

    asyncio.run(asyncio.wait_for(go(), 30))


def test_forensic_paths_stay_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "forensics"
    for name in ("..", ".", "../../etc", "/abs", "a/../../b", ".hidden", "", "x" * 500):
        d = forensic_dir(root, name, 1.5e9)
        assert d.resolve().is_relative_to(root.resolve()), name
        assert d.parent.parent == root and not d.parent.name.startswith(".")
        assert len(d.parent.name) <= 101


def test_whole_text_tamper_is_capped_with_totals(world: dict[str, Any]) -> None:
    """Every .text page changed, many ranges per page: the event and the copy are capped
    (synthetic .text has 8 pages, so the caps are lowered to 3 here) and say the totals."""
    import scanner.run.actions as actions

    async def go() -> None:
        async with Store.open(world["db"]) as st:
            ctx, vm, w, task, mem, ram = await _watching(world, st)
            old = (actions.MAX_EVENT_PAGES, actions.MAX_FORENSIC_PAGES,
                   actions.MAX_RANGES_PER_PAGE)
            actions.MAX_EVENT_PAGES = actions.MAX_FORENSIC_PAGES = 3
            actions.MAX_RANGES_PER_PAGE = 2
            try:
                collect = actions.collect_forensics.__defaults__
                actions.collect_forensics.__defaults__ = (3,)
                fields = actions.capped_mismatches.__defaults__
                actions.capped_mismatches.__defaults__ = (3, 2)
                pages = LINK[".text"][1] // PAGE
                for p in range(pages):  # 10 separate 1-byte changes per page
                    for k in range(10):
                        at = TEXT_GPA + p * PAGE + 100 + 64 * k
                        poke(mem, at, struct.pack("B", ram.data[at] ^ 0xFF))
                tamper = await ctx.wait("tamper", 2)
                assert tamper["mismatches_total"] == pages
                assert len(tamper["mismatches"]) == 3
                assert all(len(m["ranges"]) == 2 and m["ranges_total"] >= 10
                           for m in tamper["mismatches"])
                copy = Path(tamper["forensics"])
                for _ in range(100):
                    if (copy / "baseline.json").exists():
                        break
                    await asyncio.sleep(0.02)
                assert len(list((copy / "pages").glob("*.live.bin"))) == 3
                import orjson
                rep = orjson.loads((copy / "report.json").read_bytes())
                assert rep["mismatches_total"] == pages and rep["pages_copied"] == 3
            finally:
                (actions.MAX_EVENT_PAGES, actions.MAX_FORENSIC_PAGES,
                 actions.MAX_RANGES_PER_PAGE) = old
                actions.collect_forensics.__defaults__ = collect
                actions.capped_mismatches.__defaults__ = fields
            vm.lost = "done"
            await asyncio.wait_for(task, 5)

    asyncio.run(asyncio.wait_for(go(), 30))


def test_caps_are_sane() -> None:
    assert 0 < MAX_EVENT_PAGES <= 256 and 0 < MAX_FORENSIC_PAGES <= 256

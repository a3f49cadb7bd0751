"""The patch verifiers' memory of a boot, through `scanner.check.verify`: pinned at the
first check, stored with the VM's state, and a pinned state undone reported though its
bytes equal the golden baseline."""

from __future__ import annotations

import dataclasses

import numpy as np

from scanner.check.baseline import build_golden, capture
from scanner.check.patch_state import PatchMemory
from scanner.check.state import VmState
from tests.test_unit_verify import BOOT, LINK, NOP5, PAGE, SIZES, World, _jmp, kernel, world

__all__ = ["world"]


def ro_key_world(w: World) -> tuple[World, int, int]:
    """One jump-label site whose key lies in `.rodata` (cannot change after boot)."""
    from scanner.image.patchsites import PatchSites

    site, target = 0x3010, 0x3080
    w.data[".text"][site:site + 5] = NOP5
    text, ro = LINK[".text"], LINK[".rodata"]
    sites = PatchSites(
        jump_code=np.array([text + site], dtype=np.uint64),
        jump_target=np.array([text + target], dtype=np.uint64),
        jump_key=np.array([ro + 8], dtype=np.uint64),
        function_starts=np.array([text, text + 5 * PAGE], dtype=np.uint64),
        readonly=((ro, ro + SIZES[".rodata"]),))
    w.profile = dataclasses.replace(w.profile, patch_sites=sites)
    w.lk = kernel(w.profile)
    gb = build_golden(w.lk, capture(w.data), BOOT, "golden-vm", None)
    w.golden, w.contents = gb.regions, gb.contents
    return w, site, target


def test_first_check_pins_and_an_undone_pin_is_tampering(world: World) -> None:
    w, site, target = ro_key_world(world)
    booted = w.vm_bytes()
    booted[".text"][site:site + 5] = _jmp(site, target)   # as this boot set its key
    first = w.check(booted, None)
    assert not first.report.tampered and first.changed
    memory = PatchMemory.from_plain(first.state.patching)
    assert memory.pinned and list(memory.fixed_sites.values()) == [_jmp(site, target).hex()]
    # The same again: clean, nothing new to store.
    again = w.check(booted, VmState.from_plain(first.state.to_plain()))
    assert not again.report.tampered and not again.changed
    # Put back as in the golden baseline: the page equals golden, yet it is tampering.
    undone = w.check(w.vm_bytes(), VmState.from_plain(first.state.to_plain()))
    (m,) = undone.report.mismatches
    assert (m.region, m.page) == (".text", site // PAGE)
    assert m.ranges and "read-only" in (m.ranges[0].kind or "")

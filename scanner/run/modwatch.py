"""Watching a VM's module list under `kscan run`: `module_loaded` / `module_unloaded`.

The list is read (scanner.check.kernel_lists) after every full check, and between them
only when it may have changed: each fast pass compares the two words of the `modules`
list head (a load adds at the head, so `next` changes on every load) — 16 bytes read at
a guest-physical address fixed for the boot, no page walk — and every `EVERY` fast
passes the whole list is read anyway (an unload from the middle leaves the head alone).

Events: the first complete read of a boot is the reference, and says only what is
worth a look — each module already loaded without a valid signature, as
`module_loaded` with `initial: true`. After that, each module that appears is
`module_loaded` (notice; warning when `sig_ok` is false) and each that goes is
`module_unloaded` (notice). A module is (name, address of its struct module). A read
that did not come back to the list head is not compared (a module being loaded or
unloaded while kscan reads is not news): the reference stays until a complete read.
But the kernel changes its list under a mutex, so a list that does not close
`BROKEN_AFTER` reads in a row is no race: a guest could break it on purpose to silence
these events. That is said once per boot, as `module_list_broken` (warning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kscan.addresses import hex_addr
from scanner.check.kernel_lists import (
    ModuleInfo,
    ModuleList,
    modules_off,
    read_guest_modules,
    walker_reader,
)
from scanner.image.kernel_profile import KernelProfile
from translate import GuestMemory, PageWalker, TranslationError

__all__ = ["BROKEN_AFTER", "EVERY", "ModuleEvent", "ModuleWatch"]

#: Fast passes between full reads of the list when its head did not change.
EVERY = 30
#: Incomplete reads in a row that make a list broken rather than caught changing.
BROKEN_AFTER = 3


@dataclass(frozen=True)
class ModuleEvent:
    event: str   # module_loaded or module_unloaded
    fields: dict[str, Any]


def _loaded(m: ModuleInfo, initial: bool) -> ModuleEvent:
    text = [a.to_json() for a in m.text]
    return ModuleEvent("module_loaded", {
        "name": m.name, "address": hex_addr(m.address), "state": m.state, "sig_ok": m.sig_ok,
        "taints": m.taints, "taint": m.taint, "text": text, "initial": initial})


class ModuleWatch:
    """One VM's module-list watch (owned by its watcher; not thread-safe)."""

    def __init__(self, every: int = EVERY) -> None:
        self.every = every
        self.off: str | None = None          # why the list is not read, once known
        self.known: dict[tuple[str, int], ModuleInfo] | None = None
        self.last: ModuleList | None = None
        self._head: tuple[int, bytes] | None = None   # (gpa, 16 bytes) of `modules`
        self._passes = 0
        self._incomplete = 0
        self._broken_said = False
        self._boot: tuple[str, int] | None = None

    def reset(self) -> None:
        """A new boot: the next complete read is a new reference."""
        self.known = self.last = None
        self._head = None
        self._passes = self._incomplete = 0
        self._broken_said = False

    def due(self, mem: GuestMemory) -> bool:
        """After a clean fast pass: should the list be read again? Cheap."""
        if self.off is not None:
            return False
        self._passes += 1
        if self._passes >= self.every or self.last is None:
            return True
        if self._head is None:
            return False
        gpa, words = self._head
        try:
            return bytes(mem.view(gpa, 16)) != words
        except (ValueError, OSError, TranslationError):
            return True

    def read(self, profile: KernelProfile, slide: int, walker: PageWalker
             ) -> list[ModuleEvent]:
        """Read the list (CPU-bound: run it off the event loop) and return the events
        of what changed since the last complete read."""
        self._passes = 0
        if self._boot != (profile.build_id, slide):
            self.reset()
            self._boot = (profile.build_id, slide)
        self.off = modules_off(profile)
        if self.off is not None:
            return []
        head = profile.data_symbol("modules")
        assert head is not None
        try:
            m = walker.translate(head + slide)
            self._head = (m.gpa, bytes(walker.mem.view(m.gpa, 16)))
        except (TranslationError, ValueError, OSError):
            self._head = None
        return self.update(read_guest_modules(profile, slide, walker_reader(walker)))

    def update(self, ml: ModuleList) -> list[ModuleEvent]:
        """The events of a fresh read of this boot's list (pure: no memory access)."""
        self.last = ml
        if not ml.complete:
            self._incomplete += 1
            if self._incomplete < BROKEN_AFTER or self._broken_said:
                return []
            self._broken_said = True
            return [ModuleEvent("module_list_broken", {
                "problems": list(ml.problems), "modules_read": len(ml),
                "reads": self._incomplete})]
        self._incomplete = 0
        now = {(m.name, m.address): m for m in ml}
        before = self.known
        self.known = now
        if before is None:
            return [_loaded(m, True) for m in ml if m.sig_ok is False]
        out = [_loaded(m, False) for k, m in now.items() if k not in before]
        out += [ModuleEvent("module_unloaded", {"name": m.name, "address": hex_addr(m.address)})
                for k, m in before.items() if k not in now]
        return out

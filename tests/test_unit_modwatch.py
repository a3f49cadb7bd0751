"""What `kscan run` says as a guest's module list changes (scanner.run.modwatch), on
synthetic module lists; the real thing is in test_modules_live.py."""

from __future__ import annotations

from scanner.check.kernel_lists import ModuleInfo, ModuleList, ModuleMemory
from scanner.run.modwatch import ModuleWatch

BASE = 0xFFFF_FFFF_C000_0000


def mod(name: str, i: int, sig_ok: bool | None = True) -> ModuleInfo:
    return ModuleInfo(name, BASE + i * 0x10000 + 0x2000, "live",
                      (ModuleMemory("text", BASE + i * 0x10000, 0x1000),), sig_ok,
                      0 if sig_ok else 0x3000)


def events(w: ModuleWatch, *mods: ModuleInfo, complete: bool = True) -> list[tuple[str, str]]:
    return [(e.event, str(e.fields["name"])) for e in w.update(ModuleList(mods, complete))]


def test_first_read_reports_only_unsigned_modules_then_changes() -> None:
    w = ModuleWatch()
    a, b, evil = mod("virtio_blk", 0), mod("ext4", 1), mod("evil", 2, sig_ok=False)
    first = w.update(ModuleList((a, b, evil), True))
    assert [(e.event, e.fields["name"], e.fields["initial"]) for e in first] == [
        ("module_loaded", "evil", True)]
    assert first[0].fields["text"] == [{"kind": "text", "base": BASE + 0x20000,
                                        "size": 0x1000}]
    assert events(w, a, b, evil) == []                     # nothing changed
    new = mod("new", 3)
    got = w.update(ModuleList((new, a, b, evil), True))
    assert [(e.event, e.fields["name"], e.fields["initial"]) for e in got] == [
        ("module_loaded", "new", False)]
    assert events(w, new, evil) == [("module_unloaded", "virtio_blk"),
                                    ("module_unloaded", "ext4")]


def test_a_module_reloaded_at_another_address_is_both() -> None:
    w = ModuleWatch()
    events(w, mod("m", 0))
    again = mod("m", 5)
    assert sorted(events(w, again)) == [("module_loaded", "m"), ("module_unloaded", "m")]


def test_an_incomplete_read_is_not_compared() -> None:
    """A list cut short (a module being loaded while kscan reads, or a hostile list)
    says nothing about what went: the reference stays until a complete read."""
    w = ModuleWatch()
    a, b = mod("a", 0), mod("b", 1)
    events(w, a, b)
    assert events(w, a, complete=False) == []
    assert events(w, a, b) == []
    assert events(ModuleWatch(), mod("x", 0, sig_ok=False), complete=False) == []


def test_reset_starts_a_new_reference() -> None:
    w = ModuleWatch()
    events(w, mod("a", 0))
    w.reset()
    assert events(w, mod("b", 1)) == []                  # a new boot: no diff with the old
    assert w.known is not None and set(w.known) == {("b", BASE + 0x12000)}

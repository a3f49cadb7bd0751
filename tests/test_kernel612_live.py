"""Debian's 6.12 backport kernel on real guests: two clean guests, one baselined, the
other checked. Everything must match except the runtime-constant immediates (6.11+,
patched at boot with per-boot values), which need the runtime-const verifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scanner.image.kernel_profile import profile_from_path
from scanner.image.vmlinux import load_kernel_image
from tests.conftest import GuestPool
from tests.kscan_proc import kscan
from tools.guests import GuestSpec, ensure_kernel
from tools.regiondiff import image_sites

pytestmark = pytest.mark.guest

VERIFIER_PENDING = ("runtime-constant immediates (runtime_ptr_*/runtime_shift_*) hold "
                    "per-boot values; verifying them is the runtime-const verifier's job "
                    "(not landed yet)")


@pytest.fixture(scope="module")
def k612(guests: GuestPool, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two 6.12 guests, the profile added, the first baselined, the second checked."""
    vmlinuz = ensure_kernel("6.12").vmlinuz
    a, b = guests.boot(GuestSpec("k612a", kernel="6.12"), GuestSpec("k612b", kernel="6.12"))
    db = str(tmp_path_factory.mktemp("k612") / "kscan.db")
    r = kscan("profile", "add", "--db", db, str(vmlinuz))
    assert r.returncode == 0, r.stderr
    r = kscan("baseline", "--db", db, "--qmp", str(a.qmp))
    assert r.returncode == 0, r.stderr
    check = kscan("check", "--db", db, "--qmp", str(b.qmp), "--json")
    assert check.returncode in (0, 1), check.stderr
    inspect = kscan("inspect", "--db", db, "--qmp", str(b.qmp), "--json")
    assert inspect.returncode == 0, inspect.stderr
    return {"vmlinuz": vmlinuz, "report": json.loads(check.stdout),
            "inspect": json.loads(inspect.stdout), "a": a, "b": b}


def test_612_profile_reads_early_stubs_and_alt_relocs() -> None:
    p = profile_from_path(ensure_kernel("6.12").vmlinuz)
    assert p.early_idt is not None and p.early_idt[1] == 13       # ENDBR64 + 9
    assert ".text" in p.alt_relocs and p.alt_relocs[".text"].count > 0
    q = profile_from_path(ensure_kernel("6.1").vmlinuz)
    assert q.early_idt is not None and q.early_idt[1] == 9
    assert q.sections[".init.text"].addr == q.early_idt[0]


def test_612_idt_gates_all_accepted(k612: dict[str, object]) -> None:
    report = k612["report"]
    assert isinstance(report, dict)
    assert [f for f in report["findings"] if f["kind"].startswith("idt")] == []
    idt = k612["inspect"]["kernel"]["idt"]  # type: ignore[index]
    assert idt["ok"] and idt["outside_text"] == [] and idt["present"] == 256
    # 6.12 leaves the unused reserved vectors on the 13-byte early stubs.
    assert idt["early_handlers"] and all(v < 32 for v in idt["early_handlers"])


def _runtime_const_spans(vmlinuz: Path) -> list[tuple[int, int, str]]:
    sites = image_sites(load_kernel_image(vmlinuz))
    return [(a, a + w, n) for a, w, n in sites.runtime_const]


def test_612_check_clean_but_runtime_consts(k612: dict[str, object]) -> None:
    report = k612["report"]
    assert isinstance(report, dict)
    assert report["findings"] == [], report["findings"]
    prof = profile_from_path(k612["vmlinuz"])  # type: ignore[arg-type]
    spans = _runtime_const_spans(k612["vmlinuz"])  # type: ignore[arg-type]
    assert spans, "6.12 has runtime_ptr_*/runtime_shift_* sections"
    unexplained, explained = [], []
    for region in report["regions"]:
        base = prof.section(region["region"]).addr if region["region"] != "idt" else 0
        for m in region["mismatches"]:
            for r in m["ranges"]:
                lo = base + m["page"] * 4096 + r["start"]
                hi = base + m["page"] * 4096 + r["end"]
                inside = region["region"] == ".text" and any(
                    s <= lo and hi <= e for s, e, _ in spans)
                (explained if inside else unexplained).append(
                    (region["region"], m["page"], hex(lo), r["before"], r["after"]))
    # Strict: nothing but runtime-constant immediates may differ (KASLR, alternatives,
    # per-boot .rodata, IDT and __ex_table are all handled).
    assert unexplained == [], unexplained
    # The one known gap, marked: the runtime-const pages until their verifier lands.
    if explained:
        pytest.xfail(f"{VERIFIER_PENDING}: {explained}")
    assert report["result"] == "clean"

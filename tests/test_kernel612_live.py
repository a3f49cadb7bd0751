"""Debian's 6.12 backport kernel on real guests: two clean guests, one baselined, the
other checked. Everything matches except what the kernel patches itself (runtime-constant
immediates, 6.11+), which is verified as such; tampering in each region is found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scanner.image.kernel_profile import profile_from_path
from scanner.image.vmlinux import load_kernel_image
from tests.conftest import GuestPool, run
from tests.kscan_proc import flip_bytes, kscan, write_bytes
from tools.guests import GuestSpec, ensure_kernel
from tools.regiondiff import image_sites

pytestmark = pytest.mark.guest

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
            "inspect": json.loads(inspect.stdout), "a": a, "b": b, "db": db}


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


def test_612_check_is_clean_runtime_consts_verified(k612: dict[str, object]) -> None:
    """Nothing differs but what the kernel patches itself: the runtime-constant
    immediates (6.11+: per-boot values) are verified as `runtime_const`, not tampering."""
    report = k612["report"]
    assert isinstance(report, dict)
    assert report["findings"] == [], report["findings"]
    mismatches = [m for r in report["regions"] for m in r["mismatches"]]
    assert mismatches == [], mismatches
    assert report["result"] == "clean"
    spans = _runtime_const_spans(k612["vmlinuz"])  # type: ignore[arg-type]
    assert spans, "6.12 has runtime_ptr_*/runtime_shift_* sections"
    patched = report["patched"]
    if patched is not None:  # the dentry hash table's address differs between boots
        assert set(patched["mechanisms"]) <= {"runtime_const", "smp_lock", "jump_label"}
        assert all(r["mechanism"] != "runtime_const" or r["symbol"].startswith("__d_")
                   or r["symbol"].startswith("___d_") or r["symbol"].startswith("d_")
                   for r in patched["sites"]), patched["sites"]


def _runtime_const_spans(vmlinuz: Path) -> list[tuple[int, int, str]]:
    sites = image_sites(load_kernel_image(vmlinuz))
    return [(a, a + w, n) for a, w, n in sites.runtime_const]


@pytest.mark.parametrize("region, offset", [
    (".text", 0x2345), (".rodata", 0x120), ("__ex_table", 0x40), ("idt", 16 * 3 + 0)])
def test_612_tampering_in_each_region_is_found(k612: dict[str, object], region: str,
                                               offset: int) -> None:
    b = k612["b"]
    db = k612["db"]
    prof = profile_from_path(k612["vmlinuz"])  # type: ignore[arg-type]
    old = run(flip_bytes(b.qmp_aux, prof, region, offset, 2))  # type: ignore[attr-defined]
    try:
        out = kscan("check", "--db", db, "--qmp", str(b.qmp_aux), "--json")  # type: ignore[attr-defined]
        assert out.returncode == 1, out.stderr
        doc = json.loads(out.stdout)
        pages = [(m["region"], m["page"]) for r in doc["regions"] for m in r["mismatches"]]
        assert (region, offset // 4096) in pages, pages
        if region == ".text":
            m = next(m for r in doc["regions"] for m in r["mismatches"])
            assert m["symbol"] and "+0x" in m["symbol"]  # named from kallsyms
    finally:
        run(write_bytes(b.qmp_aux, prof, region, offset, old))  # type: ignore[attr-defined]
    again = kscan("check", "--db", db, "--qmp", str(b.qmp_aux))  # type: ignore[arg-type]
    assert again.returncode == 0, again.stdout

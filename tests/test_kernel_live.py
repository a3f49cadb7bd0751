"""Kernel profiles on real guests: slide discovery, identification, normalization
across two VMs of one kernel, IDT decoding, and `kscan profile`/`inspect --db`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scanner.check.idt import normalize_idt
from scanner.check.locate import LiveKernel, locate_kernel
from scanner.check.normalize import normalize
from scanner.errors import ProfileError
from scanner.image.kernel_profile import KernelProfile, SectionInfo
from scanner.vm import AttachedVm
from tests.conftest import GuestPool, run
from tools.guests import Guest, GuestSpec, ensure_kernel

pytestmark = pytest.mark.guest
PAGE = 4096


async def _snapshot(g: Guest, profile: KernelProfile) -> tuple[LiveKernel, dict[str, bytes]]:
    """The live kernel of a guest and its four regions, normalized, read while paused."""
    async with await AttachedVm.attach(g.qmp) as vm:
        await vm.qmp.stop()
        try:
            await vm.refresh_vcpus()
            lk = locate_kernel(vm.mem, vm.walker(), vm.vcpus, [profile], vm=vm.name)
            out = {}
            for name, r in lk.regions.items():
                raw = b"".join(bytes(vm.mem.view(gpa, n)) for gpa, n in r.runs)
                if name == "idt":
                    out[name] = bytes(normalize_idt(raw, vm.vcpus[0].idtr_limit, lk.slide))
                else:
                    out[name] = bytes(normalize(raw, profile.relocs[name], lk.slide))
            return lk, out
        finally:
            await vm.qmp.cont()


def _differing_pages(a: bytes, b: bytes) -> list[int]:
    return [i // PAGE for i in range(0, len(a), PAGE) if a[i:i + PAGE] != b[i:i + PAGE]]


def test_two_vms_one_kernel_normalize_equal(guests: GuestPool, kernel_profile: KernelProfile,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    first = run(_snapshot(guests["a"], kernel_profile))
    second_guest = guests["b"]
    second = run(_snapshot(second_guest, kernel_profile))
    tries = 0
    while second[0].slide == first[0].slide and tries < 3:  # 1 in ~500: boot another
        tries += 1
        (second_guest,) = guests.boot(GuestSpec(f"b-retry{tries}"))
        second = run(_snapshot(second_guest, kernel_profile))
    (lk_a, a), (lk_b, b) = first, second
    assert lk_a.slide != lk_b.slide, "both guests booted with the same KASLR slide"
    assert lk_a.slide % (2 << 20) == 0 and lk_b.slide % (2 << 20) == 0
    assert lk_a.match.build_id == kernel_profile.build_id == lk_b.match.build_id

    # Raw .text differs (relocated differently); normalized it is byte-identical.
    assert a[".text"] == b[".text"]
    assert a["__ex_table"] == b["__ex_table"]
    assert a["idt"] == b["idt"]
    rod = _differing_pages(a[".rodata"], b[".rodata"])
    nbytes = int(np.count_nonzero(np.frombuffer(a[".rodata"], np.uint8)
                                  != np.frombuffer(b[".rodata"], np.uint8)))
    total = (len(a[".rodata"]) + PAGE - 1) // PAGE
    with capsys.disabled():
        print(f"\n[.rodata after normalization] {len(rod)} of {total} pages differ "
              f"({nbytes} bytes), pages {rod[0] if rod else '-'}..{rod[-1] if rod else '-'}"
              f" (slides {lk_a.slide:#x} / {lk_b.slide:#x})")
    assert 0 < len(rod) <= 32, rod
    assert min(rod) >= total * 0.8, f"per-boot pages expected near the end, got {rod}"


def test_idt_of_a_real_guest(guests: GuestPool, kernel_profile: KernelProfile) -> None:
    lk, _ = run(_snapshot(guests["a"], kernel_profile))
    assert lk.idt_check.gates == 256 and lk.idt_check.present == 256
    assert lk.idt_check.ok, lk.idt_check.outside_text
    assert lk.idtr_shared
    # W^X holds for all four regions after boot.
    for r in lk.regions.values():
        assert r.wx_violations() == [], r.name


def test_five_level_guest_is_identified(guests: GuestPool,
                                        kernel_profile: KernelProfile) -> None:
    lk, _ = run(_snapshot(guests["la57"], kernel_profile))
    assert lk.match.build_id == kernel_profile.build_id
    assert lk.idt_check.ok


def test_unknown_kernel_names_its_version(guests: GuestPool,
                                          kernel_profile: KernelProfile) -> None:
    # A profile of "another kernel": same layout, different text and build id.
    other = KernelProfile(
        build_id="00" * 20, release="6.99.0-other", version="Linux version 6.99.0-other",
        sections=dict(kernel_profile.sections), relocs=dict(kernel_profile.relocs),
        text_head=bytes(PAGE), ex_table=kernel_profile.ex_table,
    )

    async def go() -> None:
        async with await AttachedVm.attach(guests["a"].qmp) as vm:
            locate_kernel(vm.mem, vm.walker(), vm.vcpus, [other], vm=vm.name)
    with pytest.raises(ProfileError) as ei:
        run(go())
    release = ensure_kernel().release
    assert ei.value.version is not None and release in ei.value.version
    assert "kscan profile add" in str(ei.value) and "tried 1" in str(ei.value)


def kscan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scanner", *args], capture_output=True,
                          text=True, timeout=120)


def test_profile_cli_and_inspect_db(guests: GuestPool, tmp_path: Path,
                                    kernel_profile: KernelProfile) -> None:
    db = str(tmp_path / "k.db")
    vmlinuz = str(ensure_kernel().vmlinuz)
    first = kscan("profile", "add", vmlinuz, "--db", db)
    assert first.returncode == 0 and first.stdout.startswith("added profile "), first.stderr
    again = kscan("profile", "add", vmlinuz, "--db", db)
    assert again.returncode == 0 and "already stored; nothing to do" in again.stdout
    listed = json.loads(kscan("profile", "list", "--db", db, "--json").stdout)
    assert [p["build_id"] for p in listed] == [kernel_profile.build_id]

    out = kscan("inspect", "--qmp", str(guests["b"].qmp), "--db", db, "--json")
    assert out.returncode == 0, out.stderr
    k = json.loads(out.stdout)["kernel"]
    assert k["build_id"] == kernel_profile.build_id and k["release"] == ensure_kernel().release
    slide = int(k["slide"], 16)  # addresses are hex strings in --json
    assert slide % (2 << 20) == 0 and k["idt"]["ok"] and k["idt"]["gates"] == 256
    regions = {r["name"]: r for r in k["regions"]}
    assert list(regions) == [".text", ".rodata", "__ex_table", "idt"]
    text: SectionInfo = kernel_profile.text
    assert regions[".text"]["va"] == hex(text.addr + slide)
    assert sum(x["size"] for x in regions[".text"]["runs"]) == text.size
    assert all(x["perms"] == "r-xk" for x in regions[".text"]["runs"])
    assert all(x["perms"] == "r--k" for x in regions[".rodata"]["runs"])

    # A database without this kernel: inspect still works and says what to do.
    empty = kscan("inspect", "--qmp", str(guests["b"].qmp), "--db", str(tmp_path / "e.db"),
                  "--json")
    kk = json.loads(empty.stdout)["kernel"]
    assert "kscan profile add" in kk["error"] and ensure_kernel().release in kk["version"]

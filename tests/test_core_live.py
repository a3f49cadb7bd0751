"""`kscan check --core` on real memory images: a guest (QEMU/TCG, the Debian cloud
kernel) is baselined, dumped with QMP `dump-guest-memory` (ELF, paging=false: what
`virsh dump --memory-only` writes), and the image gets the live VM's verdict — clean,
then, after a host-side write into `.text` and a second dump, tampered with the same
page and function named. `kscan inspect --core` reads the image's registers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from scanner.image.kernel_profile import KernelProfile
from scanner.qemu.qmp import QmpVm
from tests.conftest import run
from tests.kscan_proc import flip_bytes, kscan, write_bytes
from tests.test_watch import quiet_offset
from tools.guests import Guest, GuestSpec, boot, ensure_kernel

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """One guest of this module's own (it is tampered with)."""
    (g,) = boot([GuestSpec("corev")], tmp_path_factory.mktemp("coreguest"), timeout=900)
    try:
        yield g
    finally:
        g.stop()


async def dump(sock: Path, path: Path) -> None:
    async with await QmpVm.connect(sock) as qmp:
        await qmp.execute("dump-guest-memory", {"paging": False,
                                                "protocol": f"file:{path}"}, timeout=300)


def check(*args: str) -> tuple[int, dict[str, Any]]:
    res = kscan("check", "--json", *args, timeout=600)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, orjson.loads(res.stdout)


def changed(rep: dict[str, Any]) -> list[tuple[str, int, str | None]]:
    return [(m["region"], m["page"], m["symbol"]) for r in rep["regions"]
            for m in r["mismatches"]]


def test_core_gets_the_live_verdict(guest: Guest, kernel_profile: KernelProfile,
                                    tmp_path: Path) -> None:
    db = str(tmp_path / "kscan.db")
    assert kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", db).returncode == 0
    base = kscan("baseline", "--qmp", str(guest.qmp_aux), "--db", db)
    assert base.returncode == 0, base.stderr
    live_rc, live = check("--qmp", str(guest.qmp_aux), "--db", db)
    assert live_rc == 0, live
    image = tmp_path / "clean.elf"
    run(dump(guest.qmp_aux, image))
    core_rc, core = check("--core", str(image), "--vm", "corev", "--db", db)
    assert core_rc == 0, core
    for key in ("build_id", "slide", "boot_profile", "result"):
        assert core[key] == live[key], key  # the one stored baseline was picked
    insp = kscan("inspect", "--core", str(image), "--json", "--db", db)
    assert insp.returncode == 0, insp.stderr
    doc = orjson.loads(insp.stdout)
    assert doc["kernel"]["slide"] == live["slide"]
    assert doc["vcpus"][0]["cr3"] != "0x0" and doc["idt"]["gpa"] is not None
    image.unlink()

    offset = quiet_offset(kernel_profile, ".text", 0x500010)
    old = run(flip_bytes(guest.qmp_aux, kernel_profile, ".text", offset, 4))
    try:
        live_rc, live = check("--qmp", str(guest.qmp_aux), "--db", db)
        assert live_rc == 1 and changed(live)
        image = tmp_path / "tampered.elf"
        run(dump(guest.qmp_aux, image))
    finally:
        run(write_bytes(guest.qmp_aux, kernel_profile, ".text", offset, old))
    core_rc, core = check("--core", str(image), "--vm", "corev", "--db", db)
    assert core_rc == 1
    assert changed(core) == changed(live)
    assert any(sym for _, _, sym in changed(core))  # the function is named
    # A wrong boot profile is refused in one line, not checked against nothing.
    res = kscan("check", "--core", str(image), "--boot-profile", "qemu64-x86_64-cpu/0/pti",
                "--db", db)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1

"""libvirt-managed domains against a real libvirtd, with all four kinds of guest RAM.

The session sets libvirt up itself (`tools.libvirt_host`: packages, the libvirt-qemu
user, qemu.conf, hugetlbfs + hugepages, virtlogd and libvirtd started, and stopped by
PID at the end). Transient TCG domains boot the test kernel and initramfs, at most two
at a time, in pairs booted in parallel:

    golden (anonymous) + file   →   hugepage + memfd   →   anonymous (+ late, file)

Each kind: `kscan check --libvirt` is clean against the baseline taken from `golden`
(another domain), a host-side write into its kernel text is detected and localized, and
pause (virDomainSuspend) works. `kscan run --libvirt` picks up a domain started after
it, pauses it on tampering, and reports a destroyed one.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from scanner.image.kernel_profile import KernelProfile
from tests.kscan_proc import RunProc, kscan
from tests.needs import unavailable
from tools import libvirt_host as lh
from tools.guests import ensure_kernel

pytestmark = pytest.mark.guest

KINDS = ("file", "hugepage", "memfd", "anonymous")
#: Where each kind's RAM is read from (inspect --json "file"), and whether it is mmap'd.
WHERE = {
    "file": re.compile(r"^/var/lib/libvirt/qemu/ram/.+/pc\.ram$"),
    "hugepage": re.compile(r"^/proc/\d+/fd/\d+$"),
    "memfd": re.compile(r"^/proc/\d+/fd/\d+$"),
    "anonymous": re.compile(r"^/proc/\d+/mem$"),
}
#: Boot order: (domain, RAM kind), two by two.
PAIRS = ((("golden", "anonymous"), ("file", "file")),
         (("hugepage", "hugepage"), ("memfd", "memfd")),
         (("anonymous", "anonymous"),))  # + `late` (file), started under kscan run
TEXT_OFFSET = 0x2000  # a byte of .text the guest does not run while it idles


def dom(name: str) -> str:
    return lh.PREFIX + "t-" + name


class Domains:
    """Boots test domains two at a time (destroying the others first)."""

    def __init__(self) -> None:
        self.running: set[str] = set()

    def ensure(self, name: str) -> None:
        """Boot `name` and the other domain of its pair (in parallel) unless running."""
        pair = next(p for p in PAIRS if any(n == name for n, _ in p))
        for other in self.running - {n for n, _ in pair}:
            lh.destroy(dom(other))
            self.running.discard(other)
        todo = [(n, k) for n, k in pair if n not in self.running]
        for n, k in todo:
            lh.boot(lh.DomainSpec(dom(n), k))
            self.running.add(n)
        lh.wait_ready([dom(n) for n, _ in todo],
                      timeout=float(os.environ.get("KSCAN_BOOT_TIMEOUT", "400")))

    def destroy_all(self) -> None:
        for n in list(self.running):
            lh.destroy(dom(n))
        self.running.clear()


@pytest.fixture(scope="module")
def libvirt_up() -> Iterator[None]:
    if os.geteuid() != 0:
        unavailable("the libvirt tests set up libvirtd and need root")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        unavailable("libvirt-python not installed (pip install '.[libvirt]')")
    lh.up(hugepages_mb=512)
    try:
        yield
    finally:
        lh.down()


@pytest.fixture(scope="module")
def domains(libvirt_up: None) -> Iterator[Domains]:
    d = Domains()
    try:
        yield d
    finally:
        d.destroy_all()


@pytest.fixture(scope="module")
def db(domains: Domains, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The kernel's profile and a golden baseline from the `golden` domain."""
    path = str(tmp_path_factory.mktemp("libvirt") / "kscan.db")
    r = kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", path)
    assert r.returncode == 0, r.stderr
    domains.ensure("golden")
    r = kscan("baseline", "--libvirt", dom("golden"), "--db", path)
    assert r.returncode == 0, r.stderr
    return path


def tamper(name: str, db: str, data: bytes) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "tools.tamper", "--libvirt", dom(name),
                          "--region", ".text", "--offset", hex(TEXT_OFFSET),
                          "--bytes", data.hex(), "--db", db],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rec: dict[str, object] = orjson.loads(out.stdout)
    return rec


def check(name: str, db: str) -> tuple[int, dict[str, object]]:
    r = kscan("check", "--libvirt", dom(name), "--json", "--db", db)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, orjson.loads(r.stdout)


async def pause_and_resume(name: str) -> tuple[str, str]:
    from scanner.vm.domain import attach_domain

    async with await attach_domain(dom(name)) as vm:
        await vm.pause()
        paused = (await vm.run_state()).status.value
        await vm.qmp.cont()
        return paused, (await vm.run_state()).status.value


@pytest.mark.parametrize("kind", KINDS)
def test_each_ram_kind_checks_clean_detects_a_write_and_pauses(
        kind: str, domains: Domains, db: str, kernel_profile: KernelProfile) -> None:
    name = kind
    domains.ensure(name)
    r = kscan("inspect", "--libvirt", dom(name), "--json")
    assert r.returncode == 0, r.stderr
    files = [m["file"] for m in orjson.loads(r.stdout)["memory"]]
    assert files and all(WHERE[kind].match(f) for f in files), files

    rc, rep = check(name, db)
    assert rc == 0 and rep["result"] == "clean", rep

    rec = tamper(name, db, b"\xcc")
    old = bytes.fromhex(str(rec["old"]))
    assert old != b"\xcc"
    try:
        rc, rep = check(name, db)
        assert rc == 1, rep
        mism = [m for r in rep["regions"] for m in r["mismatches"]]  # type: ignore[attr-defined]
        assert [(m["region"], m["page"]) for m in mism] == [(".text", TEXT_OFFSET // 4096)]
    finally:
        tamper(name, db, old)
    assert check(name, db)[0] == 0

    assert asyncio.run(pause_and_resume(name)) == ("paused", "running")


def test_run_follows_libvirt_domains(domains: Domains, db: str, tmp_path: Path) -> None:
    """`kscan run --libvirt`: a running domain is watched (anonymous RAM: the fast path
    reads copies) and paused on tampering through virDomainSuspend, one started later is
    picked up, a destroyed one reported."""
    domains.ensure("anonymous")
    proc = RunProc(["--libvirt", "--db", db, "--interval", "1", "--on-tamper", "pause",
                    "--forensics-dir", str(tmp_path / "f")], tmp_path / "run.err")
    old = b""
    try:
        ev = proc.wait_for(lambda e: e["event"] == "vm_clean"
                           and e["vm"] == dom("anonymous"), 120)
        assert re.fullmatch(r"[0-9a-f-]{36}", ev["uuid"])
        lh.boot(lh.DomainSpec(dom("late"), "file"))
        domains.running.add("late")
        found = proc.wait_for(lambda e: e["event"] == "vm_found" and e["vm"] == dom("late"),
                              120)
        assert found["kind"] == "libvirt" and found["uuid"]
        proc.wait_for(lambda e: e["event"] == "vm_clean" and e["vm"] == dom("late"), 400)

        mark = proc.mark()
        old = bytes.fromhex(str(tamper("anonymous", db, b"\xcc")["old"]))
        ev = proc.wait_for(lambda e: e["event"] == "tamper"
                           and e["vm"] == dom("anonymous"), 30, mark)
        assert ev["mismatches"][0]["region"] == ".text"
        act = proc.wait_for(lambda e: e["event"] == "action"
                            and e["vm"] == dom("anonymous"), 30, mark)
        assert act["ok"] and act["run_state"] == "paused", act

        mark = proc.mark()
        lh.destroy(dom("anonymous"))
        domains.running.discard("anonymous")
        lost = proc.wait_for(lambda e: e["event"] == "vm_lost"
                             and e["vm"] == dom("anonymous"), 30, mark)
        assert "destroyed" in lost["reason"] and lost["uuid"] == ev_uuid(proc, "anonymous")
        assert not [e for e in proc.of("vm_lost", after=mark) if e["vm"] == dom("late")]
        old = b""
    finally:
        if old:
            tamper("anonymous", db, old)
        assert proc.stop() == 0


def ev_uuid(proc: RunProc, name: str) -> str:
    return str(next(e["uuid"] for e in proc.events if e["vm"] == dom(name) and "uuid" in e))

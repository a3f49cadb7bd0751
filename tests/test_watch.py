"""Baselines, one-shot checks and the watch loop on real guests: a baseline from guest A
passes guest B; tampering with each region is found by `check` and by `run`, with the
right region, page and bytes; pause, accept, and a long idle run with failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanner.image.kernel_profile import KernelProfile
from scanner.qemu.qmp import QmpVm
from tests.conftest import STANDARD, GuestPool, run
from tests.kscan_proc import RunProc, flip_bytes, kscan, live_kernel, write_bytes
from tools.guests import Guest, GuestSpec, ensure_kernel, start
from tools.tamper import write_guest

pytestmark = pytest.mark.guest
PAGE = 4096
INTERVAL = 2.0


def quiet_offset(profile: KernelProfile, region: str, start: int, n: int = 8) -> int:
    """The first offset ≥ start whose n bytes are clear of relocation sites by 8 bytes."""
    r = profile.relocs[region]
    sites = set()
    for arr, width in ((r.r64, 8), (r.r32, 4), (r.r32_inv, 4)):
        for s in arr.tolist():
            sites.update(range(s - 8, s + width + 8))
    off = start
    while any(o in sites for o in range(off, off + n)):
        off += 1
    return off


@pytest.fixture(scope="module")
def db(guests: GuestPool, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database with the kernel's profile and a golden baseline taken from guest A."""
    path = str(tmp_path_factory.mktemp("watch") / "kscan.db")
    added = kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", path)
    assert added.returncode == 0, added.stderr
    base = kscan("baseline", "--qmp", str(guests["a"].qmp), "--db", path)
    assert base.returncode == 0, base.stderr
    assert "per-boot" in base.stdout
    return path


def check_json(g: Guest, db: str) -> tuple[int, dict]:
    # The aux socket: `kscan run` may be holding the main one (one client per monitor).
    out = kscan("check", "--qmp", str(g.qmp_aux), "--db", db, "--json")
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_baseline_from_a_passes_b(guests: GuestPool, db: str) -> None:
    rc, rep = check_json(guests["b"], db)
    assert rc == 0 and rep["result"] == "clean", rep
    assert rep["per_vm_baseline_taken"] is True
    regions = {r["region"]: r for r in rep["regions"]}
    assert set(regions) == {".text", ".rodata", "__ex_table", "idt"}
    assert regions[".text"]["golden_checked"] == regions[".text"]["pages"]
    per_boot = regions[".rodata"]["per_boot_checked"]
    assert 0 < len(per_boot) < regions[".rodata"]["pages"] // 10
    # The second check uses the per-VM baseline taken by the first.
    rc2, rep2 = check_json(guests["b"], db)
    assert rc2 == 0 and rep2["per_vm_baseline_taken"] is False


def test_baseline_refuses_a_vm_that_has_not_booted(guests: GuestPool, db: str) -> None:
    (g,) = start([GuestSpec("early", extra=("-S",))], guests.run_dir)  # stopped at reset
    guests.guests["early"] = g
    try:
        for _ in range(100):
            if g.qmp.exists():
                break
            time.sleep(0.05)
        out = kscan("baseline", "--qmp", str(g.qmp), "--db", db)
        assert out.returncode == 2
        assert "boot" in out.stderr and "Traceback" not in out.stderr, out.stderr
    finally:
        g.stop()


@pytest.fixture(scope="module")
def victim(guests: GuestPool, db: str) -> Guest:
    (g,) = guests.boot(GuestSpec("victim"))
    rc, rep = check_json(g, db)
    assert rc == 0 and rep["per_vm_baseline_taken"], rep
    return g


def test_tampering_each_region_found_by_check_and_run(victim: Guest, db: str,
                                                      kernel_profile: KernelProfile,
                                                      tmp_path: Path) -> None:
    # The per-boot page to hit: one the verified baseline marks per-boot.
    _, rep = check_json(victim, db)
    rodata = next(r for r in rep["regions"] if r["region"] == ".rodata")
    pb_page = rodata["per_boot_checked"][0]
    cases = [
        (".text", quiet_offset(kernel_profile, ".text", 0x600010), 5, "golden"),
        (".rodata", quiet_offset(kernel_profile, ".rodata", 5 * PAGE + 0x100), 4, "golden"),
        (".rodata", quiet_offset(kernel_profile, ".rodata", pb_page * PAGE + 0x40), 4,
         "per-boot"),
        ("__ex_table", 8, 4, "golden"),
    ]
    proc = RunProc(["--qmp", str(victim.qmp), "--db", db, "--interval", str(INTERVAL),
                    "--forensics-dir", str(tmp_path / "forensics")], tmp_path / "run.err")
    try:
        proc.wait_for(lambda e: e["event"] == "vm_clean" and e["vm"] == "victim", 60)
        for region, offset, n, basis in cases:
            page, start = divmod(offset, PAGE)
            mark = proc.mark()
            t0 = time.monotonic()
            old = run(flip_bytes(victim.qmp_aux, kernel_profile, region, offset, n))
            ev = proc.wait_for(lambda e: e["event"] == "tamper", 2 * INTERVAL + 3, mark)
            latency = time.monotonic() - t0
            m = ev["mismatches"]
            assert [(x["region"], x["page"], x["basis"]) for x in m] == [(region, page, basis)]
            assert [(r["start"], r["end"]) for r in m[0]["ranges"]] == [(start, start + n)]
            assert int(m[0]["va"], 16) % PAGE == \
                (kernel_profile.section(region).addr + page * PAGE) % PAGE
            # The forensic copy is written after the event and the action (a failing
            # disk must not delay or suppress the detection): it follows within seconds.
            report = Path(ev["forensics"], "report.json")
            deadline = time.monotonic() + 10
            while not report.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert report.exists()
            # The one-shot check sees the same.
            rc, rep = check_json(victim, db)
            assert rc == 1
            got = [(x["region"], x["page"], x["basis"], x["ranges"][0]["start"])
                   for r in rep["regions"] for x in r["mismatches"]]
            assert got == [(region, page, basis, start)], got
            # Restore: the watcher says so, and check is clean again.
            mark = proc.mark()
            run(write_bytes(victim.qmp_aux, kernel_profile, region, offset, old))
            proc.wait_for(lambda e: e["event"] == "tamper_cleared", 2 * INTERVAL + 3, mark)
            assert check_json(victim, db)[0] == 0
            print(f"{region}+{offset:#x} ({basis}): detected by run in {latency:.1f}s")

        # One IDT gate pointed outside the kernel.
        mark = proc.mark()
        old_idt = run(_set_gate(victim, kernel_profile, 20, 0xFFFF_8880_1234_5678))
        ev = proc.wait_for(lambda e: e["event"] == "tamper", 2 * INTERVAL + 3, mark)
        assert [(x["region"], x["page"]) for x in ev["mismatches"]] == [("idt", 0)]
        assert all(20 * 16 <= r["start"] < 21 * 16 for r in ev["mismatches"][0]["ranges"])
        assert any(f["kind"] == "idt_handler_outside_text" and f["vector"] == 20
                   for f in ev["findings"])
        rc, rep = check_json(victim, db)
        assert rc == 1 and any(f["vector"] == 20 for f in rep["findings"])
        mark = proc.mark()
        run(write_bytes(victim.qmp_aux, kernel_profile, "idt", 20 * 16, old_idt))
        proc.wait_for(lambda e: e["event"] == "tamper_cleared", 2 * INTERVAL + 3, mark)
    finally:
        assert proc.stop() == 0
    assert proc.of("kscan_stopped") and not proc.bad_lines


async def _set_gate(g: Guest, profile: KernelProfile, vector: int, handler: int) -> bytes:
    vm, lk = await live_kernel(g.qmp_aux, profile)
    try:
        va = lk.regions["idt"].va + 16 * vector
        old = bytes(vm.mem.view(vm.walker().translate(va).gpa, 16))
        new = bytearray(old)
        new[0:2] = (handler & 0xFFFF).to_bytes(2, "little")
        new[6:8] = ((handler >> 16) & 0xFFFF).to_bytes(2, "little")
        new[8:12] = (handler >> 32).to_bytes(4, "little")
        write_guest(vm, va, bytes(new))
        return old
    finally:
        await vm.close()


def test_pause_on_tamper(victim: Guest, db: str, kernel_profile: KernelProfile,
                         tmp_path: Path) -> None:
    offset = quiet_offset(kernel_profile, ".text", 0x300020)
    proc = RunProc(["--qmp", str(victim.qmp), "--db", db, "--interval", "1",
                    "--on-tamper", "pause", "--forensics-dir", str(tmp_path / "f")],
                   tmp_path / "run.err")
    old = b""
    try:
        proc.wait_for(lambda e: e["vm"] == "victim" and e["event"] in ("vm_clean",
                                                                       "vm_identified"), 60)
        old = run(flip_bytes(victim.qmp_aux, kernel_profile, ".text", offset, 3))
        ev = proc.wait_for(lambda e: e["event"] == "action", 10)
        assert ev["action"] == "pause" and ev["ok"] and ev["run_state"] == "paused"
    finally:
        assert proc.stop() == 0

    async def state_then_resume() -> str:
        async with await QmpVm.connect(victim.qmp_aux) as q:
            st = (await q.run_state()).status
            await q.cont()
            return st
    assert run(state_then_resume()) == "paused"
    run(write_bytes(victim.qmp_aux, kernel_profile, ".text", offset, old))
    assert check_json(victim, db)[0] == 0


def test_exec_hook_gets_the_event(victim: Guest, db: str, kernel_profile: KernelProfile,
                                  tmp_path: Path) -> None:
    out = tmp_path / "hook.json"
    hook = tmp_path / "hook.py"
    hook.write_text(f"import sys\nopen({str(out)!r}, 'w').write(sys.stdin.read())\n")
    offset = quiet_offset(kernel_profile, ".rodata", 17 * PAGE)
    proc = RunProc(["--qmp", str(victim.qmp), "--db", db, "--interval", "1",
                    "--on-tamper", f"exec:{sys.executable} {hook}",
                    "--forensics-dir", str(tmp_path / "f")], tmp_path / "run.err")
    old = b""
    try:
        proc.wait_for(lambda e: e["vm"] == "victim" and e["event"] == "vm_identified", 60)
        old = run(flip_bytes(victim.qmp_aux, kernel_profile, ".rodata", offset, 2))
        ev = proc.wait_for(lambda e: e["event"] == "action", 15)
        assert ev["ok"] and ev["exit_code"] == 0
    finally:
        proc.stop()
        if old:
            run(write_bytes(victim.qmp_aux, kernel_profile, ".rodata", offset, old))
    got = json.loads(out.read_text())
    assert got["event"] == "tamper" and got["mismatches"][0]["region"] == ".rodata"


def test_accept_approved_change(victim: Guest, db: str, kernel_profile: KernelProfile) -> None:
    offset = quiet_offset(kernel_profile, ".text", 0x400040)
    old = run(flip_bytes(victim.qmp_aux, kernel_profile, ".text", offset, 2))
    try:
        assert check_json(victim, db)[0] == 1
        acc = kscan("accept", "--qmp", str(victim.qmp_aux), "--db", db, "--note", "test change")
        assert acc.returncode == 0 and "accepted 1 changed page" in acc.stdout, acc.stdout
        rc, rep = check_json(victim, db)
        text = next(r for r in rep["regions"] if r["region"] == ".text")
        assert rc == 0 and text["accepted"] == [offset // PAGE]
    finally:
        run(write_bytes(victim.qmp_aux, kernel_profile, ".text", offset, old))
    # Reverting an accepted change is a change too, against the accepted basis.
    rc, rep = check_json(victim, db)
    assert rc == 1 and rep["regions"][0]["mismatches"][0]["basis"] == "accepted"
    assert kscan("accept", "--qmp", str(victim.qmp_aux), "--db", db).returncode == 0
    assert check_json(victim, db)[0] == 0

    async def logged() -> list[str]:
        from store import Store
        async with Store.open(db) as st:
            return [e.event for e in await st.events(vm="victim")]
    assert run(logged()).count("accepted") == 2


def test_pti_guest_has_its_own_boot_profile(guests: GuestPool, db: str) -> None:
    """`pti=on` changes boot-time patching: that guest must not be checked against the
    baseline of guests without PTI, but told its boot profile has no baseline."""
    out = kscan("check", "--qmp", str(guests["big"].qmp_aux), "--db", db)
    assert out.returncode == 2, out.stdout
    assert "no golden baseline" in out.stderr and "/pti" in out.stderr, out.stderr
    rc, rep = check_json(guests["b"], db)
    assert rc == 0 and not rep["boot_profile"].endswith("/pti")


def test_discover_finds_running_guests(guests: GuestPool, db: str, tmp_path: Path) -> None:
    """`--discover` reads QEMU command lines: the standard guests are found and checked."""
    proc = RunProc(["--discover", "--db", db, "--interval", "2",
                    "--forensics-dir", str(tmp_path / "f")], tmp_path / "run.err")
    try:
        found = proc.wait_for(lambda e: e["event"] == "vm_found" and e["vm"] == "a", 60)
        assert found["kind"] == "discover"
        assert found["source"] == str(guests["a"].qmp)  # the first -qmp of its command line
        proc.wait_for(lambda e: e["event"] == "vm_clean" and e["vm"] == "a", 60)
    finally:
        assert proc.stop() == 0
    # Only the standard guests: --discover also finds the guests other test modules left
    # running with rootkits of their own loaded (test_modules_live, test_verifiers_live).
    standard = {spec.name for spec in STANDARD}
    assert not [e for e in proc.of("tamper") if e["vm"] in standard]


# ----------------------------------------------------------------------- the long run


@pytest.fixture
def closing_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that accepts and closes at once, forever."""
    path = tmp_path / "closing.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()
    srv.close()


def test_long_idle_run_with_failures(guests: GuestPool, db: str, kernel_profile: KernelProfile,
                                     closing_socket: Path, tmp_path: Path) -> None:
    """Several minutes over idle guests: no tampering reported; a killed VM, a socket
    that closes and a kernel without a profile are reported while the rest go on."""
    soak = float(os.environ.get("KSCAN_SOAK_SECONDS", "180"))
    doomed, unknown = guests.boot(GuestSpec("doomed"), GuestSpec("unknown"))
    run(_fake_build_id(unknown, kernel_profile))
    proc = RunProc(["--qmp", str(guests["a"].qmp), "--qmp", str(guests["b"].qmp),
                    "--qmp", str(doomed.qmp), "--qmp", str(unknown.qmp),
                    "--qmp", str(closing_socket), "--db", db, "--interval", "auto",
                    "--cpu-budget", "10", "--stats-every", "15",
                    "--forensics-dir", str(tmp_path / "f")], tmp_path / "run.err")
    t0 = time.monotonic()
    try:
        for name in ("a", "b", "doomed"):
            proc.wait_for(lambda e, n=name: e["event"] == "vm_clean" and e["vm"] == n, 90)
        missing = proc.wait_for(lambda e: e["event"] == "profile_missing", 90)
        assert missing["vm"] == "unknown" and ensure_kernel().release in missing["version"]
        proc.wait_for(lambda e: e["event"] == "vm_unreachable"
                      and e["source"] == str(closing_socket), 30)
        os.kill(doomed.pid, signal.SIGKILL)
        lost = proc.wait_for(lambda e: e["event"] == "vm_lost", 60)
        assert lost["vm"] == "doomed"
        after_kill = proc.mark()
        time.sleep(max(0.0, soak - (time.monotonic() - t0)))
        assert proc.proc.poll() is None, "kscan run exited"
    finally:
        rc = proc.stop()
    assert rc == 0
    assert proc.of("tamper") == [], proc.of("tamper")
    stats = [e for e in proc.events[after_kill:] if e["event"] == "stats"]
    assert stats and all(s["watching"] == 2 and s["scans"] > 0 for s in stats[1:]), stats
    assert all(0 <= s["keyed_scans"] <= s["scans"] for s in stats), stats
    # Two VMs leave the budget room: keyed every 16 periods, not every 300 s.
    assert all(s["keyed_every_s"] < 300 for s in stats), stats
    assert proc.of("kscan_stopped")
    print(f"idle run: {time.monotonic() - t0:.0f}s, {len(proc.events)} events, "
          f"last stats {stats[-1]}")


async def _fake_build_id(g: Guest, profile: KernelProfile) -> None:
    """Make the guest's kernel look like one with no stored profile: rewrite the GNU
    build-id note in its .notes (not a protected region)."""
    vm, lk = await live_kernel(g.qmp, profile)
    try:
        notes = profile.section(".notes")
        va = notes.addr + lk.slide
        data = b"".join(bytes(vm.mem.view(gpa, n)) for gpa, n in
                        vm.walker().translate_range(va, notes.size).gpa_runs())
        at = data.find(bytes.fromhex(profile.build_id))
        assert at > 0
        write_guest(vm, va + at, bytes(20))
    finally:
        await vm.close()

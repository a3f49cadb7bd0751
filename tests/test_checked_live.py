"""Nothing checked only once, and per-VM identity, on real guests (issue 15 §3, §4).

Guests (Debian 6.1 cloud kernel, TCG): `cv1` is baselined and watched; `cv2` is a
second QEMU started with `-name cv1` (an impostor claiming the watched VM's name).

* A verified ftrace trampoline overwritten after its verification: the function
  tracer allocates one (create_trampoline) and every traced `.text` site calls it;
  kscan verifies it; the host then overwrites one of its bytes (the guest is paused
  meanwhile, so the broken trampoline never runs) — `kscan run` reports `tamper`
  from the fast path, with not one `.text` byte changed.
* The impostor gets an `error` event and is not watched under the name; the victim's
  watcher, its per-VM state and an earlier tamper report are untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanner.image.kernel_profile import KernelProfile
from scanner.qemu.qmp import QmpVm
from scanner.vm import state_key
from tests.conftest import GuestPool, run
from tests.kscan_proc import RunProc, flip_bytes, kscan, live_kernel, write_bytes
from tools.guests import Guest, GuestSpec, ensure_kernel
from tools.tamper import write_guest

pytestmark = pytest.mark.guest
TRACING = "/sys/kernel/tracing"
TAMPER_AT = 0x500000 + 0x100  # a .text offset other live tests tamper with too


@pytest.fixture(scope="module")
def pool(guests: GuestPool) -> dict[str, Guest]:
    started = guests.boot(GuestSpec("cv1", smp=1), GuestSpec("cv2", smp=1,
                                                             extra=("-name", "cv1")))
    return {g.name: g for g in started}


@pytest.fixture(scope="module")
def db(pool: dict[str, Guest], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("checked") / "kscan.db")
    r = kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", path)
    assert r.returncode == 0, r.stderr
    r = kscan("baseline", "--qmp", str(pool["cv1"].qmp_aux), "--db", path)
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="module")
def kernel_profile_full() -> KernelProfile:
    from scanner.image.kernel_profile import profile_from_path

    return profile_from_path(ensure_kernel().vmlinuz)


def sh(g: Guest, command: str) -> str:
    rc, out = g.run(command, timeout=240)
    assert rc == 0, f"{command}: {out}"
    return out


async def _qmp(sock: Path, command: str) -> None:
    qmp = await QmpVm.connect(str(sock))
    try:
        await qmp.execute(command)
    finally:
        await qmp.close()


def trampoline_of(g: Guest, profile: KernelProfile) -> tuple[int, int, int]:
    """The run-time VA vfs_read's ftrace site calls (the tracer's allocated trampoline),
    and the run-time bounds of `.text`."""
    ks = profile.kallsyms
    assert ks is not None
    vfs_read = ks.lookup("vfs_read")
    assert vfs_read is not None

    async def go() -> tuple[int, int, int]:
        vm, lk = await live_kernel(g.qmp_aux, profile)
        try:
            text = lk.regions[".text"]
            site = vfs_read + lk.slide
            t = vm.walker().translate_range(site, 5)
            code = b"".join(bytes(vm.mem.view(a, n)) for a, n in t.gpa_runs())
            assert code[0] == 0xE8, code.hex()  # call: the tracer is on
            target = (site + 5 + int.from_bytes(code[1:5], "little", signed=True)) % (1 << 64)
            return target, text.va, text.va + text.size
        finally:
            await vm.close()

    return run(go())


def poke(g: Guest, profile: KernelProfile, va: int, data: bytes | None) -> bytes:
    """Write `data` at `va` (None: flip one byte); return the old bytes."""
    async def go() -> bytes:
        vm, _ = await live_kernel(g.qmp_aux, profile)
        try:
            t = vm.walker().translate_range(va, 1)
            old = b"".join(bytes(vm.mem.view(a, n)) for a, n in t.gpa_runs())
            write_guest(vm, va, data if data is not None else bytes([old[0] ^ 0xFF]))
            return old
        finally:
            await vm.close()

    return run(go())


@pytest.fixture
def watched(pool: dict[str, Guest], db: str, tmp_path: Path) -> Iterator[RunProc]:
    proc = RunProc(["--qmp", str(pool["cv1"].qmp), "--db", db, "--interval", "1",
                    "--forensics-dir", str(tmp_path / "f")], tmp_path / "run.err")
    try:
        proc.wait_for(lambda e: e["vm"] == "cv1" and e["event"] == "vm_clean", 120)
        yield proc
    finally:
        assert proc.stop() == 0


def test_a_verified_trampoline_overwritten_later_is_reported_by_the_fast_path(
        pool: dict[str, Guest], watched: RunProc, kernel_profile_full: KernelProfile
        ) -> None:
    g = pool["cv1"]
    mark = watched.mark()
    sh(g, f"echo function > {TRACING}/current_tracer")
    paused = False
    try:
        watched.wait_for(lambda e: e["event"] == "kernel_patched"
                         and e["mechanisms"].get("ftrace", 0) > 30000, 120, after=mark)
        tramp, text_lo, text_hi = trampoline_of(g, kernel_profile_full)
        assert not text_lo <= tramp < text_hi  # an allocated trampoline, outside .text
        time.sleep(3)  # settled: several clean fast passes over the traced kernel
        assert watched.of("tamper", "cv1", after=mark) == []
        # The trampoline's first instruction (compared with ftrace_caller's): with the
        # guest paused, the broken trampoline never runs, and nothing else changes.
        run(_qmp(g.qmp_aux, "stop"))
        paused = True
        before = watched.mark()
        t0 = time.monotonic()
        old = poke(g, kernel_profile_full, tramp, None)
        try:
            ev = watched.wait_for(lambda e: e["event"] == "tamper" and e["vm"] == "cv1",
                                  30, after=before)
            print(f"trampoline overwrite reported in {time.monotonic() - t0:.1f}s "
                  f"({ev['mismatches_total']} .text pages)")
            # Reported where the verdict rested on it: the .text sites calling it no
            # longer verify (their bytes are unchanged: only the trampoline was written).
            assert ev["mismatches"] and {m["region"] for m in ev["mismatches"]} == {".text"}
            assert ev["patched"] is not None
        finally:
            poke(g, kernel_profile_full, tramp, old)
        watched.wait_for(lambda e: e["event"] == "tamper_cleared" and e["vm"] == "cv1", 30,
                         after=before)
    finally:
        if paused:
            run(_qmp(g.qmp_aux, "cont"))
        sh(g, f"echo nop > {TRACING}/current_tracer")


def test_the_impostor_reports_the_victims_name(pool: dict[str, Guest]) -> None:
    # The impostor really reports the victim's name over QMP (what the tests below need).
    async def name_of(sock: Path) -> str:
        qmp = await QmpVm.connect(str(sock))
        try:
            reply = await qmp.execute("query-name")
            assert isinstance(reply, dict)
            return str(reply.get("name"))
        finally:
            await qmp.close()

    assert run(name_of(pool["cv2"].qmp_aux)) == "cv1"
    assert run(name_of(pool["cv1"].qmp_aux)) == "cv1"


def _state_rows(db: str) -> dict[str, bytes]:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {str(k): bytes(v) if isinstance(v, bytes) else str(v).encode()
                for k, v in con.execute("SELECT vm_id, state FROM vm_state")}
    finally:
        con.close()


def test_an_impostor_claiming_a_watched_name_is_not_watched_under_it(
        pool: dict[str, Guest], db: str, kernel_profile: KernelProfile,
        tmp_path: Path) -> None:
    """`cv2` is a QEMU started with `-name cv1` (what a --discover-user QEMU can do).
    It appears while the victim is watched, with a tampering already reported: it gets
    an `error`, is not watched, and neither the victim's watcher, nor its per-VM state,
    nor the tamper report are touched (before: it was watched as `cv1`, sharing the
    victim's state row, scheduler entry and verdicts)."""
    victim, impostor = pool["cv1"], pool["cv2"]
    late = tmp_path / "impostor.sock"  # appears later: an explicit path is re-looked at
    proc = RunProc(["--qmp", str(victim.qmp), "--qmp", str(late), "--db", db,
                    "--interval", "1", "--forensics-dir", str(tmp_path / "f")],
                   tmp_path / "run.err")
    old = None
    try:
        proc.wait_for(lambda e: e["vm"] == "cv1" and e["event"] == "vm_clean", 120)
        old = run(flip_bytes(victim.qmp_aux, kernel_profile, ".text", TAMPER_AT, 2))
        tamper = proc.wait_for(lambda e: e["vm"] == "cv1" and e["event"] == "tamper", 60)
        key = state_key(str(victim.qmp), None)
        rows = _state_rows(db)
        assert key in rows and "cv1" not in rows  # keyed by identity, not by name
        mark = proc.mark()
        late.symlink_to(impostor.qmp)
        err = proc.wait_for(lambda e: e["event"] == "error" and e.get("source") == str(late),
                            60, after=mark)
        assert err["name"] == "cv1" and str(victim.qmp) in err["message"]
        time.sleep(5)  # several more scans of the victim; the impostor is retried later
        after = proc.events[mark:]
        assert not [e for e in after if e["event"] == "vm_found"]  # not watched at all
        assert not [e for e in after if e.get("vm") == "cv1" and e["event"] in (
            "vm_clean", "vm_identified", "tamper_cleared", "vm_lost", "vm_rebooted")]
        assert _state_rows(db)[key] == rows[key]  # the victim's per-VM state untouched
        assert len([k for k in _state_rows(db) if k != key]) == 0
        # The victim's watcher runs on: its tampering undone → cleared.
        run(write_bytes(victim.qmp_aux, kernel_profile, ".text", TAMPER_AT, old))
        old = None
        proc.wait_for(lambda e: e["vm"] == "cv1" and e["event"] == "tamper_cleared", 60,
                      after=mark)
        assert tamper["mismatches"][0]["page"] == TAMPER_AT // 4096
    finally:
        if old is not None:
            run(write_bytes(victim.qmp_aux, kernel_profile, ".text", TAMPER_AT, old))
        assert proc.stop() == 0

"""The reading path on real guests: QMP, RAM layout, page walks and reads, against
QEMU's own answers (HMP `gva2gpa`, `xp`, QMP `pmemsave`)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanner.errors import QmpError
from scanner.qemu.qmp import QmpVm
from scanner.vm import AttachedVm
from tests.conftest import GuestPool, run
from tools.guests import QEMU
from translate import FIVE_LEVEL, FOUR_LEVEL, GuestMemory, PageWalker, kernel_space
from translate.paging import ADDR_MASK, PS
from translate.x86 import CR4_LA57

pytestmark = pytest.mark.guest


def sample_kernel_vas(mem: GuestMemory, pgd: int, levels: int, per_table: int = 8) -> list[int]:
    """Mapped kernel VAs found by reading the tables directly (up to `per_table` present
    entries at each level, evenly spread), over every present kernel-half slot."""
    out: list[int] = []
    shifts = [48, 39, 30, 21, 12][5 - levels:]

    def pick(idxs: list[int]) -> list[int]:
        if len(idxs) <= per_table:
            return idxs
        step = (len(idxs) - 1) / (per_table - 1)
        return sorted({idxs[round(k * step)] for k in range(per_table)})

    def descend(table: int, depth: int, va: int) -> None:
        tab = mem.view(table, 4096).cast("Q")
        rng = range(256, 512) if depth == 0 else range(512)
        present = [i for i in rng if tab[i] & 1]
        for i in pick(present):
            e = tab[i]
            v = va | (i << shifts[depth])
            if depth == 0 and v & (1 << 47 if levels == 4 else 1 << 56):
                v |= (0xFFFF_8000_0000_0000 if levels == 4 else 0xFF00_0000_0000_0000)
            leaf = shifts[depth] == 12 or (depth > 0 and e & PS and shifts[depth] <= 30)
            if leaf:
                out.append(v + 0x123)
            elif mem.contains(e & ADDR_MASK, 4096):
                descend(e & ADDR_MASK, depth + 1, v)

    descend(pgd, 0, 0)
    return out


async def _stopped_in_kernel(vm: AttachedVm) -> None:
    """Pause the VM with vCPU 0 in kernel mode, so QEMU's gva2gpa (which walks vCPU 0's
    current CR3) sees the kernel address space as kscan does."""
    for _ in range(50):
        await vm.qmp.stop()
        await vm.refresh_vcpus()
        if vm.vcpus[0].cpl == 0:
            return
        await vm.qmp.cont()
        await asyncio.sleep(0.05)
    raise AssertionError("vCPU 0 never seen in kernel mode")


async def _compare_with_qemu(sock: Path, expect_mode: object) -> dict[str, int]:
    async with await AttachedVm.attach(sock) as vm:
        await _stopped_in_kernel(vm)
        try:
            ks = kernel_space(vm.mem, vm.vcpus[0])
            assert ks.mode is expect_mode
            walker = PageWalker(vm.mem, ks.pgd, ks.mode, nxe=ks.nxe)
            vas = sample_kernel_vas(vm.mem, ks.pgd, len(ks.mode.levels))
            idt = vm.vcpus[0].idtr_base
            # IDT gate handlers (decoded here by hand, independently of kscan's decoder).
            raw = bytes(vm.mem.view(walker.translate(idt).gpa, 4096))
            handlers = sorted({int.from_bytes(raw[i:i + 2] + raw[i + 6:i + 12], "little")
                               for i in range(0, 4096, 16) if raw[i + 5] & 0x80})
            vas = [idt, idt + 0xFF0, vm.vcpus[0].rip, *handlers[::8], *vas]
            assert len(vas) >= 50, f"only {len(vas)} kernel VAs sampled"
            slots = collections.Counter()
            agreed = 0
            for va in vas:
                ours = walker.translate(va).gpa
                theirs = await vm.qmp.gva2gpa(va)
                assert ours == theirs, f"va {va:#x}: kscan {ours:#x} QEMU {theirs}"
                slots[(va >> 39) & 0x1FF] += 1
                agreed += 1
            # Bytes: kscan's zero-copy view equals QEMU's pmemsave and xp.
            checked = 0
            for va in vas[:: max(1, len(vas) // 12)]:
                gpa = walker.translate(va).gpa & ~0xFFF
                if not vm.mem.contains(gpa, 4096):
                    continue
                out = sock.parent / f"pmem-{gpa:x}"
                await vm.qmp.execute("pmemsave", {"val": gpa, "size": 4096,
                                                  "filename": str(out)})
                assert out.read_bytes() == bytes(vm.mem.view(gpa, 4096)), f"gpa {gpa:#x}"
                out.unlink()
                xp = await vm.qmp.hmp(f"xp /2gx {gpa + 8:#x}")
                words = [int(w, 16) for w in xp.split(":", 1)[1].split()]
                assert words == [vm.mem.read_u64(gpa + 8), vm.mem.read_u64(gpa + 16)]
                checked += 1
            assert checked >= 8
            return {"agreed": agreed, "slots": len(slots)}
        finally:
            await vm.qmp.cont()


def test_walker_and_reads_match_qemu_4level(guests: GuestPool) -> None:
    res = run(_compare_with_qemu(guests["a"].qmp, FOUR_LEVEL))
    assert res["slots"] >= 3  # direct map, vmalloc/CEA, kernel text at least


def test_five_level_paging_guest(guests: GuestPool) -> None:
    async def check() -> None:
        async with await AttachedVm.attach(guests["la57"].qmp) as vm:
            assert vm.vcpus[0].cr4 & CR4_LA57, "CPU max did not give 5-level paging"
    run(check())
    run(_compare_with_qemu(guests["la57"].qmp, FIVE_LEVEL))


def test_ram_above_4g(guests: GuestPool) -> None:
    async def check() -> None:
        async with await AttachedVm.attach(guests["big"].qmp) as vm:
            assert [(r.gpa, r.offset) for r in vm.layout] == [(0, 0), (1 << 32, 0x80000000)]
            assert sum(r.size for r in vm.layout) == 4096 << 20
            await _stopped_in_kernel(vm)
            try:
                ks = kernel_space(vm.mem, vm.vcpus[0])
                walker = PageWalker(vm.mem, ks.pgd, ks.mode, nxe=ks.nxe)
                # The direct map: the most common (va - gpa) over large-page leaves.
                bases = collections.Counter()
                for va in sample_kernel_vas(vm.mem, ks.pgd, 4):
                    m = walker.translate(va)
                    if m.page_size > 4096:
                        bases[va - m.gpa] += 1
                direct = bases.most_common(1)[0][0]
                compared = 0
                for i in range(16):
                    gpa = (1 << 32) + i * 0x7FF_3000
                    va = direct + gpa
                    assert walker.translate(va).gpa == gpa
                    assert await vm.qmp.gva2gpa(va) == gpa
                    page = gpa & ~0xFFF
                    out = guests["big"].dir / "pmem"
                    await vm.qmp.execute("pmemsave", {"val": page, "size": 4096,
                                                      "filename": str(out)})
                    assert out.read_bytes() == bytes(vm.mem.view(page, 4096))
                    compared += 1
                # And a page above 4 GiB that holds data, not just zeros.
                top = (1 << 32) + (2048 << 20) - 4096
                nonzero = next(g for g in range(top, 1 << 32, -4096)
                               if any(vm.mem.view(g, 4096)))
                await vm.qmp.execute("pmemsave", {"val": nonzero, "size": 4096,
                                                  "filename": str(out)})
                assert out.read_bytes() == bytes(vm.mem.view(nonzero, 4096))
                assert compared == 16
            finally:
                await vm.qmp.cont()
    run(check())


def test_pti_guest_kernel_pgd(guests: GuestPool) -> None:
    """`pti=on`: the kernel PGD chosen maps text and direct map; its user twin does not."""
    async def check() -> None:
        async with await AttachedVm.attach(guests["big"].qmp) as vm:
            ks = kernel_space(vm.mem, vm.vcpus[0])
            assert ks.pgd & 0x1FFF == 0
            user = PageWalker(vm.mem, ks.pgd + 0x1000, ks.mode)
            kern = PageWalker(vm.mem, ks.pgd, ks.mode)
            rip_kernel = [v.rip for v in vm.vcpus if v.cpl == 0]
            assert rip_kernel
            assert kern.try_translate(rip_kernel[0]) is not None
            # The PTI user PGD maps far fewer kernel slots.
            kt = vm.mem.view(ks.pgd, 4096).cast("Q")
            ut = vm.mem.view(ks.pgd + 0x1000, 4096).cast("Q")
            assert sum(1 for i in range(256, 512) if ut[i] & 1) < \
                sum(1 for i in range(256, 512) if kt[i] & 1)
            del kt, ut, user
    run(check())


def test_inspect_json(guests: GuestPool) -> None:
    g = guests["b"]
    out = subprocess.run([sys.executable, "-m", "scanner", "inspect", "--qmp", str(g.qmp),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["name"] == "b"
    assert doc["memory"] == [{"gpa": "0x0", "size": 512 << 20, "file": str(g.mem_path),
                              "offset": 0}]
    v = doc["vcpus"][0]
    assert {"cr0", "cr3", "cr4", "idtr_base", "idtr_limit"} <= v.keys()
    assert v["idtr_limit"] == 0xFFF and int(v["cr0"], 16) & (1 << 31)  # hex strings
    assert doc["idt"]["va"] == v["idtr_base"] and doc["idt"]["size"] == 4096

    async def oracle() -> int | None:
        async with await QmpVm.connect(g.qmp) as q:
            return await q.gva2gpa(int(v["idtr_base"], 16))
    assert doc["idt"]["gpa"] == hex(run(oracle()) or -1)
    text = subprocess.run([sys.executable, "-m", "scanner", "inspect", "--qmp", str(g.qmp)],
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and "IDT:" in text.stdout
    assert f"{doc['idt']['gpa']}" in text.stdout


# ----------------------------------------------------------------------- bad input


def kscan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scanner", *args], capture_output=True,
                          text=True, timeout=60)


def assert_one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_socket(tmp_path: Path) -> None:
    sock = tmp_path / "nope.sock"
    assert_one_line_error(kscan("inspect", "--qmp", str(sock)), str(sock), "no such socket")


@pytest.fixture
def fake_socket(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A unix socket that speaks something other than QMP (set the reply in the list)."""
    path = tmp_path / "fake.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    reply: list[bytes] = [b"SSH-2.0-OpenSSH_9.2\r\n"]
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        conns = []
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            conns.append(c)
            if reply[0]:
                c.sendall(reply[0])
        for c in conns:
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, reply
    stop.set()
    t.join()
    srv.close()


def test_non_qmp_socket(fake_socket: tuple[Path, list[bytes]]) -> None:
    path, _ = fake_socket
    assert_one_line_error(kscan("inspect", "--qmp", str(path)), str(path), "QMP")


def test_silent_socket_times_out(fake_socket: tuple[Path, list[bytes]]) -> None:
    path, reply = fake_socket
    reply[0] = b""  # accept, then say nothing: a hung peer

    async def go() -> None:
        await QmpVm.connect(path, timeout=0.5)
    with pytest.raises(QmpError, match="no QMP greeting"):
        run(go())


def _bare_qemu(tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen([QEMU, "-accel", "tcg", "-machine", "q35", "-nodefaults",
                             "-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if sock.exists():
            break
        threading.Event().wait(0.05)
    return proc


def test_vm_without_file_backed_ram(tmp_path: Path) -> None:
    proc = _bare_qemu(tmp_path, "-m", "64")
    try:
        assert_one_line_error(kscan("inspect", "--qmp", str(tmp_path / "q.sock")),
                              "memory-backend-file")
    finally:
        proc.kill()
        proc.wait()


def test_vm_with_private_file_backend(tmp_path: Path) -> None:
    mem = Path("/dev/shm") / f"kscan-test-private-{os.getpid()}"
    proc = _bare_qemu(tmp_path, "-m", "64", "-object",
                      f"memory-backend-file,id=ram0,size=64M,mem-path={mem},share=off",
                      "-machine", "memory-backend=ram0")
    try:
        assert_one_line_error(kscan("inspect", "--qmp", str(tmp_path / "q.sock")), "share=on")
    finally:
        proc.kill()
        proc.wait()
        mem.unlink(missing_ok=True)

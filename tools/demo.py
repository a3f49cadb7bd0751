"""The demo behind `tools/demo`: kscan catching a kernel rootkit-style change, end to end.

1. boots two real guests (QEMU/TCG, Debian cloud kernel, busybox),
2. stores the kernel's profile and baselines guest `demo0` as the verified VM,
3. runs `kscan run --interval auto --on-tamper pause` over both (JSON events on stdout,
   human-readable log on stderr),
4. once both are checked clean, overwrites a few bytes of `demo1`'s kernel text through
   its memory-backend file (an inline hook, as a rootkit would write),
5. shows the detection event and `demo1`'s run state: paused.

Run through `tools/demo` (which installs everything first). Guests are stopped and their
files removed at the end, also on Ctrl-C. The database lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.guests import GuestSpec, boot, default_run_dir, ensure_kernel
from tools.kscan_run import KscanRun


def say(msg: str) -> None:
    print(f"\n[demo] {msg}", file=sys.stderr, flush=True)


def kscan(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "scanner", *args], text=True,
                         capture_output=True)
    sys.stderr.write(out.stdout + out.stderr)
    out.check_returncode()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=default_run_dir() / "demo")
    ap.add_argument("--keep", action="store_true", help="leave the guests running at the end")
    args = ap.parse_args(argv)

    say("booting 2 guests under TCG (Debian cloud kernel, busybox initramfs)...")
    guests = boot([GuestSpec("demo0"), GuestSpec("demo1")], args.dir)
    g0, g1 = guests
    work = Path(tempfile.mkdtemp(prefix="kscan-demo-"))
    db = str(work / "kscan.db")
    proc = None
    try:
        say("kscan profile add  (the guests' kernel image; no symbols needed)")
        kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", db)
        say("kscan baseline --qmp demo0   (demo0 is the verified VM)")
        kscan("baseline", "--qmp", str(g0.qmp_aux), "--db", db)
        say("kscan run --interval auto --on-tamper pause   (JSON events follow on stdout)")
        ev = proc = KscanRun(["--qmp", str(g0.qmp), "--qmp", str(g1.qmp), "--db", db,
                              "--interval", "auto", "--on-tamper", "pause",
                              "--forensics-dir", str(work / "forensics")], tee=True)
        for g in guests:
            ev.wait_for(lambda e, n=g.name: e["event"] == "vm_clean" and e["vm"] == n, 120)
        time.sleep(3)
        say("attack: overwriting 5 bytes of demo1's kernel .text with a jmp (inline hook)")
        subprocess.run([sys.executable, "-m", "tools.tamper", "--qmp", str(g1.qmp_aux),
                        "--db", db, "--region", ".text", "--offset", "0x600010",
                        "--bytes", "e9deadbeef"], check=True, stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        hit = ev.wait_for(lambda e: e["event"] == "tamper" and e["vm"] == "demo1", 60)
        act = ev.wait_for(lambda e: e["event"] == "action" and e["vm"] == "demo1", 30)
        m = hit["mismatches"][0]
        say(f"detected in {time.monotonic() - t0:.1f}s: {m['region']} page {m['page']} "
            f"va {m['va']} gpa {m['gpa']}, bytes {m['ranges'][0]['start']:#x}-"
            f"{m['ranges'][0]['end']:#x}: {m['ranges'][0]['before']} -> "
            f"{m['ranges'][0]['after']} ({m['ranges'][0]['kind']})")
        state = asyncio.run(_run_state(g1.qmp_aux))
        say(f"action: {act['action']} -> demo1 run state is now '{state}'; "
            f"forensic copy in {hit['forensics']}")
        say("demo0 stayed clean" if not ev.of("tamper", "demo0")
            else "demo0 reported tampering?!")
    finally:
        if proc is not None:
            proc.stop()
        if not args.keep:
            for g in guests:
                g.stop()
    return 0


async def _run_state(sock: Path) -> str:
    from scanner.qemu.qmp import QmpVm

    async with await QmpVm.connect(sock) as q:
        return (await q.run_state()).status


if __name__ == "__main__":
    sys.exit(main())

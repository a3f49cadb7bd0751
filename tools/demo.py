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
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tools.guests import GuestSpec, boot, default_run_dir, ensure_kernel


def say(msg: str) -> None:
    print(f"\n[demo] {msg}", file=sys.stderr, flush=True)


def kscan(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "scanner.cli", *args], text=True,
                         capture_output=True)
    sys.stderr.write(out.stdout + out.stderr)
    out.check_returncode()
    return out


class Events:
    """Tee `kscan run`'s stdout to ours and remember the events."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            with self.cond:
                self.events.append(json.loads(line))
                self.cond.notify_all()

    def wait(self, pred: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("[demo] kscan run did not report what was expected")
                self.cond.wait(0.5)


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
        proc = subprocess.Popen(
            [sys.executable, "-m", "scanner.cli", "run", "--qmp", str(g0.qmp), "--qmp",
             str(g1.qmp), "--db", db, "--interval", "auto", "--on-tamper", "pause",
             "--forensics-dir", str(work / "forensics")], stdout=subprocess.PIPE)
        ev = Events(proc)
        for g in guests:
            ev.wait(lambda e, n=g.name: e["event"] == "vm_clean" and e["vm"] == n, 120)
        time.sleep(3)
        say("attack: overwriting 5 bytes of demo1's kernel .text with a jmp (inline hook)")
        subprocess.run([sys.executable, "-m", "tools.tamper", "--qmp", str(g1.qmp_aux),
                        "--db", db, "--region", ".text", "--offset", "0x600010",
                        "--bytes", "e9deadbeef"], check=True, stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        hit = ev.wait(lambda e: e["event"] == "tamper" and e["vm"] == "demo1", 60)
        act = ev.wait(lambda e: e["event"] == "action" and e["vm"] == "demo1", 30)
        m = hit["mismatches"][0]
        say(f"detected in {time.monotonic() - t0:.1f}s: {m['region']} page {m['page']} "
            f"va {m['va']:#x} gpa {m['gpa']:#x}, bytes {m['ranges'][0]['start']:#x}-"
            f"{m['ranges'][0]['end']:#x}: {m['ranges'][0]['before']} -> "
            f"{m['ranges'][0]['after']} ({m['ranges'][0]['kind']})")
        state = asyncio.run(_run_state(g1.qmp_aux))
        say(f"action: {act['action']} -> demo1 run state is now '{state}'; "
            f"forensic copy in {hit['forensics']}")
        clean = [e for e in ev.events if e["event"] == "tamper" and e["vm"] == "demo0"]
        say("demo0 stayed clean" if not clean else "demo0 reported tampering?!")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        if not args.keep:
            for g in guests:
                g.stop()
    return 0


async def _run_state(sock: Path) -> str:
    from scanner.qmp import QmpVm

    async with await QmpVm.connect(sock) as q:
        return (await q.run_state()).status


if __name__ == "__main__":
    sys.exit(main())

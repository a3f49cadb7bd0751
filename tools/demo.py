"""The demo behind `tools/demo`: boot two guests and show what kscan sees of them.

Run through `tools/demo` (which installs everything first). The guests are stopped and
their files removed when the demo ends, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tools.guests import GuestSpec, boot, default_run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/demo", description=__doc__)
    ap.add_argument("--dir", type=Path, default=default_run_dir() / "demo")
    args = ap.parse_args(argv)
    print("[demo] booting 2 guests under TCG (Debian cloud kernel, busybox)...",
          file=sys.stderr)
    guests = boot([GuestSpec("demo0"), GuestSpec("demo1")], args.dir)
    try:
        for g in guests:
            print(f"[demo] kscan inspect --qmp {g.qmp}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "scanner.cli", "inspect", "--qmp",
                            str(g.qmp)], check=True)
    finally:
        for g in guests:
            g.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `kscan` argument parser: every command, its options, help and examples.

Built fresh by `build_parser()` (the configuration file's defaults are set on a new one,
and SIGHUP parses again). Options `kscan run`'s configuration file can switch on are
`BooleanOptionalAction`s, so the command line can switch them off again (`--no-strict`).
The commands' code is in `commands.handlers` (one-shot), `commands.run_policy` (`run`),
`status`, `events_cmd` and `stored`; the value types are in `commands.options`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from kscan import __version__
from scanner.commands.handlers import (
    cmd_accept,
    cmd_baseline,
    cmd_check,
    cmd_export,
    cmd_import,
    cmd_inspect,
    cmd_key_rotate,
    cmd_key_show,
    cmd_profile_add,
    cmd_profile_list,
)
from scanner.commands.options import (
    DEFAULT_URI,
    MAX_WORKERS,
    STRICT_HELP,
    TRUST_HELP,
    Parser,
    bound_seconds,
    default_uri,
    duration,
    interval,
    module_name,
    non_negative,
    percent,
    stats_every,
    workers,
)
from scanner.commands.run_policy import cmd_run

__all__ = ["EPILOG", "build_parser"]

EPILOG = """\
examples:
  kscan profile add /boot/vmlinuz-6.1.0-56-cloud-amd64    store a kernel's profile
  kscan profile list
  kscan inspect --qmp /run/vm1/qmp.sock            layout, registers, kernel, regions
  kscan inspect --qmp /run/vm1/qmp.sock --json     the same as one JSON object
  kscan baseline --qmp /run/golden/qmp.sock        hash a known-good VM
  kscan check --qmp /run/vm7/qmp.sock              verify once: exit 0 clean, 1 tampered
  kscan run --qmp '/run/*/qmp.sock' --interval auto    watch them all (JSON lines)
  kscan check --libvirt web01                      a libvirt domain (kscan[libvirt])
  kscan check --qmp /run/vm7/qmp.sock --strict     tracing counts as tampering too
  kscan check --core vm7.elf --vm vm7              a memory image (dump-guest-memory)
  kscan run --libvirt                              every running libvirt domain
  kscan run --config /etc/kscan/kscan.toml         as the systemd unit runs it
  kscan status                                     each VM's last verdict
  kscan events --since 1h --severity warning       the event log, without sqlite3
  kscan baseline list                              stored golden baselines
  kscan run --config /etc/kscan/kscan.toml --check-config    validate, run nothing
  kscan export --out base.kscan --key signer.pem   share verified baselines
  kscan import base.kscan --trust signer.pub.pem   trust them on another host
  kscan --contrib-dir                              the installed unit, example config

Without --db PATH the database is $KSCAN_DB, else the service's (systemd's
$STATE_DIRECTORY, or /var/lib/kscan/kscan.db for root when it exists), else
$XDG_STATE_HOME/kscan/kscan.db (~/.local/state/kscan/kscan.db). Its secret hash key is
DB.key beside it (0600, never shared); `kscan key rotate` replaces it.
"""


class _PrintContribDir(argparse.Action):
    """`kscan --contrib-dir`: the installed directory of kscan.shipped's files."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from kscan.shipped import contrib_dir

        print(contrib_dir())
        parser.exit()


def build_parser() -> Parser:
    from scanner.commands.events_cmd import add_parser as add_events
    from scanner.commands.status import add_parser as add_status
    from scanner.commands.stored import add_baseline_actions, add_profile_rm

    ap = Parser(
        prog="kscan",
        description="Agentless runtime integrity monitor for the Linux kernels of QEMU/KVM VMs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"kscan {__version__}")
    ap.add_argument("--contrib-dir", action=_PrintContribDir,
                    help="print where the shipped files are installed (the systemd unit, "
                         "the example configuration, the event schemas) and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect", help="show a VM's memory layout, vCPU registers and IDT translation",
        epilog="example:\n  kscan inspect --qmp /tmp/kscan-guests-0/demo0/qmp.sock --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--qmp", metavar="SOCK", help="the VM's QMP unix socket")
    src.add_argument("--core", metavar="FILE", help="an ELF memory image (dump-guest-memory)")
    _libvirt_args(p, src)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _db_arg(p)
    p.set_defaults(func=cmd_inspect)

    keyp = sub.add_parser("key", help="the secret hash key every comparison is keyed under")
    ksub = keyp.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    p = ksub.add_parser("show", help="say where the key is (never what it is)")
    _db_arg(p)
    p.set_defaults(func=cmd_key_show)
    p = ksub.add_parser("rotate", help="replace the key; re-hash the golden baselines and "
                                       "per-VM states from the bytes they keep")
    _db_arg(p)
    p.set_defaults(func=cmd_key_rotate)

    prof = sub.add_parser("profile",
                          help="kernel profiles: add a kernel image, list or remove them")
    psub = prof.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    p = psub.add_parser(
        "add", help="read a vmlinuz/bzImage or vmlinux and store its profile",
        epilog="examples:\n  kscan profile add /boot/vmlinuz-6.1.0-56-cloud-amd64\n"
               "  kscan profile add vmlinux --system-map System.map-6.1.0-56-cloud-amd64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="kernel image: bzImage/vmlinuz or vmlinux")
    p.add_argument("--system-map", metavar="FILE",
                   help="a real System.map, to name symbols in reports (optional)")
    _db_arg(p)
    p.set_defaults(func=cmd_profile_add)
    p = psub.add_parser("list", help="list stored profiles")
    p.add_argument("--json", action="store_true")
    _db_arg(p)
    p.set_defaults(func=cmd_profile_list)
    add_profile_rm(psub, _db_arg)

    p = sub.add_parser(
        "baseline", help="hash a verified VM's protected regions as the golden baseline "
        "(list, rm: the stored ones)",
        description="Hash the protected regions (.text, .rodata, __ex_table, IDT) of VMs "
        "you declare verified (known-good), normalized for KASLR, and store them as the "
        "golden baseline of their kernel build and boot profile (CPU model, features, "
        "page-table isolation; not the vCPU count). Run it on a second verified VM of "
        "the same kernel to merge: .rodata pages that differ between verified boots "
        "become per-boot pages.",
        epilog="examples:\n  kscan baseline --qmp /run/golden1/qmp.sock\n"
               "  kscan baseline --qmp /run/golden1/qmp.sock --qmp /run/golden2/qmp.sock",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--qmp", action="append", metavar="SOCK",
                   help="QMP socket of a verified VM (repeat for several)")
    p.add_argument("--replay", action="append", metavar="DIR",
                   help="a recorded verified VM (tools/record.py) instead of a live one")
    p.add_argument("--libvirt", action="append", metavar="DOMAIN",
                   help="a verified libvirt domain, by name or UUID (repeatable)")
    p.add_argument("--connect", default=default_uri(), metavar="URI",
                   help="libvirt connection URI (default $LIBVIRT_DEFAULT_URI, else "
                        f"{DEFAULT_URI})")
    _db_arg(p)
    p.set_defaults(func=cmd_baseline)
    add_baseline_actions(p, _db_arg)

    p = sub.add_parser(
        "check", help="verify a VM once against the baselines (exit 0 clean, 1 tampered)",
        epilog="examples:\n  kscan check --qmp /run/vm7/qmp.sock\n"
               "  kscan check --qmp /run/vm7/qmp.sock --json | jq .regions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--qmp", metavar="SOCK")
    src.add_argument("--replay", metavar="DIR", help="a recorded VM (tools/record.py)")
    src.add_argument("--core", metavar="FILE",
                     help="an ELF memory image from QMP dump-guest-memory or virsh dump "
                          "--memory-only (offline; nothing is recorded for the VM)")
    _libvirt_args(p, src)
    p.add_argument("--vm", metavar="NAME",
                   help="--core: the VM the image is of (its per-VM baseline is used; "
                        "default: the file's name)")
    p.add_argument("--boot-profile", metavar="KEY",
                   help="--core: the boot profile whose golden baseline to use (needed "
                        "only when several are stored for the kernel)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--strict", action="store_true",
                   help=STRICT_HELP)
    p.add_argument("--trust-module", action="append", metavar="NAME", type=module_name,
                   help=TRUST_HELP)
    _db_arg(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "accept", help="approve a VM's current kernel bytes after an approved change",
        description="Record the pages in which the VM now differs from its baselines as "
        "accepted for this VM and this boot (e.g. after enabling ftrace on purpose). "
        "Control-state findings (W^X, CR0.WP, SMEP/SMAP, IDT gates) are never accepted. "
        "Recorded in the event log.",
        epilog="example:\n  kscan accept --qmp /run/vm7/qmp.sock --note 'ftrace for ticket 42'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--qmp", metavar="SOCK")
    _libvirt_args(p, src)
    p.add_argument("--note", help="why (kept in the event log)")
    _db_arg(p)
    p.set_defaults(func=cmd_accept)

    add_status(sub, _db_arg)
    add_events(sub, _db_arg)

    p = sub.add_parser(
        "export", help="write profiles and golden baselines to one signed bundle file",
        description="Write the stored kernel profiles and golden baselines (with their "
        "boot profiles, per-boot pages, verified-boot counts and golden content) to one "
        "file signed with an Ed25519 private key, for other hosts to `kscan import`.",
        epilog="examples:\n  openssl genpkey -algorithm ed25519 -out kscan-sign.pem\n"
               "  openssl pkey -in kscan-sign.pem -pubout -out kscan-sign.pub.pem\n"
               "  kscan export --out debian-6.1.kbundle --key kscan-sign.pem",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="BUNDLE", help="the bundle file to write")
    p.add_argument("--key", required=True, metavar="KEY.pem",
                   help="Ed25519 private key, PEM (openssl genpkey -algorithm ed25519)")
    p.add_argument("--build-id", action="append", metavar="ID",
                   help="only this kernel build (repeatable; default: every stored one)")
    _db_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="verify a signed bundle and merge its baselines into the database",
        description="Verify a bundle made by `kscan export` with the signer's public key, "
        "then add its profiles and golden baselines. Nothing is written unless the whole "
        "bundle verifies. A golden baseline or profile already stored for the same kernel "
        "(and boot profile) is kept when it differs from the bundle's, unless --replace. "
        "A bundle older than the newest imported from the same key is refused unless "
        "--allow-older, and a bundle not newer than that brings back no baseline deleted "
        "here unless --replace. Recorded in the event log with the key's fingerprint and "
        "the bundle's sequence number.",
        epilog="example:\n  kscan import debian-6.1.kbundle --trust kscan-sign.pub.pem",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle written by kscan export")
    p.add_argument("--trust", required=True, metavar="PUB.pem",
                   help="the signer's Ed25519 public key, PEM (openssl pkey -pubout)")
    p.add_argument("--replace", action="store_true",
                   help="replace local golden baselines and profiles that differ from the "
                   "bundle's, and restore baselines deleted here since")
    p.add_argument("--allow-older", action="store_true",
                   help="take a bundle older than the newest imported from its signing "
                   "key, or a format-1 bundle (no sequence number); what it adds or "
                   "changes still follows --replace")
    _db_arg(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "run", help="watch VMs continuously; JSON-lines events on stdout",
        description="Watch many VMs at once. Each VM is checked once its kernel has "
        "booted, then re-checked at an adaptive interval; every change is localized and "
        "reported as a JSON line on stdout (human-readable logs go to stderr). Stop with "
        "SIGTERM or Ctrl-C. Event types are listed in docs/operating.md (Events).",
        epilog="examples:\n"
               "  kscan run --qmp '/run/vms/*/qmp.sock'              watch every VM there\n"
               "  kscan run --discover --interval auto --cpu-budget 10\n"
               "  kscan run --qmp /run/vm7/qmp.sock --interval 5 --on-tamper pause\n"
               "  kscan run --discover --on-tamper 'exec:/usr/local/bin/page-oncall --sev 1'\n"
               "  kscan run --discover | jq -c 'select(.event == \"tamper\")'\n"
               "  kscan run --libvirt --connect qemu:///system --on-tamper pause",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--qmp", action="append", metavar="SOCK",
                   help="QMP socket or glob (repeatable); sockets appearing later are picked up")
    p.add_argument("--discover", action=argparse.BooleanOptionalAction, default=None,
                   help="also watch running QEMU processes (executable a QEMU binary, run "
                        "by root or a --discover-user)")
    p.add_argument("--discover-user", action="append", metavar="USER",
                   help="with --discover, also watch QEMU processes of this user "
                        "(repeatable); their sockets and memory files must be theirs")
    p.add_argument("--replay", action="append", metavar="DIR",
                   help="watch a recorded VM, or a glob of them (tools/record.py; for "
                        "benchmarks and tests)")
    p.add_argument("--libvirt", action=argparse.BooleanOptionalAction, default=None,
                   help="watch every running libvirt domain, following lifecycle events "
                        "(started domains are picked up, stopped ones reported)")
    p.add_argument("--connect", default=default_uri(), metavar="URI",
                   help="libvirt connection URI (default $LIBVIRT_DEFAULT_URI, else "
                        f"{DEFAULT_URI})")
    p.add_argument("--interval", type=interval, default="auto", metavar="auto|SECONDS",
                   help="per-VM scan interval; auto adapts under --cpu-budget (default auto)")
    p.add_argument("--cpu-budget", type=percent, default=10.0, metavar="PERCENT",
                   help="CPU kscan may use, in percent of one core (default 10)")
    p.add_argument("--startup-budget", type=percent, default=100.0, metavar="PERCENT",
                   help="CPU kscan may use while a VM awaits its first verdict (those "
                        "found at start, and any that appear later), in percent of one "
                        "core (default 100); then --cpu-budget holds")
    p.add_argument("--min-interval", type=bound_seconds("--min-interval"), default=1.0,
                   metavar="SECONDS", help="shortest per-VM interval (default 1)")
    p.add_argument("--max-interval", type=bound_seconds("--max-interval"), default=300.0,
                   metavar="SECONDS", help="longest per-VM interval (default 300)")
    # The default is scanner.check.fastpath.KEYED_EVERY_S (not imported: --help stays light).
    p.add_argument("--keyed-every", type=bound_seconds("--keyed-every"), default=300.0,
                   metavar="SECONDS",
                   help="compare each VM's memory under the keyed construction at least this "
                        "often (every 16 periods when sooner and the budget has room); "
                        "the passes between use seeded xxh3, ~5x cheaper (default 300: "
                        "docs/design.md, Keyed comparison)")
    p.add_argument("--on-tamper", default="report", metavar="report|pause|exec:CMD",
                   help="what to do on tampering besides reporting (default report); "
                        "pause stops the VM; exec runs CMD with the event JSON on stdin")
    p.add_argument("--forensics-dir", metavar="DIR",
                   help="where forensic copies go (default: forensics/ beside the database)")
    p.add_argument("--keep-days", type=non_negative, default=0.0, metavar="DAYS",
                   help="prune events older than this from the database's log, hourly; "
                        "the last tamper of each VM is kept (default 0: keep all)")
    p.add_argument("--forensics-max-mb", type=non_negative, default=0.0, metavar="MIB",
                   help="remove the oldest forensic copies beyond this size, hourly; the "
                        "newest of each VM is kept (default 0: no cap)")
    p.add_argument("--workers", type=workers, default=2,
                   help=f"hashing threads, 1..{MAX_WORKERS} (default 2)")
    p.add_argument("--stats-every", type=stats_every, default=60.0, metavar="SECONDS",
                   help="emit a stats event this often (default 60; 0: none)")
    p.add_argument("--duration", type=duration, default=0.0, metavar="SECONDS",
                   help="stop after this long (default: run until stopped)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                   help=STRICT_HELP)
    p.add_argument("--trust-module", action="append", metavar="NAME", type=module_name,
                   help=TRUST_HELP)
    p.add_argument("--event-format", choices=("native", "ecs", "ocsf"), default="native",
                   help="the shape of events on stdout: kscan's own (native, default), "
                        "Elastic Common Schema 8.x (ecs) or OCSF 1.5 (ocsf: a tamper is a "
                        "Detection Finding); the database keeps native events")
    p.add_argument("-v", "--verbose", action=argparse.BooleanOptionalAction, default=None,
                   help="debug lines on stderr too")
    p.add_argument("-q", "--quiet", action=argparse.BooleanOptionalAction, default=None,
                   help="only warnings and errors on stderr (no event summaries); the "
                        "events on stdout are unchanged")
    p.add_argument("--metrics", metavar="HOST:PORT|unix:PATH", default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, or over "
                        "HTTP on a unix socket created 0660 (default: none; e.g. "
                        "127.0.0.1:9464, [::1]:9464, unix:/run/kscan/metrics.sock)")
    p.add_argument("--check-config", action="store_true",
                   help="check the options and the configuration file, print what would "
                        "run, and exit (0: usable, 2: not) without watching anything")
    p.add_argument("--config", metavar="PATH", default=None,
                   help="a TOML file of run options (keys: the options with _ for -, db "
                        "included; the command line overrides it; default "
                        "/etc/kscan/kscan.toml if it exists, --config '' for none); "
                        "SIGHUP reads it again")
    _db_arg(p)
    # SIGHUP parses the command line again, with a new parser (run_policy's reloader).
    p.set_defaults(func=cmd_run, build_parser=build_parser)
    _add_verbosity(ap)
    return ap


def _add_verbosity(parser: Parser) -> None:
    """-v/-q on every command that has no such options of its own (`run` has)."""
    for sub in dict.fromkeys(parser.commands.values()):  # aliases: one parser, once
        flags = {f for o in sub.options.values() for f in o.action.option_strings}
        if "-v" not in flags:
            sub.add_argument("-v", "--verbose", action="store_true",
                             help="debug lines on stderr (with their time)")
        if "-q" not in flags:
            sub.add_argument("-q", "--quiet", action="store_true",
                             help="print nothing on stdout (the exit status tells) "
                                  "and only errors on stderr")
        _add_verbosity(sub)


def _libvirt_args(p: argparse.ArgumentParser, group: Any) -> None:
    """--libvirt DOMAIN in the command's group of sources, and --connect."""
    group.add_argument("--libvirt", metavar="DOMAIN",
                       help="a libvirt domain, by name or UUID (needs kscan[libvirt])")
    p.add_argument("--connect", default=default_uri(), metavar="URI",
                   help="libvirt connection URI for --libvirt (default "
                        f"$LIBVIRT_DEFAULT_URI, else {DEFAULT_URI})")


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH", default=None,
                   help="database file (default $KSCAN_DB, the service's, or "
                        "$XDG_STATE_HOME/kscan/kscan.db: see kscan --help)")

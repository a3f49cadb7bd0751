"""The `kscan` command line: argument parsing, output formatting, exit codes.

Exit codes: 0 success (or clean), 1 tampering found, 2 error (bad input or option, VM
not usable), 130 interrupted. Errors are one line on stderr naming the input or the
option and what to do; no traceback unless KSCAN_DEBUG=1. `status`, `events`,
`baseline list|rm` and `profile rm` live in modules of their own (`status`,
`events_cmd`, `stored`), registered here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

from kscan import __version__
from kscan.errors import KscanError
from scanner.terminal import printable

if TYPE_CHECKING:
    from scanner.check.verify import CheckReport
    from scanner.image.kernel_profile import KernelProfile
    from scanner.run.engine import RunConfig
    from scanner.vm import VmSource

EXIT_OK, EXIT_TAMPERED, EXIT_ERROR = 0, 1, 2
#: Hashing threads `run` may be given (each slow path in flight holds ~19 MB).
MAX_WORKERS = 64
def _module_name(text: str) -> str:
    """A module name as the kernel keeps it (`-` becomes `_`)."""
    name = text.replace("-", "_")
    if not re.fullmatch(r"[A-Za-z0-9_]{1,55}", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a module name (letters, digits, "
                                         "_ and -, at most 55)")
    return name


TRUST_HELP = ("a module whose run-time patches (ftrace hooks, kprobes) are the kernel's "
              "own patching although the kernel did not accept its signature; "
              "repeatable. Code no listed module holds is tampering all the same")
STRICT_HELP = ("treat the kernel's own verified run-time patching (ftrace, jump labels, "
               "static calls, kprobes) as tampering too: for hardened VMs where tracing "
               "itself is suspicious")


class UsageError(KscanError):
    """The command line names nothing to work on."""

#: libvirt's system connection (scanner.qemu.libvirt_domain.DEFAULT_URI; not imported
#: here so that --help works without the optional binding).
DEFAULT_URI = "qemu:///system"


def default_uri() -> str:
    """--connect's default: $LIBVIRT_DEFAULT_URI, as virsh has it, else DEFAULT_URI."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


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

Without --db PATH the database is $KSCAN_DB, else the service's (systemd's
$STATE_DIRECTORY, or /var/lib/kscan/kscan.db for root when it exists), else
$XDG_STATE_HOME/kscan/kscan.db (~/.local/state/kscan/kscan.db). Its secret hash key is
DB.key beside it (0600, never shared); `kscan key rotate` replaces it.
"""


def _print_json(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- inspect


async def cmd_inspect(args: argparse.Namespace) -> int:
    from scanner.commands.inspection import inspect_vm
    from scanner.vm import SourceKind, VmSource
    from store.paths import default_db_path

    db = args.db
    if db is None and default_db_path().exists():
        db = str(default_db_path())
    report = await inspect_vm(_libvirt_source(args) or (
        VmSource(SourceKind.CORE, args.core) if args.core else args.qmp), db=db)
    if args.json:
        _print_json(report.to_json())
    else:
        print(printable(report.to_text(), keep_newlines=True, limit=0))
    return EXIT_OK


# --------------------------------------------------------------------------- hash key


async def cmd_key_show(args: argparse.Namespace) -> int:
    from scanner.examine.keying import keyed_store
    from store.keyfile import key_path

    async with keyed_store(args.db) as st:
        print(f"hash key: {key_path(st.path)} (id {await st.get_key_id()}); "
              "`kscan key rotate` replaces it and re-hashes the baselines")
    return EXIT_OK


async def cmd_key_rotate(args: argparse.Namespace) -> int:
    from scanner.examine.keying import rotate_key

    path, out = await rotate_key(args.db)
    if out is None:
        print(f"rotated {path}; another kscan re-hashed meanwhile")
    else:
        print(f"rotated {path}: re-hashed {len(out.rehashed)} golden baselines from their "
              f"content" + (f", dropped {len(out.dropped)} without content" if out.dropped
                            else "")
              + f"; re-hashed {out.states} per-VM states from their page bytes"
              + (f" (dropped {out.states_dropped} unreadable)" if out.states_dropped else "")
              + "; resume records dropped (re-taken at each VM's next check)")
    return EXIT_OK


# --------------------------------------------------------------------------- profiles


async def cmd_profile_add(args: argparse.Namespace) -> int:
    from scanner.image.kernel_profile import KernelProfile, profile_from_path
    from store import Store

    prof = profile_from_path(args.path, system_map=args.system_map)
    upgraded = False
    async with Store.open(args.db) as st:
        added = await st.add_profile(prof.build_id, prof.release, prof.version,
                                     prof.to_bytes())
        if not added:
            row = await st.get_profile(prof.build_id)
            old = KernelProfile.from_bytes(row.data) if row is not None else None
            if old is not None and _knows_less(old, prof):
                upgraded = await st.add_profile(prof.build_id, prof.release, prof.version,
                                                prof.to_bytes(), replace=True)
    relocs = sum(r.count for r in prof.relocs.values())
    ks, ps = prof.kallsyms, prof.patch_sites
    if added or upgraded:
        print(f"{'added' if added else 'upgraded'} profile {prof.build_id} ({prof.release}): "
              + ", ".join(f"{s.name} {s.size} B" for s in prof.protected())
              + f", {relocs} relocation sites in them"
              + (f", {len(prof.symbols)} symbols from the symbol table" if prof.symbols
                 else f", {len(ks)} symbols from kallsyms" if ks is not None
                 else ", no symbols")
              + (f", {len(ps.ftrace) + len(ps.jump_code) + len(ps.static_call_addr)}"
                 " patch sites" if ps is not None else ", no patch sites (any .text change "
                 "is tampering)")
              + (f", {len(prof.layouts.structs)} struct layouts from BTF"
                 if prof.layouts is not None else ""))
        if prof.layouts_off:
            print(f"note: {prof.layouts_off}")
    else:
        print(f"profile {prof.build_id} ({prof.release}) is already stored; nothing to do")
    return EXIT_OK


def _knows_less(old: KernelProfile, new: KernelProfile) -> bool:
    """A profile stored by an older kscan, missing what this one reads from the image."""
    return ((old.kallsyms is None and new.kallsyms is not None)
            or (old.patch_sites is None and new.patch_sites is not None)
            or (old.early_idt is None and new.early_idt is not None)
            or (not old.alt_relocs and bool(new.alt_relocs))
            or (old.layouts is None and new.layouts is not None)
            or (not old.data_symbols and bool(new.data_symbols)))


async def cmd_profile_list(args: argparse.Namespace) -> int:
    from store import Store

    async with Store.open(args.db) as st:
        rows = await st.list_profiles()
    if args.json:
        _print_json([{"build_id": r.build_id, "release": r.release, "version": r.version,
                      "added_at": r.added_at, "size": r.size} for r in rows])
        return EXIT_OK
    if not rows:
        print("no profiles stored; add one with: kscan profile add /path/to/vmlinuz")
    for r in rows:
        print(f"{r.build_id}  {r.release}  ({r.size} B)")
    return EXIT_OK


# --------------------------------------------------------------------------- baselines


async def cmd_baseline(args: argparse.Namespace) -> int:
    from scanner.commands.oneshot import baseline_vms
    from scanner.vm import SourceKind, VmSource

    sources = [VmSource(SourceKind.QMP, s) for s in args.qmp or []] + [
        VmSource(SourceKind.REPLAY, d) for d in args.replay or []] + [
        VmSource(SourceKind.LIBVIRT, d, args.connect) for d in args.libvirt or []]
    if not sources:
        raise UsageError("no VM given", hint="pass --qmp SOCK or --libvirt DOMAIN of a "
                         "verified VM")
    for res in await baseline_vms(sources, args.db):
        vm, gb, key = res.vm, res.build, res.boot_profile
        per_boot = {n: r.per_boot_pages() for n, r in gb.regions.items()}
        print(f"baseline of {printable(vm)}: "
              f"boot profile {key}, {gb.boots} verified boot(s)")
        for name, r in gb.regions.items():
            pb = per_boot[name]
            merged = gb.merged_per_boot.get(name) or []
            print(f"  {name:<11} {r.size:>9} B  {r.pages:>5} pages, {r.pages - len(pb)} golden, "
                  f"{len(pb)} per-boot" + (f" ({len(merged)} learned from this boot)"
                                           if merged else ""))
    return EXIT_OK


def _print_report_text(rep: CheckReport) -> None:
    def print(text: str) -> None:  # every line escaped: VM names are the peer's
        sys.stdout.write(printable(text) + "\n")

    verdict = "TAMPERED" if rep.tampered else "clean"
    print(f"{rep.vm}: {verdict}  (kernel {rep.release}, slide {rep.slide:#x}, "
          f"boot profile {rep.boot_profile})")
    if rep.per_vm_baseline_taken:
        print("  per-VM baseline of per-boot pages taken now (first check of this boot)")
    for r in rep.regions:
        pb = ", ".join(str(p) for p in r.per_boot_pages[:8]) + (
            " ..." if len(r.per_boot_pages) > 8 else "")
        print(f"  {r.name:<11} {r.pages:>5} pages: {r.golden_pages} golden-checked"
              + (f", {len(r.per_boot_pages)} per-boot [{pb}]" if r.per_boot_pages else "")
              + (f", {len(r.accepted_pages)} accepted" if r.accepted_pages else "")
              + (f"  -> {len(r.mismatches)} CHANGED" if r.mismatches else "  ok"))
        for m in r.mismatches[:20]:
            where = f" {m.symbol}" if m.symbol else ""
            print(f"    page {m.page} va {m.va:#x} gpa {m.gpa:#x} ({m.basis}){where}")
            for br in m.ranges[:8]:
                print(f"      bytes {br.start:#x}-{br.end:#x}: {br.before} -> {br.after}  "
                      f"[{br.kind}]")
            for ptr in m.pointers[:8]:
                print(f"      {ptr.message}")
    for f in rep.findings:
        print(f"  FINDING {f.kind}: {f.message}")
    if rep.patches is not None:
        doc = rep.patches.to_json()
        what = ", ".join(f"{m} {n}" for m, n in doc["mechanisms"].items())
        strict = " (--strict: counted as tampering)" if rep.strict and rep.patched else ""
        print(f"  kernel's own patching, verified{strict}: {what} site(s) in "
              f"{doc['pages']} page(s)")
        for mech in doc["mechanisms"]:
            rows = [r for r in doc["sites"] if r["mechanism"] == mech]
            shown = ", ".join(f"{r['symbol']}" + (f" ×{r['count']}" if r["count"] > 1 else "")
                              for r in rows[:4])
            print(f"    {mech:<13} {shown}" + (" ..." if len(rows) > 4 or doc["more"] else ""))
        for o in doc.get("owners", ())[:8]:
            where = o["symbol"] or o["address"]
            sig = ("" if o["kind"] != "module" else " signed" if o["signed"] else " UNSIGNED")
            trust = " trusted" if o["trusted"] else ""
            print(f"    owner: {o['kind']}{sig}{trust} {o['name']} {where}")


async def cmd_check(args: argparse.Namespace) -> int:
    from scanner.commands.oneshot import check_vm
    from scanner.vm import SourceKind, VmSource

    if args.core:
        from scanner.commands.offline import check_core

        rep = await check_core(args.core, args.db, vm=args.vm, boot_profile=args.boot_profile,
                               strict=args.strict,
                               trusted_modules=frozenset(args.trust_module or ()))
    else:
        if args.vm or args.boot_profile:
            raise UsageError("--vm and --boot-profile are for --core only")
        rep = await check_vm(_libvirt_source(args) or (
            VmSource(SourceKind.QMP, args.qmp) if args.qmp
            else VmSource(SourceKind.REPLAY, args.replay)), args.db, strict=args.strict,
            trusted_modules=frozenset(args.trust_module or ()))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(rep.to_json()) + b"\n")
    else:
        _print_report_text(rep)
    return EXIT_TAMPERED if rep.tampered else EXIT_OK


async def cmd_accept(args: argparse.Namespace) -> int:
    from scanner.commands.oneshot import accept_vm

    res = await accept_vm(_libvirt_source(args) or args.qmp, args.db, args.note or "")
    rep, n = res.report, res.accepted_pages
    print(f"{printable(rep.vm)}: accepted {n} changed page(s) as this VM's new baseline"
          + ("" if n else " (nothing differed)") + "; recorded in the event log")
    return EXIT_OK


# --------------------------------------------------------------------------- bundles


async def cmd_export(args: argparse.Namespace) -> int:
    from scanner.commands.bundles import export_bundle

    res = await export_bundle(args.out, args.key, args.db, args.build_id or ())
    print(f"wrote {res.path}: {len(res.profiles)} profile(s), {len(res.goldens)} golden "
          f"baseline(s), {res.size} B, signed by key {res.key_id[:16]}, sequence "
          f"{res.sequence} ({res.seconds:.1f} s)")
    for g in res.goldens:
        boots = max(r.boots for r in g.regions.values())
        print(f"  {g.build_id}  boot profile {g.boot_profile}, {boots} verified boot(s), "
              f"from {g.source_vm or '?'}")
    return EXIT_OK


async def cmd_import(args: argparse.Namespace) -> int:
    from scanner.commands.bundles import import_bundle

    res = await import_bundle(args.bundle, args.trust, args.db, replace=args.replace,
                              richer=_knows_less, allow_older=args.allow_older)
    o, b = res.outcome, res.bundle
    print(f"imported {res.path} (signed by key {b.key_id[:16]}, {b.producer}): profiles "
          f"{len(o.profiles_added)} added, {len(o.profiles_upgraded)} upgraded, "
          f"{len(o.profiles_kept)} already stored; golden baselines {len(o.golden_added)} "
          f"added, {len(o.golden_replaced)} replaced, {len(o.golden_unchanged)} already "
          f"stored, {len(o.golden_kept_local)} kept local ({res.seconds:.1f} s)")
    for build_id, key in o.golden_kept_local:
        print(f"kscan: kept the local golden baseline of {build_id} boot profile {key}: it "
              "differs from the bundle's (--replace takes the bundle's)", file=sys.stderr)
    for build_id in res.profiles_differ:
        print(f"kscan: kept the local profile of {build_id}: it differs from the bundle's "
              "(--replace takes the bundle's when it knows more)", file=sys.stderr)
    for build_id, key in o.golden_not_restored:
        print(f"kscan: did not restore the golden baseline of {build_id} boot profile {key}: "
              f"none is stored here and bundle sequence {b.sequence} is not newer than the "
              "newest imported from this key (deleted here since?); --replace restores it",
              file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------- run


def _interval(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--interval {text!r}: use auto or seconds") from None
    if not 0.05 <= v <= 86400:
        raise argparse.ArgumentTypeError(f"--interval {v:g}: must be 0.05..86400 seconds")
    return v


def _percent(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
    if not 0 < v <= 100 * (os.cpu_count() or 1):
        raise argparse.ArgumentTypeError(f"{v:g}%: must be > 0 and at most "
                                         f"{100 * (os.cpu_count() or 1)} (percent of one "
                                         "core; this host has "
                                         f"{os.cpu_count() or 1})")
    return v


def _uid(user: str) -> int:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        if user.isdigit():
            return int(user)
        raise UsageError(f"--discover-user {user!r}: no such user") from None


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number") from None
    if not 0 <= v < 1e9:
        raise argparse.ArgumentTypeError(f"{v:g}: must be 0 or more")
    return v


def _bound_seconds(option: str) -> Callable[[str], float]:
    """A type for an interval bound: 0.05..86400 seconds, the option named in errors."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} {text!r}: seconds") from None
        if not 0.05 <= v <= 86400:
            raise argparse.ArgumentTypeError(f"{option} {v:g}: must be 0.05..86400 seconds")
        return v
    parse.kind = float  # type: ignore[attr-defined]  # TOML: a number (commands.config)
    return parse


def _stats_every(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stats-every {text!r}: seconds") from None
    if not (v == 0 or 0 < v <= 86400):
        raise argparse.ArgumentTypeError(f"--stats-every {v:g}: must be 0 (no stats "
                                         "events) or up to 86400 seconds")
    return v


_stats_every.kind = float  # type: ignore[attr-defined]  # TOML: see commands.config


def _workers(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: a whole number") from None
    if not 1 <= v <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"--workers {v}: must be 1..{MAX_WORKERS}")
    return v


_workers.kind = int  # type: ignore[attr-defined]  # TOML: see commands.config


def _duration(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--duration {text!r}: seconds") from None
    if not 0 <= v < 1e9:
        raise argparse.ArgumentTypeError(f"--duration {v:g}: must be 0 (run until "
                                         "stopped) or more")
    return v


_duration.kind = float  # type: ignore[attr-defined]  # TOML: see commands.config


async def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from scanner.run.engine import install_signal_handlers, run_engine, tune_malloc

    cfg = run_config(args)
    if args.check_config:
        return _check_config(args, cfg)
    try:  # checked in run_config without creating it; made now, so a bad one fails now
        os.makedirs(cfg.forensics_dir, mode=0o700, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--forensics-dir {cfg.forensics_dir}: cannot be created: "
                         f"{err.strerror or err}",
                         hint="choose a directory kscan can create and write") from None
    if args.libvirt:
        from scanner.qemu.libvirt_domain import binding

        binding()  # fail now, in one line, if the extra is not installed
    from scanner.run.journal import StderrFormatter, is_journal

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StderrFormatter(journal=is_journal(2)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING
                        if args.quiet else logging.INFO, handlers=[handler])
    tune_malloc()
    stop = asyncio.Event()
    install_signal_handlers(stop)
    if args.duration:
        asyncio.get_running_loop().call_later(args.duration, stop.set)
    await run_engine(cfg, args.db, stop, reloader=_reloader(args), metrics=args.metrics,
                     event_format=args.event_format)
    return EXIT_OK


def _check_config(args: argparse.Namespace, cfg: RunConfig) -> int:
    """`run --check-config`: what run_config accepted, plus what `run` would otherwise
    find out only at start (the metrics address, the libvirt binding), printed."""
    from store.paths import default_db_path

    if args.metrics:
        from scanner.run.metrics import MetricsError, parse_address

        if not args.metrics.startswith("unix:"):
            parse_address(args.metrics)
        elif not args.metrics[5:]:
            raise MetricsError("--metrics unix: needs a path, e.g. "
                               "unix:/run/kscan/metrics.sock")
    if args.libvirt:
        from scanner.qemu.libvirt_domain import binding

        binding()
    sources = [*(f"qmp {q}" for q in cfg.qmp), *(f"replay {r}" for r in cfg.replay)]
    if cfg.discover:
        sources.append("discover")
    if cfg.libvirt:
        sources.append(f"libvirt {cfg.libvirt}")
    print(printable(f"configuration OK ({args.config_file or 'command line only'}): "
                    f"database {args.db or default_db_path()}; {cfg.policy.describe()}; "
                    f"on tamper {cfg.action.describe()}; forensics {cfg.forensics_dir}; "
                    f"watching {', '.join(sources)}", limit=0))
    return EXIT_OK


def _reloader(args: argparse.Namespace) -> Callable[[], RunConfig]:
    """What SIGHUP calls: the command line parsed again with the configuration file
    read again (the command line still overrides it)."""
    argv = list(getattr(args, "argv", None) or ())

    def reload() -> RunConfig:
        import logging

        from scanner.commands.config import parse_with_config

        new = parse_with_config(build_parser, argv)
        for key in ("db", "metrics", "connect", "workers"):
            if getattr(new, key) != getattr(args, key):
                logging.getLogger("kscan").warning(
                    "reload: %s changed in the configuration; it takes a restart", key)
        if not new.forensics_dir:  # beside the database in use, not the one to come
            new.forensics_dir = str(_default_forensics(args.db))
        return run_config(new)

    return reload


def run_config(args: argparse.Namespace) -> RunConfig:
    """`kscan run`'s options (command line and configuration file) as a RunConfig."""
    from pathlib import Path

    from scanner.run.actions import ActionKind, parse_action
    from scanner.run.engine import RunConfig
    from scanner.run.scheduler import Policy

    if not (args.qmp or args.discover or args.replay or args.libvirt):
        raise UsageError("nothing to watch", hint="give --qmp SOCK (or a glob), --discover, "
                         "--libvirt, or --replay DIR" + (
                             f" (on the command line or in {args.config_file})"
                             if getattr(args, "config_file", None) else ""))
    def bad(option: str, what: str, hint: str = "") -> UsageError:
        where = f" (in {args.config_file})" if getattr(args, "config_file", None) else ""
        return UsageError(f"{option} {what}{where}", hint=hint)

    if args.min_interval > args.max_interval:
        raise bad("--min-interval", f"{args.min_interval:g} is above --max-interval "
                  f"{args.max_interval:g}", "the shortest interval cannot exceed the longest")
    auto = args.interval == "auto"
    policy = Policy(auto=auto, fixed=0.0 if auto else float(args.interval),
                    budget=args.cpu_budget / 100 if args.cpu_budget else None,
                    min_interval=args.min_interval, max_interval=args.max_interval,
                    startup_budget=args.startup_budget / 100)
    forensics = Path(args.forensics_dir) if args.forensics_dir else \
        _default_forensics(args.db)
    why = _uncreatable(forensics)
    if why:
        raise bad("--forensics-dir" if args.forensics_dir else "--db",
                  f"{forensics}: forensic copies cannot be written there: {why}",
                  "choose a directory kscan can create and write")
    action = parse_action(args.on_tamper)
    if action.kind is ActionKind.EXEC:
        why = _not_runnable(action.argv[0])
        if why:
            raise bad("--on-tamper", f"exec:{action.argv[0]}: {why}",
                      "give the hook's full path; it must be an executable file")
    cfg = RunConfig(qmp=tuple(args.qmp or ()), discover=args.discover,
                    replay=tuple(args.replay or ()), policy=policy,
                    action=action, forensics_dir=forensics,
                    workers=args.workers, stats_every=args.stats_every, strict=args.strict,
                    trusted_modules=frozenset(args.trust_module or ()),
                    libvirt=args.connect if args.libvirt else None,
                    discover_uids=frozenset(_uid(u) for u in args.discover_user or ()),
                    keep_days=args.keep_days, forensics_max_mb=args.forensics_max_mb,
                    db=args.db, metrics=args.metrics)
    return cfg


def _default_forensics(db: str | None) -> Path:
    """forensics/ beside the database."""
    from store.paths import default_db_path

    return (Path(db).parent if db else default_db_path().parent) / "forensics"


def _uncreatable(directory: Path) -> str:
    """Why `directory` could not be created or written by this process ('' if it can):
    checked without creating anything (`run --check-config` changes nothing)."""
    d = directory
    for _ in range(256):  # bounded: a path has no more components than that
        if d.exists():
            if not d.is_dir():
                return f"{d} is not a directory"
            if not os.access(d, os.W_OK | os.X_OK):
                return f"{d} is not writable"
            return ""
        if d.parent == d:
            break
        d = d.parent
    return f"no existing parent of {directory}"


def _not_runnable(program: str) -> str:
    """Why an exec hook's program cannot be run ('' if it can)."""
    import shutil

    if "/" not in program:
        return "" if shutil.which(program) else "not found on PATH"
    if not os.path.exists(program):
        return "no such file"
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        return "not an executable file"
    return ""


# --------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit 2): the option, what is
    wrong with it, and where the help is — not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        import re

        # "argument --workers: --workers 0: must be 1..64" says the option twice.
        m = re.fullmatch(r"argument (\S+?)(?:/\S+)?: ((--?\S+) .*)", message, re.S)
        if m is not None and m.group(1).split("/")[0] in {m.group(3)}:
            message = m.group(2)
        self.exit(EXIT_ERROR, f"{self.prog}: {printable(' '.join(message.split()))} "
                              f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from scanner.commands.events_cmd import add_parser as add_events
    from scanner.commands.status import add_parser as add_status
    from scanner.commands.stored import add_baseline_actions, add_profile_rm

    ap = _Parser(
        prog="kscan",
        description="Agentless runtime integrity monitor for the Linux kernels of QEMU/KVM VMs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"kscan {__version__}")
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
    p.add_argument("--trust-module", action="append", metavar="NAME", type=_module_name,
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
        "SIGTERM or Ctrl-C. Event types are listed in the README.",
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
    p.add_argument("--discover", action="store_true",
                   help="also watch running QEMU processes (executable a QEMU binary, run "
                        "by root or a --discover-user)")
    p.add_argument("--discover-user", action="append", metavar="USER",
                   help="with --discover, also watch QEMU processes of this user "
                        "(repeatable); their sockets and memory files must be theirs")
    p.add_argument("--replay", action="append", metavar="DIR",
                   help="watch a recorded VM, or a glob of them (tools/record.py; for "
                        "benchmarks and tests)")
    p.add_argument("--libvirt", action="store_true",
                   help="watch every running libvirt domain, following lifecycle events "
                        "(started domains are picked up, stopped ones reported)")
    p.add_argument("--connect", default=default_uri(), metavar="URI",
                   help="libvirt connection URI (default $LIBVIRT_DEFAULT_URI, else "
                        f"{DEFAULT_URI})")
    p.add_argument("--interval", type=_interval, default="auto", metavar="auto|SECONDS",
                   help="per-VM scan interval; auto adapts under --cpu-budget (default auto)")
    p.add_argument("--cpu-budget", type=_percent, default=10.0, metavar="PERCENT",
                   help="CPU kscan may use, in percent of one core (default 10)")
    p.add_argument("--startup-budget", type=_percent, default=100.0, metavar="PERCENT",
                   help="CPU kscan may use until every VM has its first verdict, in "
                        "percent of one core (default 100); then --cpu-budget holds")
    p.add_argument("--min-interval", type=_bound_seconds("--min-interval"), default=1.0,
                   metavar="SECONDS", help="shortest per-VM interval (default 1)")
    p.add_argument("--max-interval", type=_bound_seconds("--max-interval"), default=300.0,
                   metavar="SECONDS", help="longest per-VM interval (default 300)")
    p.add_argument("--on-tamper", default="report", metavar="report|pause|exec:CMD",
                   help="what to do on tampering besides reporting (default report); "
                        "pause stops the VM; exec runs CMD with the event JSON on stdin")
    p.add_argument("--forensics-dir", metavar="DIR",
                   help="where forensic copies go (default: forensics/ beside the database)")
    p.add_argument("--keep-days", type=_non_negative, default=0.0, metavar="DAYS",
                   help="prune events older than this from the database's log, hourly; "
                        "the last tamper of each VM is kept (default 0: keep all)")
    p.add_argument("--forensics-max-mb", type=_non_negative, default=0.0, metavar="MIB",
                   help="remove the oldest forensic copies beyond this size, hourly; the "
                        "newest of each VM is kept (default 0: no cap)")
    p.add_argument("--workers", type=_workers, default=2,
                   help=f"hashing threads, 1..{MAX_WORKERS} (default 2)")
    p.add_argument("--stats-every", type=_stats_every, default=60.0, metavar="SECONDS",
                   help="emit a stats event this often (default 60; 0: none)")
    p.add_argument("--duration", type=_duration, default=0.0, metavar="SECONDS",
                   help="stop after this long (default: run until stopped)")
    p.add_argument("--strict", action="store_true",
                   help=STRICT_HELP)
    p.add_argument("--trust-module", action="append", metavar="NAME", type=_module_name,
                   help=TRUST_HELP)
    p.add_argument("--event-format", choices=("native", "ecs", "ocsf"), default="native",
                   help="the shape of events on stdout: kscan's own (native, default), "
                        "Elastic Common Schema 8.x (ecs) or OCSF 1.5 (ocsf: a tamper is a "
                        "Detection Finding); the database keeps native events")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug lines on stderr too")
    p.add_argument("-q", "--quiet", action="store_true",
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
    p.set_defaults(func=cmd_run)
    _add_verbosity(ap)
    return ap


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-v/-q on every command that has no such options of its own (`run` has)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):
            flags = {f for a in sub._actions for f in a.option_strings}
            if "-v" not in flags:
                sub.add_argument("-v", "--verbose", action="store_true",
                                 help="debug lines on stderr (with their time)")
            if "-q" not in flags:
                sub.add_argument("-q", "--quiet", action="store_true",
                                 help="print nothing on stdout (the exit status tells) "
                                      "and only errors on stderr")
            _add_verbosity(sub)


def _libvirt_args(p: argparse.ArgumentParser, group: argparse._MutuallyExclusiveGroup) -> None:
    group.add_argument("--libvirt", metavar="DOMAIN",
                       help="a libvirt domain, by name or UUID (needs kscan[libvirt])")
    p.add_argument("--connect", default=default_uri(), metavar="URI",
                   help="libvirt connection URI for --libvirt (default "
                        f"$LIBVIRT_DEFAULT_URI, else {DEFAULT_URI})")


def _libvirt_source(args: argparse.Namespace) -> VmSource | None:
    """The --libvirt DOMAIN of a one-VM command, as a source (None without it)."""
    from scanner.vm import SourceKind, VmSource

    name = getattr(args, "libvirt", None)
    if not name:
        return None
    from scanner.qemu.libvirt_domain import binding

    binding()  # fail now, in one line, if the extra is not installed
    return VmSource(SourceKind.LIBVIRT, name, args.connect)


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH", default=None,
                   help="database file (default $KSCAN_DB, the service's, or "
                        "$XDG_STATE_HOME/kscan/kscan.db: see kscan --help)")


def run_async(coro_fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
              args: argparse.Namespace) -> int:
    """`run` on uvloop (hundreds of VMs); one-shot commands on asyncio's own loop,
    which asks nothing of the process's standard streams."""
    if args.command != "run":
        import signal

        # asyncio.run's own SIGINT handler only cancels the main task, which a task
        # blocked in a system call (open() of a FIFO: `kscan import <(...)`) never sees;
        # a handler of ours (asyncio then installs none) raises where the main thread is.
        signal.signal(signal.SIGINT, _interrupt)
        return asyncio.run(coro_fn(args))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without
        return asyncio.run(coro_fn(args))
    return uvloop.run(coro_fn(args))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _input_of(args: argparse.Namespace) -> str:
    """The input a command was given, to name it in an error line."""
    for attr, flag in (("qmp", "--qmp"), ("replay", "--replay"), ("core", "--core"),
                       ("path", "")):
        value = getattr(args, attr, None)
        if value:
            value = ", ".join(value) if isinstance(value, list) else value
            return f"{flag} {value}".strip()
    return ""


def _one_shot_output(args: argparse.Namespace) -> None:
    """-v: debug lines on stderr; -q: nothing on stdout, only errors on stderr. Log lines
    carry their time (or their priority, to the journal: scanner.run.journal)."""
    import io
    import logging

    from scanner.run.journal import StderrFormatter, is_journal

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StderrFormatter(journal=is_journal(2)))
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING,
                        handlers=[handler])
    if verbose:  # kscan's own debug lines, not every library's
        logging.getLogger("kscan").setLevel(logging.DEBUG)
    if quiet:
        sys.stdout = io.TextIOWrapper(open(os.devnull, "wb"), write_through=True)  # noqa: SIM115


def main(argv: Sequence[str] | None = None) -> int:
    from scanner.commands.config import parse_with_config
    from scanner.commands.streams import reopen_closed

    reopen_closed()  # before anything opens a file: see scanner.commands.streams
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_with_config(build_parser, argv)
    except KscanError as err:  # the configuration file: one line, exit 2
        print(f"kscan: {printable(' '.join(str(err).split()))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C while a FIFO configuration file is awaited
        return 130
    args.argv = argv
    if args.command != "run":  # run sets up its own stderr lines (cmd_run)
        _one_shot_output(args)
    try:
        return run_async(args.func, args)
    except KscanError as err:
        if os.environ.get("KSCAN_DEBUG") == "1":
            raise
        one_line = " ".join(str(err).split())  # third-party text may hold newlines
        print(f"kscan: {printable(one_line)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except (Exception, MemoryError, RecursionError) as err:
        # Not one of ours: a hostile input kscan did not foresee, or a bug. Exit 1 must
        # only ever mean tampering, and no traceback reaches the user.
        if os.environ.get("KSCAN_DEBUG") == "1":
            raise
        what = " ".join(f"{type(err).__name__}: {err}".split())
        where = " ".join(filter(None, [args.command, getattr(args, "profile_command", None),
                                       _input_of(args)]))
        print(f"kscan: {printable(where)}: unexpected error: {printable(what, limit=300)} "
              "(the input is malformed or this is a bug; KSCAN_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

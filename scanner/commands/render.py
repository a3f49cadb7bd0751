"""The text the one-shot commands print: results in, lines out.

Each function turns what a command computed (a check report, a baseline, a stored
profile, a bundle written or imported) into the lines a person reads; the command
(`commands.handlers`) prints them. Anything that came from a guest (VM names, symbols,
byte values) goes through `printable` when printed, so a hostile name cannot move the
terminal's cursor or forge a line. `--json` output is `print_json` of the result's own
`to_json()`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from scanner.terminal import MAX_CHARS, printable

if TYPE_CHECKING:
    from scanner.check.verify import CheckReport
    from scanner.commands.bundles import ExportResult, ImportResult
    from scanner.commands.oneshot import BaselineResult
    from scanner.examine.keying import RekeyOutcome
    from scanner.image.kernel_profile import KernelProfile

__all__ = ["baseline_lines", "export_lines", "import_warnings", "imported_line", "key_rotated_line",
           "print_json", "print_lines", "profile_added_line", "report_lines"]


def print_json(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def print_lines(lines: Iterable[str], file: TextIO | None = None, *,
                limit: int = MAX_CHARS) -> None:
    """Each line escaped (VM names are the peer's), cut at `limit` (0: whole), printed."""
    out = sys.stdout if file is None else file
    for line in lines:
        out.write(printable(line, limit=limit) + "\n")


def profile_added_line(prof: KernelProfile, added: bool) -> str:
    """`profile add`: what was stored (added, or upgraded from an older kscan's)."""
    relocs = sum(r.count for r in prof.relocs.values())
    ks, ps = prof.kallsyms, prof.patch_sites
    return (f"{'added' if added else 'upgraded'} profile {prof.build_id} ({prof.release}): "
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


def baseline_lines(res: BaselineResult) -> list[str]:
    """`baseline`: one VM's golden baseline, region by region."""
    vm, gb, key = res.vm, res.build, res.boot_profile
    lines = [f"baseline of {vm}: boot profile {key}, {gb.boots} verified boot(s)"]
    for name, r in gb.regions.items():
        pb = r.per_boot_pages()
        merged = gb.merged_per_boot.get(name) or []
        lines.append(f"  {name:<11} {r.size:>9} B  {r.pages:>5} pages, "
                     f"{r.pages - len(pb)} golden, {len(pb)} per-boot"
                     + (f" ({len(merged)} learned from this boot)" if merged else ""))
    return lines


def report_lines(rep: CheckReport) -> list[str]:
    """`check`: the verdict, each region's pages and changes, findings, and the
    kernel's own verified patching."""
    verdict = "TAMPERED" if rep.tampered else "clean"
    out = [f"{rep.vm}: {verdict}  (kernel {rep.release}, slide {rep.slide:#x}, "
           f"boot profile {rep.boot_profile})"]
    if rep.per_vm_baseline_taken:
        out.append("  per-VM baseline of per-boot pages taken now (first check of this boot)")
    for r in rep.regions:
        pb = ", ".join(str(p) for p in r.per_boot_pages[:8]) + (
            " ..." if len(r.per_boot_pages) > 8 else "")
        out.append(f"  {r.name:<11} {r.pages:>5} pages: {r.golden_pages} golden-checked"
                   + (f", {len(r.per_boot_pages)} per-boot [{pb}]" if r.per_boot_pages else "")
                   + (f", {len(r.accepted_pages)} accepted" if r.accepted_pages else "")
                   + (f"  -> {len(r.mismatches)} CHANGED" if r.mismatches else "  ok"))
        for m in r.mismatches[:20]:
            where = f" {m.symbol}" if m.symbol else ""
            out.append(f"    page {m.page} va {m.va:#x} gpa {m.gpa:#x} ({m.basis}){where}")
            for br in m.ranges[:8]:
                out.append(f"      bytes {br.start:#x}-{br.end:#x}: {br.before} -> "
                           f"{br.after}  [{br.kind}]")
            out += [f"      {ptr.message}" for ptr in m.pointers[:8]]
    for f in rep.findings:
        out.append(f"  FINDING {f.kind}: {f.message}")
    if rep.patches is not None:
        doc = rep.patches.to_json()
        what = ", ".join(f"{m} {n}" for m, n in doc["mechanisms"].items())
        strict = " (--strict: counted as tampering)" if rep.strict and rep.patched else ""
        out.append(f"  kernel's own patching, verified{strict}: {what} site(s) in "
                   f"{doc['pages']} page(s)")
        for mech in doc["mechanisms"]:
            rows = [r for r in doc["sites"] if r["mechanism"] == mech]
            shown = ", ".join(f"{r['symbol']}" + (f" ×{r['count']}" if r["count"] > 1 else "")
                              for r in rows[:4])
            out.append(f"    {mech:<13} {shown}"
                       + (" ..." if len(rows) > 4 or doc["more"] else ""))
        for o in doc.get("owners", ())[:8]:
            where = o["symbol"] or o["address"]
            sig = ("" if o["kind"] != "module" else " signed" if o["signed"] else " UNSIGNED")
            trust = " trusted" if o["trusted"] else ""
            out.append(f"    owner: {o['kind']}{sig}{trust} {o['name']} {where}")
    return out


def key_rotated_line(path: object, out: RekeyOutcome | None) -> str:
    """`key rotate`: what was re-hashed under the new key (None: another kscan did)."""
    if out is None:
        return f"rotated {path}; another kscan re-hashed meanwhile"
    return (f"rotated {path}: re-hashed {len(out.rehashed)} golden baselines from their "
            "content" + (f", dropped {len(out.dropped)} without content" if out.dropped
                         else "")
            + f"; re-hashed {out.states} per-VM states from their page bytes"
            + (f" (dropped {out.states_dropped} unreadable)" if out.states_dropped else "")
            + "; resume records dropped (re-taken at each VM's next check)")


def export_lines(res: ExportResult) -> list[str]:
    """`export`: the bundle written, then each golden baseline in it."""
    lines = [f"wrote {res.path}: {len(res.profiles)} profile(s), {len(res.goldens)} golden "
             f"baseline(s), {res.size} B, signed by key {res.key_id[:16]}, sequence "
             f"{res.sequence} ({res.seconds:.1f} s)"]
    for g in res.goldens:
        boots = max(r.boots for r in g.regions.values())
        lines.append(f"  {g.build_id}  boot profile {g.boot_profile}, {boots} verified "
                     f"boot(s), from {g.source_vm or '?'}")
    return lines


def imported_line(res: ImportResult) -> str:
    """`import`: what the bundle added, replaced or left alone."""
    o, b = res.outcome, res.bundle
    return (f"imported {res.path} (signed by key {b.key_id[:16]}, {b.producer}): profiles "
            f"{len(o.profiles_added)} added, {len(o.profiles_upgraded)} upgraded, "
            f"{len(o.profiles_kept)} already stored; golden baselines {len(o.golden_added)} "
            f"added, {len(o.golden_replaced)} replaced, {len(o.golden_unchanged)} already "
            f"stored, {len(o.golden_kept_local)} kept local ({res.seconds:.1f} s)")


def import_warnings(res: ImportResult) -> list[str]:
    """`import`: what it did not take, for stderr."""
    o, b = res.outcome, res.bundle
    out = [f"kscan: kept the local golden baseline of {build_id} boot profile {key}: it "
           "differs from the bundle's (--replace takes the bundle's)"
           for build_id, key in o.golden_kept_local]
    out += [f"kscan: kept the local profile of {build_id}: it differs from the bundle's "
            "(--replace takes the bundle's when it knows more)"
            for build_id in res.profiles_differ]
    out += [f"kscan: did not restore the golden baseline of {build_id} boot profile {key}: "
            f"none is stored here and bundle sequence {b.sequence} is not newer than the "
            "newest imported from this key (deleted here since?); --replace restores it"
            for build_id, key in o.golden_not_restored]
    return out

"""The kernel's own verified patching, as a check reports it.

`scanner.check.patching` decides byte by byte which `.text` changes are the kernel's
own patching. This module turns its verdict into what a check report carries: the
`.text` pages whose every change is verified (no longer mismatches), the unverified
ranges of the others, page by page (still tampering, named by the verifier's reason),
and a bounded, symbolized summary for reports and `kernel_patched` events.

Boot-time mechanisms (`runtime_const`: immediates the kernel patches once per boot;
`smp_lock`: lock prefixes patched for the VM's CPU count) are listed but never make a
VM "patched": they say how the VM booted, not that anyone traced it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scanner.check.attribution import Attribution
from scanner.check.classify import MAX_SHOWN, ByteRange
from scanner.check.owners import Owner
from scanner.check.patching import (
    BOOT_TIME,
    MECHANISMS,
    PatchVerdict,
    UnverifiedRange,
    VerifiedPatch,
)
from scanner.hashing import keyed_id
from translate import PAGE

__all__ = ["BOOT_TIME", "MAX_ENTRIES", "PatchReport", "split_by_page"]

#: Site entries listed in a report or event (the per-mechanism totals are complete).
MAX_ENTRIES = 200



@dataclass(frozen=True)
class PatchReport:
    """Verified patching of one VM's `.text` against its golden baseline."""

    verified: tuple[VerifiedPatch, ...]
    pages: tuple[int, ...]  # .text pages whose every change is verified patching
    symbolize: Callable[[int], str | None]
    #: Who made each run-time patch (None: attribution was off for this kernel).
    attribution: Attribution | None = None

    @property
    def runtime(self) -> tuple[VerifiedPatch, ...]:
        """The patches made while the kernel runs (not once at boot)."""
        return tuple(v for v in self.verified if v.mechanism not in BOOT_TIME)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.verified:
            out[v.mechanism] = out.get(v.mechanism, 0) + 1
        return {m: out[m] for m in MECHANISMS if m in out}

    def fingerprint(self) -> int:
        """Identifies this set of patches (site, mechanism, bytes): one `kernel_patched`
        event per distinct set, owners included (a new owner is a new set). Keyed
        (`scanner.hashing.keyed_id`): a new set of patches cannot be made to pose as one
        already reported."""
        attr = self.attribution

        def owners(site: int) -> bytes:
            s = attr.of(site) if attr is not None else None
            return s.group.sig if s is not None and s.group is not None else b""

        return keyed_id(*(v.site.to_bytes(8, "little") + v.mechanism.encode() + b"\0"
                          + v.after + b"\0" + owners(v.site) for v in self.runtime))

    def entries(self, limit: int = MAX_ENTRIES) -> tuple[list[dict[str, Any]], int]:
        """(mechanism, function, count) of the sites, grouped by function (and owner,
        when attributed: each row then has the `owner` of its sites; a site run by two
        owners counts in two rows), mechanism by mechanism (each gets its share of
        `limit`, so 35,000 ftrace sites do not hide one jump label; rows whose owner is
        not the kernel come first); and how many rows were left out."""
        groups: dict[str, dict[tuple[str, Any], int]] = {}
        owner_of: dict[Any, Owner] = {}
        attr = self.attribution
        for v in self.verified:
            sym = self.symbolize(v.site) or f"{v.site:#x}"
            funcs = groups.setdefault(v.mechanism, {})
            func = sym.split("+", 1)[0]
            s = attr.of(v.site) if attr is not None else None
            for o in (s.owners if s is not None else (None,)):
                key = (func, o.key if o is not None else None)
                if o is not None:
                    owner_of.setdefault(o.key, o)
                funcs[key] = funcs.get(key, 0) + 1
        mechs = [m for m in MECHANISMS if m in groups]
        share = max(1, limit // max(1, len(mechs)))
        rows: list[dict[str, Any]] = []
        more = 0

        def rank(kv: tuple[tuple[str, Any], int]) -> tuple[bool, int, str]:
            (f, ok), n = kv
            return (ok is None or ok[0] == "kernel", -n, f)

        for m in mechs:
            ranked = sorted(groups[m].items(), key=rank)
            for (f, ok), n in ranked[:share]:
                row: dict[str, Any] = {"mechanism": m, "symbol": f, "count": n}
                if ok is not None:
                    row["owner"] = owner_of[ok].to_json()
                rows.append(row)
            more += max(0, len(ranked) - share)
        return rows, more

    def to_json(self) -> dict[str, Any]:
        rows, more = self.entries()
        in_progress = sum(1 for v in self.verified if v.in_progress)
        out: dict[str, Any] = {"mechanisms": self.counts(), "pages": len(self.pages),
                               "in_progress": in_progress, "sites": rows, "more": more}
        if self.attribution is not None:
            out["owners"] = [o.to_json() for o in self.attribution.owners()[:MAX_ENTRIES]]
        return out


def split_by_page(verdict: PatchVerdict, link_base: int) -> dict[int, list[ByteRange]]:
    """The unverified ranges as page-relative byte ranges, by `.text` page."""
    out: dict[int, list[ByteRange]] = {}
    for u in verdict.unverified:
        _add(out, u, link_base)
    return out


def _add(out: dict[int, list[ByteRange]], u: UnverifiedRange, link_base: int) -> None:
    start, end = u.start - link_base, u.end - link_base
    pos = start
    while pos < end:
        page = pos // PAGE
        stop = min(end, (page + 1) * PAGE)
        a, b = pos - start, stop - start
        out.setdefault(page, []).append(ByteRange(
            pos - page * PAGE, stop - page * PAGE, u.before[a:b][:MAX_SHOWN].hex(),
            u.after[a:b][:MAX_SHOWN].hex(), u.reason))
        pos = stop

"""Resuming a VM after a restart of kscan: one fast pass instead of a full check.

After a clean full check the watcher persists what its fast pass compares (`Saved`:
the page-table entries the regions' translations went through, each vCPU's control
state, the kernel-half top-level entries, the regions' GPA runs and raw digests, and
the same for the code outside `.text` that verified patching reached) and
what the verdict rested on — the kernel build and its KASLR slide, the boot profile,
a digest of the golden baseline and one of the VM's per-VM state.

A restarted kscan gives the VM its verdict from that record only if a fast pass proves
the VM is now exactly what was verified: every saved page-table entry holds its saved
value (so every translation is the same), every vCPU's control state and kernel
mapping are the saved ones, the raw bytes of every region hash to the saved digests
(the keyed ones: `scanner.hashing`),
and the boot profile, golden baseline and per-VM state are still the ones the check
used. Anything else — a reboot (other slide: other page-table entries, other bytes),
memory changed while kscan was down, another baseline, a record that does not parse —
and the VM takes the full path, as on a first start. A record can be stale (written
before a later change) but never wrong: it describes a verified-clean state, and a VM
proven byte-identical to a verified-clean state is clean.

This module is pure (no database, no QMP): `Saved.to_bytes`/`from_bytes` are what the
store keeps; `Saved.reference` rebuilds the fast path's `Reference` over a VM's memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from scanner.check.fastpath import (
    FastResult,
    Reference,
    TableFingerprint,
    check_memory,
    check_registers,
    control_state,
)
from scanner.check.locate import REGIONS
from scanner.hashing import DIGEST_SIZE
from translate import GuestMemory, TranslationError
from translate.vcpu import VcpuState

__all__ = ["FORMAT", "Saved", "resume_check"]

#: Version of the persisted record; another version is not used (full path). 3: keyed
#: digests (`scanner.hashing.raw_digests`) and the code outside `.text` that verified
#: patching reached; a record of an older format (unkeyed xxh3) is re-taken.
FORMAT = 3
#: Bounds on a record read back (it is read from disk: checked before use).
_MAX_BYTES = 1 << 20
_MAX_ENTRIES = 1 << 14
_MAX_RUNS = 1 << 14
_MAX_VCPUS = 1 << 12
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Saved:
    """What a VM resumes from: its last clean full check, as the fast path sees it."""

    build_id: str
    slide: int
    boot_key: str
    #: (table page GPA, ((entry index, value), ...)) — `TableFingerprint.pages`.
    tables: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    top_index: tuple[int, ...]
    top_values: tuple[int, ...]
    control: tuple[tuple[int, int, int, int], ...]
    runs: dict[str, tuple[tuple[int, int], ...]]
    digests: dict[str, bytes]
    #: sha256 of the golden baseline's hashes, of the VM's per-VM state, and the size
    #: of the stored profile the check used (`scanner.examine`).
    golden: bytes
    state: bytes
    profile_size: int
    #: The `vm_clean` summary of the check (pages per basis), shown again on resume.
    summary: dict[str, Any]
    #: Code outside `.text` that verified patching reached (`scanner.check.reached`):
    #: its page-table entries (as `tables`), physical runs in order, and digest.
    reached_tables: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = ()
    reached_runs: tuple[tuple[int, int], ...] = ()
    reached_digest: bytes = b""

    @classmethod
    def of(cls, ref: Reference, build_id: str, slide: int, boot_key: str, golden: bytes,
           state: bytes, profile_size: int, summary: Mapping[str, Any]) -> Saved:
        return cls(build_id, slide, boot_key, tuple(ref.fingerprint.pages), ref.top_index,
                   ref.top_values, ref.control,
                   {n: tuple(r) for n, r in ref.runs.items()}, dict(ref.digests),
                   golden, state, profile_size, dict(summary),
                   tuple(ref.reached_fingerprint.pages), tuple(ref.reached_runs),
                   ref.reached_digest)

    # -- persistence -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "format": FORMAT, "build_id": self.build_id, "slide": self.slide,
            "boot_key": self.boot_key,
            "tables": [[page, [list(p) for p in pairs]] for page, pairs in self.tables],
            "top_index": list(self.top_index), "top_values": list(self.top_values),
            "control": [list(c) for c in self.control],
            "runs": {n: [list(r) for r in runs] for n, runs in self.runs.items()},
            "digests": {n: d.hex() for n, d in self.digests.items()},
            "golden": self.golden.hex(), "state": self.state.hex(),
            "profile_size": self.profile_size, "summary": self.summary,
            "reached_tables": [[page, [list(p) for p in pairs]]
                               for page, pairs in self.reached_tables],
            "reached_runs": [list(r) for r in self.reached_runs],
            "reached_digest": self.reached_digest.hex(),
        })

    @classmethod
    def from_bytes(cls, blob: bytes) -> Saved | None:
        """The record stored as `blob`; None if it is not one this kscan wrote (any
        other format, a wrong type, a value out of range): never half-trusted."""
        if len(blob) > _MAX_BYTES:
            return None
        try:
            d = orjson.loads(blob)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                return None
            tables = _tables(d["tables"])
            reached_tables = _tables(d["reached_tables"])
            reached_runs = tuple((_u64(g), _int(k, 1, _U64))
                                 for g, k in _seq(d["reached_runs"], _MAX_RUNS))
            reached_digest = bytes.fromhex(d["reached_digest"]) \
                if isinstance(d["reached_digest"], str) else None
            want = DIGEST_SIZE if reached_runs else 0
            if reached_digest is None or len(reached_digest) != want:
                return None
            top_index = tuple(_int(i, 0, 511) for i in _seq(d["top_index"], 512))
            top_values = tuple(_u64(v) for v in _seq(d["top_values"], 512))
            control = tuple(_control(c) for c in _seq(d["control"], _MAX_VCPUS))
            runs = {str(n): tuple((_u64(g), _int(k, 1, _U64)) for g, k in _seq(rs, _MAX_RUNS))
                    for n, rs in _map(d["runs"]).items()}
            digests = {str(n): _hexbytes(h, DIGEST_SIZE)
                       for n, h in _map(d["digests"]).items()}
            summary = d["summary"]
            saved = cls(_str(d["build_id"]), _int(d["slide"], -_U64, _U64),
                        _str(d["boot_key"]), tables, top_index, top_values, control,
                        runs, digests, _hexbytes(d["golden"], 32), _hexbytes(d["state"], 32),
                        _int(d["profile_size"], 0, _U64), summary,
                        reached_tables, reached_runs, reached_digest)
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
            return None
        if (set(saved.runs) != set(REGIONS) or set(saved.digests) != set(REGIONS)
                or len(top_index) != len(top_values) or not control or not tables
                or not isinstance(summary, dict)):
            return None
        return saved

    # -- use ---------------------------------------------------------------------------
    def reference(self, mem: GuestMemory) -> Reference:
        """The fast path's reference over `mem` (zero-copy views where the memory is
        mapped). TranslationError if a saved run is not RAM of this VM."""
        runs = {n: list(self.runs[n]) for n in REGIONS}
        views: dict[str, list[memoryview]] = {}
        if mem.zero_copy:
            try:
                for n in REGIONS:
                    views[n] = [mem.view(g, k) for g, k in runs[n]]
            except BaseException:
                for vs in views.values():
                    for v in vs:
                        v.release()
                raise
        ref = Reference(views=views, digests=dict(self.digests),
                        fingerprint=TableFingerprint.from_pages(self.tables),
                        top_index=self.top_index, top_values=self.top_values,
                        control=self.control, runs=runs,
                        reached_runs=list(self.reached_runs),
                        reached_digest=self.reached_digest,
                        reached_fingerprint=TableFingerprint.from_pages(self.reached_tables))
        if mem.zero_copy:
            try:
                ref.reached_views = [mem.view(g, k) for g, k in self.reached_runs]
            except BaseException:
                ref.release()
                raise
        return ref


def resume_check(saved: Saved, mem: GuestMemory, vcpus: Sequence[VcpuState],
                 boot_key: str) -> tuple[Reference | None, str]:
    """One fast pass against a saved record: the reference to keep watching with, or
    None and why the VM must take the full path. `boot_key` is the VM's boot profile
    key now (PTI read from its page tables). The caller has checked what is not in
    guest memory: the build is known, the golden baseline and per-VM state unchanged."""
    if boot_key != saved.boot_key:
        return None, "boot profile changed"
    if control_state(vcpus) != saved.control:
        return None, "vCPU control state changed"
    try:
        ref = saved.reference(mem)
    except TranslationError as err:
        return None, f"saved regions are not RAM of this VM: {err}"
    res: FastResult = check_registers(ref, mem, vcpus)
    if res.ok:  # keyed: the record may be old, and a restart is when to be thorough
        res = check_memory(ref, mem, keyed=True)
    if not res.ok:
        ref.release()
        return None, res.reason + (f": {','.join(res.changed)}" if res.changed else "")
    return ref, "unchanged"


def digest(*parts: bytes) -> bytes:
    """sha256 over length-prefixed parts (for the golden and per-VM state bindings)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


# -- strict readers for a record from disk ---------------------------------------------

def _tables(v: Any) -> tuple[tuple[int, tuple[tuple[int, int], ...]], ...]:
    """`TableFingerprint.pages` as persisted: page-aligned table GPAs, bounded."""
    tables = tuple((_u64(page), tuple((_int(i, 0, 511), _u64(x))
                                      for i, x in _seq(pairs, 512)))
                   for page, pairs in _seq(v, _MAX_ENTRIES))
    if (sum(len(p) for _, p in tables) > _MAX_ENTRIES
            or any(page & 0xFFF for page, _ in tables)):
        raise ValueError("bad page-table fingerprint")
    return tables


def _int(v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"bad integer {v!r}")
    return v


def _u64(v: Any) -> int:
    return _int(v, 0, _U64)


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v or len(v) > 4096:
        raise ValueError("bad string")
    return v


def _seq(v: Any, most: int) -> list[Any]:
    if not isinstance(v, list) or len(v) > most:
        raise ValueError("bad list")
    return v


def _map(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or len(v) > 64:
        raise ValueError("bad object")
    return v


def _hexbytes(v: Any, n: int) -> bytes:
    b = bytes.fromhex(_str(v))
    if len(b) != n:
        raise ValueError("bad digest")
    return b


def _control(v: Any) -> tuple[int, int, int, int]:
    a, b, c, d = _seq(v, 4)
    return _u64(a), _u64(b), _u64(c), _u64(d)

"""The fast path: prove nothing changed since the last full check, cheaply.

After a full check (slow path) the watcher keeps a `Reference` per VM:

* the page-table entries every region's translation went through (a `TableFingerprint`,
  grouped per table page and compared with one numpy gather each) — if they are
  unchanged, so are the translations, without re-walking;
* the kernel-half top-level entries each vCPU's CR3 must share (an attacker can point
  one process's PGD at a private copy of the kernel mapping);
* each vCPU's control state (CR0.WP, CR4.SMEP/SMAP, IDTR);
* the executable projection of the page tables that map executable kernel memory
  (`scanner.check.exec_fastpath.ExecTables`, from the last full check's walk);
* two digests of each region's raw bytes (`scanner.hashing.raw_digests`), hashed
  straight from zero-copy views of the guest's memory (memory that copies — anonymous
  RAM read from /proc/PID/mem, see `translate.procmem` — is read afresh at each pass
  instead: its views are snapshots): the fast one (xxh3_128 seeded from the host key),
  compared at every pass but the keyed ones, and the keyed one (AES-GMAC under the host
  key, then a block cipher: `scanner.hashing`), compared at the first pass once
  `keyed_every` seconds (KEYED_EVERY_S, `kscan run --keyed-every`; sooner when the
  budget has room: `scanner.run.scheduler.Scheduler.keyed_every`) have gone by since the
  last keyed comparison. So every VM gets a keyed comparison of all its protected bytes
  at least every `keyed_every` seconds plus one scan period, and a change that kept the
  seeded xxh3 is still caught then (docs/design.md "Keyed comparison" has the bound). A
  keyed pass costs 4-6× the hashing of a fast one: a bound in time, not in passes, keeps
  that share small however short the period (P/`keyed_every` of the passes);
* the same for the code outside `.text` that verified patching reaches (allocated
  ftrace trampolines, optprobe slots: `scanner.check.reached`) — its bytes (both
  digests, compared like the regions') and the page-table entries mapping it. A change
  there is reported as a `.text` change: the verdict on `.text` is what rested on it,
  and re-verifying `.text` reads it again.

The watcher runs `check_registers` and `check_memory` on the event loop. Any difference
sends the VM down the slow path (normalize, per-page compare, localize).
"""

from __future__ import annotations

import dataclasses
import enum
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from types import MappingProxyType

from scanner.check.exec_fastpath import ExecTables
from scanner.check.locate import LiveKernel
from scanner.check.measure import region_views
from scanner.check.reached import ReachedRange, reached_digest
from scanner.hashing import fast_digest, keyed_digest
from translate import GuestMemory, TranslationError, kernel_pgd_candidates
from translate.vcpu import VcpuState
from translate.x86 import CR0_WP, CR4_SMAP, CR4_SMEP

__all__ = ["KEYED_EVERY_S", "REACHED_BYTES", "REACHED_TABLES", "FastOutcome", "FastResult",
           "Reference", "TableFingerprint", "check_memory", "check_registers",
           "control_state", "fast_scan", "keyed_due", "make_reference"]

_CR4_BITS = CR4_SMEP | CR4_SMAP
#: Seconds between two keyed comparisons of a VM's memory, by default (the first fast
#: pass after them compares the keyed digests instead of the fast ones).
KEYED_EVERY_S = 300.0
_FAST = 16  # bytes of the fast digest at the start of a digest pair


class TableFingerprint:
    """The values of a set of page-table entries, checked one table page at a time.

    A region mapped with 2 MiB pages goes through a handful of entries (~25 for all
    four regions on a Debian guest), so indexing a `Q`-cast view of each table page is
    cheaper than any vectorised form; one `itemgetter` per page reads all its entries
    in one call (no Python loop per entry)."""

    def __init__(self, entries: Sequence[tuple[int, int]]) -> None:
        pages: dict[int, list[tuple[int, int]]] = {}
        for egpa, value in entries:
            pages.setdefault(egpa & ~0xFFF, []).append(((egpa & 0xFFF) >> 3, value))
        self.pages: list[tuple[int, tuple[tuple[int, int], ...]]] = [
            (page, tuple(pairs)) for page, pairs in sorted(pages.items())]
        self._compile()

    @classmethod
    def from_pages(cls, pages: Sequence[tuple[int, tuple[tuple[int, int], ...]]]
                   ) -> TableFingerprint:
        """The fingerprint whose `pages` are these (as persisted by `scanner.check.resume`)."""
        fp = cls(())
        fp.pages = [(page, tuple(pairs)) for page, pairs in pages]
        fp._compile()
        return fp

    def _compile(self) -> None:
        """Per table page: a getter of its entries and what it must return."""
        self._checks: list[tuple[int, Callable[[memoryview], object], object]] = []
        for page, pairs in self.pages:
            if not pairs:
                self._checks.append((page, _nothing, ()))
            else:  # one index: itemgetter returns the value itself, not a 1-tuple
                want = tuple(v for _, v in pairs) if len(pairs) > 1 else pairs[0][1]
                self._checks.append((page, itemgetter(*(i for i, _ in pairs)), want))

    def unchanged(self, mem: GuestMemory) -> bool:
        try:
            for page, get, want in self._checks:
                if get(mem.view(page, 4096).cast("Q")) != want:
                    return False
        except TranslationError:
            return False
        return True

    def __len__(self) -> int:
        return sum(len(p) for _, p in self.pages)


def _nothing(_table: memoryview) -> object:
    return ()


def control_state(vcpus: Sequence[VcpuState]) -> tuple[tuple[int, int, int, int], ...]:
    """What of each vCPU's registers the fast path compares."""
    return tuple((v.cr0 & CR0_WP, v.cr4 & _CR4_BITS, v.idtr_base, v.idtr_limit) for v in vcpus)


@dataclass
class Reference:
    """What a VM looked like at its last full check."""

    views: dict[str, list[memoryview]]  # empty when the memory copies (not zero_copy)
    #: Digest pairs (`scanner.hashing.raw_digests`); read-only: `set_digests` changes them.
    digests: Mapping[str, bytes]
    fingerprint: TableFingerprint
    top_index: tuple[int, ...]  # kernel-half top-level indices the regions go through
    top_values: tuple[int, ...]
    control: tuple[tuple[int, int, int, int], ...]
    runs: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)
    #: The page tables that decide what kernel memory is executable, as the last full
    #: check accounted for it (`scanner.check.exec_fastpath`; None: not known).
    exec_tables: ExecTables | None = None

    #: Code outside `.text` that verified patching reached (`scanner.check.reached`):
    #: its physical runs in order, their digest, and their page-table entries.
    reached_runs: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    reached_digest: bytes = b""
    reached_fingerprint: TableFingerprint = dataclasses.field(
        default_factory=lambda: TableFingerprint(()))
    reached_views: list[memoryview] = dataclasses.field(default_factory=list)

    def set_reached(self, mem: GuestMemory, reached: Sequence[ReachedRange],
                    pgd: int | None = None, top_shift: int = 39) -> None:
        """Make `reached` (what the last verification of `.text` read outside it) the
        code outside `.text` this reference holds. With `pgd` (the kernel page table
        the check walked), every vCPU must also share its top-level entries for the
        reached addresses (the kernel runs a trampoline through whatever CR3 is live)."""
        if pgd is not None:
            new = sorted({(r.va >> top_shift) & 0x1FF for r in reached} - set(self.top_index))
            if new:
                table = mem.view(pgd, 4096).cast("Q")
                pairs = sorted([*zip(self.top_index, self.top_values, strict=True),
                                *((i, int(table[i])) for i in new)])
                self.top_index = tuple(i for i, _ in pairs)
                self.top_values = tuple(v for _, v in pairs)
        for v in self.reached_views:
            v.release()
        self.reached_views = []
        self.reached_runs = [run for r in reached for run in r.runs]
        self.reached_digest = reached_digest(reached) if reached else b""
        self.reached_fingerprint = TableFingerprint([e for r in reached for e in r.entries])
        if mem.zero_copy:
            self.reached_views = [mem.view(g, n) for g, n in self.reached_runs]
    #: When (time.monotonic) the next pass is keyed; None: not scheduled yet. The first
    #: is set at a random phase of the schedule, because the full check (or resume pass)
    #: that made the reference was itself a keyed comparison: a fleet checked at about
    #: the same time would otherwise do its keyed passes (4-6x the hashing of a fast
    #: one) all in the same sweep, which then takes as long as five — the
    #: detection-latency tail. Any phase keeps the bound.
    keyed_due: float | None = None
    #: Zero-copy views of `exec_tables`' tables, kept between passes like `views`
    #: (None: not made yet, or for other tables than `exec_tables` holds now).
    exec_views: tuple[ExecTables, list[memoryview]] | None = None
    #: Per region over zero-copy memory: (name, views, fast digest, keyed digest), made
    #: once from `views` and `digests` (which change only through `set_digests`), so a
    #: pass does not rebuild them. Each pass's Python work runs with its objects
    #: cold (the previous VM's hashing streamed ~19 MB through the caches): fewer
    #: objects touched per pass is what makes it cheaper.
    _compare: list[tuple[str, list[memoryview], bytes, bytes]] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False)
    #: ((top_index, top_values) it was made for, a getter of those entries from a
    #: `Q`-cast table, what the getter must return).
    _top: tuple[tuple[tuple[int, ...], tuple[int, ...]], Callable[[memoryview], object],
                object] | None = dataclasses.field(default=None, init=False, repr=False,
                                                   compare=False)

    def __post_init__(self) -> None:
        self.digests = MappingProxyType(dict(self.digests))

    def set_digests(self, digests: Mapping[str, bytes]) -> None:
        """New reference digests for some regions (a partial re-check read them again)."""
        self.digests = MappingProxyType({**self.digests, **digests})
        self._compare = None

    def compare_list(self) -> list[tuple[str, list[memoryview], bytes, bytes]]:
        """`_compare`, made on first use."""
        c = self._compare
        if c is None:
            c = self._compare = [(name, vs, self.digests[name][:_FAST],
                                  self.digests[name][_FAST:])
                                 for name, vs in self.views.items()]
        return c

    def top_check(self) -> tuple[Callable[[memoryview], object], object]:
        """A getter of the top-level entries `top_index` names, and what it must return
        (made again when either tuple is replaced, as `set_reached` does)."""
        t = self._top
        idx, want = self.top_index, self.top_values
        if t is None or t[0][0] is not idx or t[0][1] is not want:
            if len(idx) == 1:   # itemgetter of one index returns the value itself
                t = ((idx, want), itemgetter(idx[0]), want[0])
            else:
                t = ((idx, want), itemgetter(*idx) if idx else _nothing, want)
            self._top = t
        return t[1], t[2]

    def exec_table_views(self, mem: GuestMemory) -> list[memoryview] | None:
        """The views of the current `exec_tables`' tables over zero-copy memory, made
        once per `exec_tables` (None: copying memory, or a table not in RAM)."""
        tables = self.exec_tables
        if tables is None or not mem.zero_copy:
            return None
        if self.exec_views is not None and self.exec_views[0] is tables:
            return self.exec_views[1]
        self._release_exec_views()
        try:
            views = tables.table_views(mem)
        except TranslationError:
            return None
        self.exec_views = (tables, views)
        return views

    def _release_exec_views(self) -> None:
        if self.exec_views is not None:
            for v in self.exec_views[1]:
                v.release()
            self.exec_views = None

    def release(self) -> None:
        """Drop the views so the guest memory mapping can be closed."""
        for vs in self.views.values():
            for v in vs:
                v.release()
        self.views.clear()
        self._compare = None
        for v in self.reached_views:
            v.release()
        self.reached_views = []
        self._release_exec_views()


def make_reference(mem: GuestMemory, lk: LiveKernel, vcpus: Sequence[VcpuState],
                   pgd: int, top_shift: int, digests: dict[str, bytes],
                   reached: Sequence[ReachedRange] = ()) -> Reference:
    """The reference after a full check. `digests` must be those of the very bytes that
    check verified (`scanner.check.measure.read_normalized`), not a fresh reading: a change
    made in between would otherwise become the reference unverified; likewise `reached`
    holds the bytes the patch verifiers read outside `.text`."""
    views = {name: region_views(mem, r) for name, r in lk.regions.items()} \
        if mem.zero_copy else {}
    entries = [e for r in lk.regions.values() for e in r.translation.entries]
    top = sorted({(r.va >> top_shift) & 0x1FF for r in lk.regions.values()}
                 | {(r.va >> top_shift) & 0x1FF for r in reached})
    table = mem.view(pgd, 4096).cast("Q")
    ref = Reference(
        views=views,
        digests=dict(digests),
        fingerprint=TableFingerprint(entries),
        top_index=tuple(top),
        top_values=tuple(int(table[i]) for i in top),
        control=control_state(vcpus),
        runs={name: list(r.runs) for name, r in lk.regions.items()},
    )
    try:
        ref.set_reached(mem, reached)
    except BaseException:
        ref.release()
        raise
    return ref


def _top_matches(ref: Reference, mem: GuestMemory, pgd: int) -> bool:
    get, want = ref.top_check()
    try:
        return get(mem.view(pgd, 4096).cast("Q")) == want
    except TranslationError:
        return False


class FastOutcome(enum.StrEnum):
    """What a fast pass found; anything but UNCHANGED sends the VM down the slow path."""

    UNCHANGED = "unchanged"
    CONTROL_CHANGED = "vCPU control state changed"
    MAPPING_CHANGED = "a vCPU maps the kernel differently"
    TABLES_CHANGED = "page tables of protected regions changed"
    EXEC_CHANGED = "page tables of executable kernel memory changed"
    BYTES_CHANGED = "region bytes changed"


@dataclass(frozen=True)
class FastResult:
    outcome: FastOutcome
    detail: str = ""  # more than the outcome says (which vCPU, ...)
    changed: tuple[str, ...] = ()  # BYTES_CHANGED: the regions whose bytes changed
    keyed: bool = False  # the bytes were compared with the keyed digests (4-6x the cost)

    @property
    def ok(self) -> bool:
        return self.outcome is FastOutcome.UNCHANGED

    @property
    def reason(self) -> str:
        return self.detail or ("" if self.ok else self.outcome.value)


_UNCHANGED = FastResult(FastOutcome.UNCHANGED)
_UNCHANGED_KEYED = FastResult(FastOutcome.UNCHANGED, keyed=True)
#: Details of a change in the code outside `.text` that verified patching reached.
REACHED_TABLES = "page tables of code outside .text that verified patching reaches changed"
REACHED_BYTES = "code outside .text that verified patching reaches changed"


def check_registers(ref: Reference, mem: GuestMemory,
                    vcpus: Sequence[VcpuState]) -> FastResult:
    """The vCPU part: control registers, and every vCPU's kernel mapping."""
    if control_state(vcpus) != ref.control:
        return FastResult(FastOutcome.CONTROL_CHANGED)
    for v in vcpus:
        if not any(_top_matches(ref, mem, pgd) for pgd in kernel_pgd_candidates(v.cr3)):
            return FastResult(FastOutcome.MAPPING_CHANGED,
                              f"vCPU {v.index} (CR3 {v.cr3:#x}) maps the kernel differently")
    if ref.exec_tables is not None:
        odd = ref.exec_tables.roots_match(mem, vcpus)
        if odd is not None:
            return FastResult(FastOutcome.EXEC_CHANGED, f"vCPU {odd} maps executable kernel "
                              "memory differently")
    return _UNCHANGED


def keyed_due(ref: Reference, every: float = KEYED_EVERY_S, now: float | None = None) -> bool:
    """Whether this pass of `ref` is a keyed one: `every` seconds since its last keyed
    comparison (the first from a random phase in (0, every])."""
    now = time.monotonic() if now is None else now
    due = ref.keyed_due
    if due is None or due > now + every:  # new, or `every` shortened by a reload
        due = ref.keyed_due = now + every * (1.0 - random.random())
    return now >= due


def check_memory(ref: Reference, mem: GuestMemory, keyed: bool | None = None, *,
                 every: float = KEYED_EVERY_S, now: float | None = None) -> FastResult:
    """The memory part: translations unchanged, region bytes unchanged. `keyed`: compare
    the keyed digests (None: when `keyed_due`, every `every` seconds; `now`:
    time.monotonic())."""
    if keyed is None:
        keyed = keyed_due(ref, every, now)
    if not ref.fingerprint.unchanged(mem):
        return FastResult(FastOutcome.TABLES_CHANGED)
    if ref.reached_runs and not ref.reached_fingerprint.unchanged(mem):
        return FastResult(FastOutcome.TABLES_CHANGED, REACHED_TABLES)
    if (ref.exec_tables is not None
            and not ref.exec_tables.tables_unchanged(mem, ref.exec_table_views(mem), keyed)):
        return FastResult(FastOutcome.EXEC_CHANGED)
    digest = keyed_digest if keyed else fast_digest
    half = slice(_FAST, None) if keyed else slice(None, _FAST)  # of each digest pair
    changed: tuple[str, ...] = ()
    if mem.zero_copy:
        for name, views, fast_want, keyed_want in ref.compare_list():
            if digest(views) != (keyed_want if keyed else fast_want):
                changed += (name,)
        reached = ref.reached_views
    else:  # copies are snapshots: read the regions again
        for name, runs in ref.runs.items():
            if digest([mem.view(g, n) for g, n in runs]) != ref.digests[name][half]:
                changed += (name,)
        reached = [mem.view(g, n) for g, n in ref.reached_runs]
    if keyed:  # compared keyed: the next is `every` seconds from now
        ref.keyed_due = (time.monotonic() if now is None else now) + every
    detail = ""
    if ref.reached_runs and digest(reached) != ref.reached_digest[half]:
        # The .text verdict rested on these bytes: re-verify .text (which reads them).
        detail = REACHED_BYTES
        if ".text" not in changed:
            changed = (".text", *changed)
    if changed:
        return FastResult(FastOutcome.BYTES_CHANGED, detail, changed=changed, keyed=keyed)
    return _UNCHANGED_KEYED if keyed else _UNCHANGED


def fast_scan(ref: Reference, mem: GuestMemory, vcpus: Sequence[VcpuState] | None,
              keyed: bool | None = None, *, every: float = KEYED_EVERY_S,
              now: float | None = None) -> FastResult:
    """Compare the VM with its reference. `vcpus` None: registers not refreshed;
    `keyed`, `every`, `now`: as `check_memory`'s."""
    if vcpus is not None:
        res = check_registers(ref, mem, vcpus)
        if not res.ok:
            return res
    return check_memory(ref, mem, keyed, every=every, now=now)

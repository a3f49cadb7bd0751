"""x86-64 page-table walker: guest-virtual → guest-physical, with permissions.

Paging modes are data (after Volatility's intel layers): a mode is a tuple of levels,
each with its index shift and whether it may map a large page. 4-level and 5-level
(CR4.LA57) differ in constants, not code. A walk reads one 8-byte entry per level from
guest RAM through `GuestMemory`, so it is bounded by construction: at most five reads
per page, whatever the guest wrote into its tables (a table that points at itself just
gets read as the next level; it cannot make us loop). Ranges are bounded by size.

Effective permissions follow the hardware: writable and user are ANDed over the
levels, no-execute is ORed (when EFER.NXE is set).

Everything read here comes from the guest and is hostile: entries pointing outside RAM,
reserved large-page bits and non-canonical addresses end in `PageFaultError` naming the
virtual address, the level and the entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from translate.errors import PageFaultError, PhysicalAddressError, TranslationError
from translate.physmem import GuestMemory
from translate.x86 import CR0_PG, CR4_LA57, CR4_PAE, EFER_LMA

__all__ = [
    "FIVE_LEVEL",
    "FOUR_LEVEL",
    "Level",
    "Mapping",
    "PageWalker",
    "PagingMode",
    "Run",
    "Translation",
    "coalesce",
    "kernel_pgd_candidates",
    "paging_mode",
]

#: Physical-address bits of an entry (MAXPHYADDR ≤ 52).
ADDR_MASK = 0x000F_FFFF_FFFF_F000
P, RW, US, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
NX = 1 << 63
#: Largest range one call may translate; the kernel's protected regions are ~20 MiB.
MAX_RANGE = 1 << 30



@dataclass(frozen=True)
class Level:
    name: str
    shift: int
    large_ok: bool  # may an entry at this level map a page (PS bit)?


@dataclass(frozen=True)
class PagingMode:
    name: str
    levels: tuple[Level, ...]
    va_bits: int


FOUR_LEVEL = PagingMode(
    "4-level",
    (Level("PML4", 39, False), Level("PDPT", 30, True), Level("PD", 21, True),
     Level("PT", 12, True)),
    48,
)
FIVE_LEVEL = PagingMode("5-level", (Level("PML5", 48, False), *FOUR_LEVEL.levels), 57)


def paging_mode(cr0: int, cr4: int, efer: int) -> PagingMode:
    """The paging mode a vCPU's control registers select (64-bit long mode only)."""
    if not (cr0 & CR0_PG and cr4 & CR4_PAE and efer & EFER_LMA):
        raise TranslationError(
            f"vCPU is not in 64-bit long mode (CR0={cr0:#x} CR4={cr4:#x} EFER={efer:#x})",
            hint="wait until the guest kernel has booted",
        )
    return FIVE_LEVEL if cr4 & CR4_LA57 else FOUR_LEVEL


def kernel_pgd_candidates(cr3: int) -> tuple[int, ...]:
    """GPAs that may hold the kernel's top-level table for a CR3 value, best first.

    Bit 63 is the no-flush hint and bits 0-11 are flags or a PCID. With page-table
    isolation (PTI) a vCPU in user mode runs on the user half of an 8 KiB PGD pair
    (bit 12 set) which maps only the entry trampoline; the kernel PGD is the even
    page. A kernel built without PTI may have bit 12 set legitimately, hence two
    candidates; the caller keeps the one that maps the kernel.
    """
    base = cr3 & ADDR_MASK
    kernel = base & ~0x1FFF
    return (kernel,) if kernel == base else (kernel, base)


@dataclass(frozen=True)
class Mapping:
    """How one virtual address is mapped."""

    va: int
    gpa: int
    page_size: int
    writable: bool
    user: bool
    nx: bool
    level: str


@dataclass(frozen=True)
class Run:
    """A virtually and physically contiguous piece of a range, uniform in page size
    and permissions."""

    va: int
    gpa: int
    size: int
    page_size: int
    writable: bool
    user: bool
    nx: bool

    @property
    def perms(self) -> str:
        return ("r" + ("w" if self.writable else "-") + ("-" if self.nx else "x")
                + ("u" if self.user else "k"))


@dataclass(frozen=True)
class Translation:
    """A virtual range translated: its runs, and every page-table entry the walk read
    as (entry gpa, value) — the translation is unchanged as long as those entries are."""

    va: int
    size: int
    runs: tuple[Run, ...]
    entries: tuple[tuple[int, int], ...]

    @property
    def tables(self) -> frozenset[int]:
        """GPAs of the table pages the walk read."""
        return frozenset(e & ~0xFFF for e, _ in self.entries)

    def gpa_runs(self) -> tuple[tuple[int, int], ...]:
        """(gpa, size) pieces, physically contiguous ones merged."""
        return tuple((r.gpa, r.size) for r in coalesce(self.runs))


def coalesce(runs: Iterable[Run]) -> list[Run]:
    """Merge runs that continue each other both virtually and physically (permissions
    and page size of the first are kept: for hashing, not for reporting)."""
    out: list[Run] = []
    for r in runs:
        if out and out[-1].va + out[-1].size == r.va and out[-1].gpa + out[-1].size == r.gpa:
            last = out[-1]
            out[-1] = Run(last.va, last.gpa, last.size + r.size, min(last.page_size, r.page_size),
                          last.writable and r.writable, last.user and r.user, last.nx or r.nx)
        else:
            out.append(r)
    return out


class PageWalker:
    """Walks one address space (a top-level table at `pgd`) in guest RAM."""

    def __init__(self, mem: GuestMemory, pgd: int, mode: PagingMode = FOUR_LEVEL,
                 *, nxe: bool = True) -> None:
        self.mem = mem
        self.pgd = pgd & ADDR_MASK
        self.mode = mode
        self.nx_mask = NX if nxe else 0
        top = mode.va_bits - 1
        self._canon_hi = ~((1 << top) - 1) & 0xFFFF_FFFF_FFFF_FFFF
        self._canon_lo = (1 << top) - 1

    def _check_canonical(self, va: int) -> None:
        if not (0 <= va <= self._canon_lo or self._canon_hi <= va <= 0xFFFF_FFFF_FFFF_FFFF):
            raise PageFaultError(va, self.mode.name,
                                 f"not canonical for {self.mode.va_bits}-bit addresses")

    def _walk(self, va: int, cache: dict[int, tuple[int, int, int, int, int]] | None,
              entries: dict[int, int] | None) -> Mapping:
        """One walk. `cache` maps depth → (va prefix, table gpa, rw, us, nx) of tables
        already found during this call, so consecutive pages skip the upper levels."""
        levels = self.mode.levels
        depth, table, rw, us, nx = 0, self.pgd, RW, US, 0
        if cache:
            for d in range(len(levels) - 1, 0, -1):
                hit = cache.get(d)
                if hit is not None and hit[0] == va >> (levels[d].shift + 9):
                    _, table, rw, us, nx = hit
                    depth = d
                    break
        read = self.mem.read_u64
        for d in range(depth, len(levels)):
            lvl = levels[d]
            if cache is not None:
                cache[d] = (va >> (lvl.shift + 9), table, rw, us, nx)
            egpa = table + ((va >> lvl.shift) & 0x1FF) * 8
            try:
                e = read(egpa)
            except PhysicalAddressError as err:
                raise PageFaultError(va, lvl.name, f"table at gpa {table:#x} is outside RAM",
                                     entry_gpa=egpa) from err
            if entries is not None:
                entries[egpa] = e
            if not e & P:
                raise PageFaultError(va, lvl.name, "not present", entry=e, entry_gpa=egpa)
            rw &= e
            us &= e
            nx |= e & self.nx_mask
            if lvl.shift == 12 or e & PS:
                if not lvl.large_ok:
                    raise PageFaultError(va, lvl.name, "large-page bit set where the level "
                                         "cannot map a page", entry=e, entry_gpa=egpa)
                size = 1 << lvl.shift
                frame = e & ADDR_MASK & ~(size - 1)
                return Mapping(va, frame | (va & (size - 1)), size, bool(rw), bool(us),
                               bool(nx), lvl.name)
            table = e & ADDR_MASK
        raise AssertionError("unreachable: the last level always maps")  # pragma: no cover

    def translate(self, va: int) -> Mapping:
        """Translate one virtual address."""
        self._check_canonical(va)
        return self._walk(va, None, None)

    def translate_range(self, va: int, size: int, *, max_size: int = MAX_RANGE,
                        check_ram: bool = True) -> Translation:
        """Translate [va, va+size) into runs; raise if any page is unmapped.

        With `check_ram`, every byte of every run must be guest RAM (so the caller can
        take views of them); otherwise runs may point at MMIO or holes.
        """
        if size <= 0 or size > max_size:
            raise TranslationError(f"range {va:#x}+{size:#x}: size must be 1..{max_size:#x}")
        self._check_canonical(va)
        self._check_canonical(va + size - 1)
        cache: dict[int, tuple[int, int, int, int, int]] = {}
        entries: dict[int, int] = {}
        runs: list[Run] = []
        cur, end = va, va + size
        while cur < end:
            m = self._walk(cur, cache, entries)
            n = min(m.page_size - (cur & (m.page_size - 1)), end - cur)
            if check_ram and not self.mem.contains(m.gpa, n):
                raise PageFaultError(cur, m.level, f"maps gpa {m.gpa:#x}+{n:#x}, which is "
                                     "not guest RAM")
            if runs:
                last = runs[-1]
                if (last.gpa + last.size == m.gpa and last.page_size == m.page_size
                        and (last.writable, last.user, last.nx) == (m.writable, m.user, m.nx)):
                    runs[-1] = Run(last.va, last.gpa, last.size + n, last.page_size,
                                   last.writable, last.user, last.nx)
                    cur += n
                    continue
            runs.append(Run(cur, m.gpa, n, m.page_size, m.writable, m.user, m.nx))
            cur += n
        return Translation(va, size, tuple(runs), tuple(sorted(entries.items())))

    def try_translate(self, va: int) -> Mapping | None:
        try:
            return self.translate(va)
        except TranslationError:
            return None

"""Find a live kernel's KASLR slide and which stored profile it runs — without symbols.

The x86-64 kernel image is mapped somewhere in [0xffffffff80000000, 0xffffffffc0000000)
at a 2 MiB-aligned slide from its link address. For each candidate slide we translate
the slid start of `.text` and compare that page with the profile's first `.text` page:
boot-time patching changes a few bytes, so a match is "at least 3000 of 4096 bytes
equal" (measured: the first page is not byte-identical). IDT handlers, which point
into the slid text, order the candidates so the right one is usually tried first.

A match is then confirmed twice: `__ex_table` (position-independent, not patched) must
be nearly identical, and the GNU build-id note read from the guest's `.notes` must be
the profile's. A VM whose kernel matches no profile gets its version banner read from
guest memory for the error message — sanitized, since it is guest-controlled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from scanner.errors import ProfileError
from scanner.image.kernel_profile import KernelProfile
from scanner.image.notes import find_build_id
from translate import PAGE, GuestMemory, PageWalker, TranslationError

__all__ = ["Identified", "SlideMatch", "find_slide", "identify", "read_banner"]

IMAGE_START = 0xFFFF_FFFF_8000_0000
IMAGE_END = 0xFFFF_FFFF_C000_0000
ALIGN = 2 << 20
#: Of the first 4096 bytes of .text, how many must equal the file's (measured ~4000+).
MATCH_MIN = 3000
#: Fraction of __ex_table bytes that must equal the file's.
EX_TABLE_MIN = 0.95
BANNER = b"Linux version "
MAX_BANNER = 256


@dataclass(frozen=True)
class SlideMatch:
    slide: int
    text_gpa: int
    text_equal: int  # of 4096 bytes of the first .text page
    ex_table_equal: float
    build_id: str | None  # read from the guest's .notes, None if unreadable


def _candidates(profile: KernelProfile, hints: Sequence[int]) -> list[int]:
    text = profile.text
    lo = -((text.addr - IMAGE_START) // ALIGN) * ALIGN
    hi = IMAGE_END - text.end
    all_slides = list(range(lo, hi + 1, ALIGN))
    if not hints:
        return all_slides
    # Slides under which every hinted address (IDT handlers) falls inside .text first.
    first = [s for s in all_slides if all(text.addr + s <= h < text.end + s for h in hints)]
    seen = set(first)
    return first + [s for s in all_slides if s not in seen]


def _read(mem: GuestMemory, walker: PageWalker, va: int, size: int) -> bytes | None:
    """Copy a small range out of the guest (slide search only, not the hot path)."""
    try:
        t = walker.translate_range(va, size)
        return b"".join(bytes(mem.view(g, n)) for g, n in t.gpa_runs())
    except TranslationError:
        return None


def _guest_build_id(mem: GuestMemory, walker: PageWalker, profile: KernelProfile,
                    slide: int) -> str | None:
    notes = profile.sections.get(".notes")
    if notes is None or not 0 < notes.size <= 64 * 1024:
        return None
    data = _read(mem, walker, notes.addr + slide, notes.size)
    if data is None:
        return None
    return find_build_id(data)


def find_slide(mem: GuestMemory, walker: PageWalker, profile: KernelProfile,
               hints: Sequence[int] = ()) -> SlideMatch | None:
    """The slide under which this profile's kernel is mapped, or None."""
    head = np.frombuffer(profile.text_head, dtype=np.uint8)
    ex = np.frombuffer(profile.ex_table, dtype=np.uint8)
    for slide in _candidates(profile, hints):
        m = walker.try_translate(profile.text.addr + slide)
        if m is None or not mem.contains(m.gpa, len(head)):
            continue
        page = np.frombuffer(mem.view(m.gpa, len(head)), dtype=np.uint8)
        equal = int(np.count_nonzero(page == head))
        if equal < MATCH_MIN * len(head) // PAGE:
            continue
        ex_equal = 1.0
        if ex.size:
            guest_ex = _read(mem, walker, profile.section("__ex_table").addr + slide, ex.size)
            if guest_ex is None:
                continue
            ex_equal = float(np.count_nonzero(np.frombuffer(guest_ex, np.uint8) == ex)) / ex.size
            if ex_equal < EX_TABLE_MIN:
                continue
        build_id = _guest_build_id(mem, walker, profile, slide)
        if build_id is not None and build_id != profile.build_id:
            continue  # same text head, different build: not this profile
        return SlideMatch(slide, m.gpa, equal, ex_equal, build_id)
    return None


def read_banner(mem: GuestMemory, walker: PageWalker) -> str | None:
    """The first `Linux version ...` string in the mapped kernel image window."""
    for va in range(IMAGE_START, IMAGE_END, ALIGN):
        m = walker.try_translate(va)
        if m is None:
            continue
        base = m.gpa - (va - (va & ~(m.page_size - 1))) if m.page_size > ALIGN else m.gpa
        size = min(ALIGN, m.page_size)
        if not mem.contains(base, size):
            continue
        if m.page_size == PAGE:  # a 2 MiB window of 4 KiB pages: search page by page
            hit = None
            for off in range(0, ALIGN, PAGE):
                p = walker.try_translate(va + off)
                if p is not None and mem.contains(p.gpa, PAGE):
                    hit = mem.find(BANNER, p.gpa, PAGE)
                    if hit is not None:
                        break
        else:
            hit = mem.find(BANNER, base, size)
        if hit is not None:
            raw = bytes(mem.view(hit, min(MAX_BANNER, _room(mem, hit))))
            return _sanitize(raw.split(b"\n", 1)[0].split(b"\0", 1)[0])
    return None


def _room(mem: GuestMemory, gpa: int) -> int:
    n = MAX_BANNER
    while n > len(BANNER) and not mem.contains(gpa, n):
        n //= 2
    return n


def _sanitize(raw: bytes) -> str:
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in raw)


@dataclass(frozen=True)
class Identified:
    """The stored profile a VM runs, and where its kernel sits."""

    profile: KernelProfile
    match: SlideMatch


def identify(mem: GuestMemory, walker: PageWalker, profiles: Iterable[KernelProfile],
             hints: Sequence[int] = (), *, vm: str = "vm") -> Identified:
    """Which stored profile this VM runs, and its slide; ProfileError if none fits."""
    tried = 0
    for profile in profiles:
        tried += 1
        match = find_slide(mem, walker, profile, hints)
        if match is not None:
            return Identified(profile, match)
    version = read_banner(mem, walker)
    what = f"kernel {version!r}" if version else "its kernel (no version banner found)"
    raise ProfileError(
        f"no stored profile matches {what} (tried {tried})", vm=vm, version=version,
        hint="add the VM's kernel image with: kscan profile add /path/to/vmlinuz-RELEASE",
    )

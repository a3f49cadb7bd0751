"""KASLR normalization of relocated bytes that alternatives copy into `.text` at boot.

The relocation table lists sites where they are linked. An alternative's replacement
lives in `.altinstr_replacement`, so a relocation inside it (a per-CPU `%gs:sym(%rip)`
displacement: inverse 32-bit; an absolute address: 32/64-bit) is applied there, and
`apply_alternatives` then copies the relocated bytes over the original instruction in
`.text`, where no relocation is listed — so those `.text` bytes depend on the slide.
Seen on Debian 6.12: `__switch_to_asm`'s FILL_RETURN_BUFFER alternative
(X86_FEATURE_RSB_CTXSW) carries CREDIT_CALL_DEPTH's `movq $-1, %gs:pcpu_hot+X(%rip)`,
whose displacement differed between two clean guests by exactly their slides' difference.

What the kernel writes is known: for a RIP-relative displacement to a target outside the
replacement, `apply_relocation` (arch/x86/kernel/alternative.c) adds `repl - instr`, so
an applied inverse site holds `v_file + (repl - instr) - slide`; an absolute site is
copied as is, `v_file + slide`. Normalization is conditional: a site is rewritten to its
slide-0 value only if it holds exactly the value the kernel would have written at this
slide. Anything else (the alternative not applied, or tampered bytes) is left as it is,
so the comparison with the baseline still sees it.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from scanner.image.vmlinux import KernelImage

__all__ = ["AltRelocs", "alt_relocs_from_image", "normalize_alt"]

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class AltRelocs:
    """Sites in one region (offsets from its start) that may hold relocated bytes copied
    from an alternative's replacement, with their normalized (slide 0) value."""

    offsets: I64
    widths: I64     # 4 or 8
    canon: I64      # the value at slide 0 (unsigned, in the site's width)
    sign: I64       # +1: live = canon + slide (32/64-bit); -1: canon - slide (inverse)

    @classmethod
    def empty(cls) -> AltRelocs:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z)

    @property
    def count(self) -> int:
        return int(self.offsets.size)

    def to_arrays(self) -> list[bytes]:
        return [a.astype("<i8").tobytes() for a in (self.offsets, self.widths, self.canon,
                                                    self.sign)]

    @classmethod
    def from_arrays(cls, raw: list[bytes]) -> AltRelocs:
        a = [np.frombuffer(b, dtype="<i8").astype(np.int64) for b in raw]
        return cls(a[0], a[1], a[2], a[3])


def _alt_entries(image: KernelImage) -> list[tuple[int, int, int, int]]:
    """(instr, repl, instrlen, replacementlen) of every `.altinstructions` entry. The
    entry is 12 bytes up to 6.2 (u16 cpuid) and 14 from 6.3 (u32 ft_flags); the size
    whose every entry points into the image with a sane replacement is taken."""
    alt = image.sections.get(".altinstructions")
    rep = image.sections.get(".altinstr_replacement")
    if alt is None or rep is None:
        return []
    data = image.section_bytes(".altinstructions")
    lo = min(s.addr for s in image.sections.values())
    hi = max(s.addr + s.size for s in image.sections.values())
    for size, fmt in ((14, "<iiIBB"), (12, "<iiHBB")):
        n = len(data) // size
        if n == 0 or len(data) - n * size > 3:
            continue
        out = []
        for i in range(n):
            io, ro, _, il, rl = struct.unpack_from(fmt, data, i * size)
            instr = alt.addr + i * size + io
            repl = alt.addr + i * size + 4 + ro
            if not lo <= instr < hi or (rl and not rep.addr <= repl <= rep.addr + rep.size - rl):
                break
            out.append((instr, repl, il, rl))
        else:
            return out
    return []


def alt_relocs_from_image(image: KernelImage, region: str) -> AltRelocs:
    """The alternative-copied relocation sites of `region` (in practice `.text`)."""
    rep = image.sections.get(".altinstr_replacement")
    sec = image.sections.get(region)
    if rep is None or sec is None or image.relocs is None:
        return AltRelocs.empty()
    rbytes = image.section_bytes(".altinstr_replacement")
    r = image.relocs
    listed = np.unique(np.concatenate([np.asarray(x, dtype=np.uint64).astype(np.int64)
                                       for x in (r.r64, r.r32, r.r32_inv)]))

    def in_rep(addrs: npt.ArrayLike) -> list[int]:
        a = np.asarray(addrs, dtype=np.uint64)
        return sorted(a[(a >= np.uint64(rep.addr)) & (a < np.uint64(rep.addr + rep.size))]
                      .tolist())

    kinds = [(in_rep(r.r64), 8, 1), (in_rep(r.r32), 4, 1), (in_rep(r.r32_inv), 4, -1)]
    if not any(k[0] for k in kinds):
        return AltRelocs.empty()
    sites: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for instr, repl, _il, rl in _alt_entries(image):
        if not sec.addr <= instr < sec.addr + sec.size:
            continue
        for addrs, width, sign in kinds:
            for a in addrs[bisect.bisect_left(addrs, repl):bisect.bisect_left(addrs, repl + rl)]:
                if a + width > repl + rl:
                    continue
                text = instr + (a - repl)
                if text + width > sec.addr + sec.size:
                    continue
                # A site the relocation table already lists (or overlaps) is left to it.
                i = np.searchsorted(listed, text - 7)
                if i < listed.size and listed[i] < text + width:
                    continue
                mask = (1 << (8 * width)) - 1
                v = int.from_bytes(rbytes[a - rep.addr:a - rep.addr + width], "little")
                canon = (v + (repl - instr)) & mask if sign < 0 else v
                sites[(text - sec.addr, canon)] = (text - sec.addr, width, canon, sign)
    rows = sorted(sites.values())
    if not rows:
        return AltRelocs.empty()
    cols = list(zip(*rows, strict=True))
    # canon may use all 64 bits: keep the bit pattern in an int64.
    return AltRelocs(np.array(cols[0], dtype=np.int64), np.array(cols[1], dtype=np.int64),
                     np.array([c - (1 << 64) if c >= 1 << 63 else c for c in cols[2]],
                              dtype=np.int64), np.array(cols[3], dtype=np.int64))


def normalize_alt(buf: bytearray, alt: AltRelocs | None, slide: int) -> int:
    """Rewrite, in place, each site holding exactly what the kernel writes there at
    `slide` to its slide-0 value. Returns the number of sites rewritten."""
    if alt is None or alt.count == 0 or slide == 0:
        return 0
    done: set[int] = set()
    for off, width, canon, sign in zip(alt.offsets.tolist(), alt.widths.tolist(),
                                       alt.canon.tolist(), alt.sign.tolist(), strict=True):
        if off in done or off < 0 or off + width > len(buf):
            continue
        mask = (1 << (8 * width)) - 1
        c = canon & mask
        live = (c + sign * slide) & mask
        if int.from_bytes(buf[off:off + width], "little") == live:
            buf[off:off + width] = c.to_bytes(width, "little")
            done.add(off)
    return len(done)

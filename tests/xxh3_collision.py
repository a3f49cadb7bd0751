"""Forging an XXH3 collision with the public default secret: the attack keyed hashing stops.

XXH3 (inputs over 240 bytes) accumulates each 64-byte stripe s of a 1 KiB block into
eight 64-bit lanes: for lane i with input word v and secret word k (at secret offset
8s + 8i), `acc[i^1] += v` and `acc[i] += lo32(v^k) * hi32(v^k)`. Additions commute
until the block's scramble, so an edit of some words only has to leave each lane's sum
over the block unchanged. With k public, a free word w whose `w^k` has a zero 32-bit
half adds nothing through the product: only `w` itself, to the partner lane. Two such
words in one lane (one with the low half fixed, one with the high half fixed) can sum
to any 64-bit value — so four free words (dead int3 padding), two in each lane of the
pair an edit touches, cancel any edit of that pair: the page's xxh3_64, any enclosing
buffer's xxh3_128 (same accumulators, other merge) and so a region's, are unchanged.
Words must lie in a block the hash scrambles (not the last, partial one).
"""

from __future__ import annotations

from collections.abc import Sequence

SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
BLOCK, STRIPE = 1024, 64
_M64, _M32 = (1 << 64) - 1, (1 << 32) - 1


def lane(off: int) -> int:
    return (off % STRIPE) // 8


def key(off: int) -> int:
    """The secret word that meets the input word at `off` (8-aligned, in a full block)."""
    s = (off % BLOCK) // STRIPE
    return int.from_bytes(SECRET[8 * s + 8 * lane(off):8 * s + 8 * lane(off) + 8], "little")


def _contrib(off: int, v: int) -> dict[int, int]:
    x = v ^ key(off)
    return {lane(off) ^ 1: v, lane(off): (x & _M32) * (x >> 32) & _M64}


def _word(buf: bytes | bytearray, off: int) -> int:
    return int.from_bytes(buf[off:off + 8], "little")


def forge(buf: bytes, edit_off: int, edit: bytes, free: Sequence[int]) -> bytes:
    """`buf` with `edit` written at `edit_off` (inside one 8-aligned word) and the four
    8-aligned words at `free` (two in each lane of the edited word's pair, same 1 KiB
    block) rewritten so that every XXH3 lane sum of the block stays the same."""
    w = edit_off - edit_off % 8
    if edit_off + len(edit) > w + 8:
        raise ValueError("the edit must stay inside one 8-byte word")
    a = lane(w) & ~1
    if sorted(lane(f) for f in free) != [a, a, a + 1, a + 1] or len({*free, w}) != 5:
        raise ValueError("need two free words in each lane of the pair, besides the edit")
    if {f // BLOCK for f in free} != {w // BLOCK}:
        raise ValueError("the free words must be in the edited word's block")
    new = bytearray(buf)
    new[edit_off:edit_off + len(edit)] = edit
    need = {a: 0, a + 1: 0}   # what the free words must add to each lane
    for off, sign in ((w, 1), (w, -1)):
        v = _word(buf if sign == 1 else new, off)
        for ln, c in _contrib(off, v).items():
            need[ln] = (need[ln] + sign * c) & _M64
    for f in free:
        for ln, c in _contrib(f, _word(buf, f)).items():
            need[ln] = (need[ln] + c) & _M64
    for ln in (a, a + 1):
        # Free words in the partner lane feed lane `ln` with their value alone.
        f1, f2 = sorted(f for f in free if lane(f) == ln ^ 1)
        k1, k2 = key(f1), key(f2)
        t = need[ln]
        lo2 = ((t & _M32) - (k1 & _M32)) & _M32         # w2's free low half
        carry = ((k1 & _M32) + lo2) >> 32
        hi1 = ((t >> 32) - (k2 >> 32) - carry) & _M32    # w1's free high half
        w1 = hi1 << 32 | (k1 & _M32)                    # w1 ^ k1: low half zero
        w2 = (k2 >> 32) << 32 | lo2                     # w2 ^ k2: high half zero
        assert (w1 + w2) & _M64 == t
        new[f1:f1 + 8] = w1.to_bytes(8, "little")
        new[f2:f2 + 8] = w2.to_bytes(8, "little")
    return bytes(new)


def padding_words(buf: bytes | bytearray, block: int, fill: int = 0xCC) -> list[int]:
    """Offsets of the 8-aligned words of block `block` made only of `fill` (int3)."""
    pad = bytes([fill]) * 8
    return [o for o in range(block * BLOCK, (block + 1) * BLOCK, 8) if buf[o:o + 8] == pad]

"""Addresses in kscan's JSON: `0x`-prefixed lower-case hex strings, one convention.

Kernel virtual addresses (`va`, handlers, the IDTR base), guest-physical addresses
(`gpa`), KASLR slides and control-register values are unsigned 64-bit numbers; most
kernel addresses are above 2^63. As JSON integers they are exact in Python and orjson,
but jq prints them rounded (it reads numbers as doubles) and Elasticsearch's `long`
refuses them. So every event and every `--json` output writes them with `hex_addr`, as
the text output does (`0xffffffff9a005000`); sizes, counts, offsets and limits stay
numbers. `int(value, 16)` reads one back.
"""

from __future__ import annotations

__all__ = ["hex_addr", "hex_or_none"]


def hex_addr(value: int) -> str:
    """`value` as a JSON address: `0x` and lower-case hex (negative values, which kscan
    never emits for an address, keep their sign: `-0x1`)."""
    return f"{value:#x}"


def hex_or_none(value: int | None) -> str | None:
    return None if value is None else hex_addr(value)

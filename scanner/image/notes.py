"""ELF notes: the GNU build-id note, parsed the same way from an image file and from
guest memory (where the bytes are hostile: every length is checked, the walk bounded).
"""

from __future__ import annotations

import struct

__all__ = ["NT_GNU_BUILD_ID", "find_build_id"]

NT_GNU_BUILD_ID = 3
#: Notes looked at in one blob at most: a kernel has a handful.
MAX_NOTES = 256


def find_build_id(blob: bytes | bytearray | memoryview) -> str | None:
    """The hex GNU build id of a `.notes` blob, or None if it has none (or is malformed)."""
    data = bytes(blob)
    pos = 0
    for _ in range(MAX_NOTES):
        if pos + 12 > len(data):
            break
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        end = desc_at + ((descsz + 3) & ~3)
        if desc_at + descsz > len(data):
            break
        if (ntype == NT_GNU_BUILD_ID and descsz
                and data[name_at:name_at + namesz].rstrip(b"\0") == b"GNU"):
            return data[desc_at:desc_at + descsz].hex()
        pos = end
    return None

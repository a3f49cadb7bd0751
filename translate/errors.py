"""Errors of the translation layer: guest physical reads and page-table walks.

Every guest address involved is kept as an int field and printed in hex, so a report
says exactly which address, at which paging level, through which entry, went wrong.
"""

from __future__ import annotations

from kscan.errors import KscanError


class TranslationError(KscanError):
    """A guest address could not be turned into host memory."""


class PhysicalAddressError(TranslationError):
    """A guest-physical range is not (wholly) inside a file-backed RAM range."""

    def __init__(self, gpa: int, size: int, reason: str) -> None:
        self.gpa = gpa
        self.size = size
        self.reason = reason
        super().__init__(f"guest-physical {gpa:#x}+{size:#x}: {reason}")


class PageFaultError(TranslationError):
    """A page walk ended without a mapping: not present, reserved bits, bad table."""

    def __init__(self, va: int, level: str, reason: str, *, entry: int | None = None,
                 entry_gpa: int | None = None) -> None:
        self.va = va
        self.level = level
        self.reason = reason
        self.entry = entry
        self.entry_gpa = entry_gpa
        detail = ""
        if entry is not None:
            detail = f" (entry {entry:#018x}"
            detail += f" at gpa {entry_gpa:#x})" if entry_gpa is not None else ")"
        super().__init__(f"virtual {va:#x}: {level}: {reason}{detail}")


class BackendError(KscanError):
    """A memory-backend file cannot be opened or mapped read-only."""

    def __init__(self, path: str, reason: str, *, hint: str = "") -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"memory backend {path}: {reason}", hint=hint)

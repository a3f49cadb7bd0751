"""What a check of `.text` patching returns (pure data): the sites verified as the
kernel's own patching, the ranges that are not, and the memory for the next check."""

from __future__ import annotations

from dataclasses import dataclass, field

from scanner.check.patch_state import PatchMemory
from scanner.check.patching.registry import MECHANISMS


@dataclass(frozen=True, slots=True)
class VerifiedPatch:
    """One site whose changed bytes are the kernel's own patching."""

    mechanism: str
    site: int            #: link-time VA of the site
    start: int           #: [start, end): link-time VAs of the site's bytes
    end: int
    before: bytes        #: baseline bytes of [start, end)
    after: bytes         #: live bytes of [start, end)
    form: str            #: which allowed encoding ("nop", "call ftrace_caller", ...)
    #: Branch target: link-time VA inside .text, run-time VA outside (None: no branch).
    target: int | None = None
    #: text_poke_bp() caught half-way (int3 first byte).
    in_progress: bool = False


@dataclass(frozen=True, slots=True)
class UnverifiedRange:
    """Changed bytes that no verifier explains: tampering."""

    start: int           #: link-time VA, [start, end)
    end: int
    before: bytes
    after: bytes
    reason: str


@dataclass(frozen=True)
class MechanismSummary:
    count: int
    sites: tuple[int, ...]        #: link-time VAs, sorted
    in_progress: int


@dataclass
class PatchVerdict:
    verified: list[VerifiedPatch] = field(default_factory=list)
    unverified: list[UnverifiedRange] = field(default_factory=list)
    changed_bytes: int = 0
    #: What the next check of this boot needs (`scanner.check.patch_state`).
    memory: PatchMemory = field(default_factory=PatchMemory)

    @property
    def clean(self) -> bool:
        """True when every changed byte is verified patching."""
        return not self.unverified

    def summary(self) -> dict[str, MechanismSummary]:
        """Per mechanism (only those seen): how many sites, which, how many in progress."""
        by: dict[str, list[VerifiedPatch]] = {}
        for v in self.verified:
            by.setdefault(v.mechanism, []).append(v)
        return {m: MechanismSummary(len(by[m]), tuple(sorted(v.site for v in by[m])),
                                    sum(v.in_progress for v in by[m]))
                for m in MECHANISMS if m in by}


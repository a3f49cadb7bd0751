"""What the patch verifiers carry from one check of a boot to the next (pure data).

Some of the kernel's own patching is only the kernel's when seen over time:

* runtime constants (6.11+) are written once, at boot: their values are pinned at the
  first check of a boot, and every later check must see the same;
* jump-label sites whose `struct static_key` lies in data that is read-only after boot
  (`__ro_after_init`) cannot change once the kernel has booted: their bytes are pinned
  at the first check of a boot;
* text_poke_bp()'s half-states (an `int3` over a site, the rest old or new) last
  microseconds: the same half-state seen again a second later is not the kernel's.

`PatchMemory` holds these for one boot of one VM; `VmFacts` what a check knows of the
VM besides its memory. The verifier takes both and returns the memory for the next
check (`scanner.check.patching.verify_text_changes`); `scanner.check.state.VmState`
stores it, as plain JSON-able data, with the VM's other per-boot state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["HALF_STATE_MAX", "HALF_STATE_MOST", "PatchMemory", "VmFacts"]

#: A text_poke_bp() half-state seen again this many seconds (or more) after it was
#: first seen is tampering: the kernel completes one in well under a millisecond.
HALF_STATE_MAX = 1.0
#: ... provided the guest has run in between (a vCPU starved of a host core finishes
#: nothing; `scanner.vm.progress`); after this many seconds, whatever the host says.
HALF_STATE_MOST = 10.0


@dataclass(frozen=True)
class VmFacts:
    """What a check knows of the VM besides its memory (None: not known)."""

    #: vCPUs the VM has (lock prefixes are patched away only on one CPU).
    cpus: int | None = None
    #: 5-level paging (CR4.LA57): sets the largest user address (USER_PTR_MAX).
    la57: bool | None = None
    #: When the check read the VM (seconds; one clock for all checks of a boot).
    now: float | None = None


@dataclass(frozen=True)
class PatchMemory:
    """Per boot: pinned values and half-states seen (keys are link-time VAs in hex,
    or `t:`-prefixed run-time VAs for sites outside `.text`)."""

    #: The first check of the boot has been recorded.
    pinned: bool = False
    #: Runtime-constant variable → its value (pinned at the first check).
    runtime_const: dict[str, int] = field(default_factory=dict)
    #: Read-only-key jump-label sites that differed from the golden baseline at the first
    #: check → their bytes (hex) then; every other such site must keep its golden bytes.
    fixed_sites: dict[str, str] = field(default_factory=dict)
    #: Half-states seen at the last check → (bytes hex, when first seen).
    half: dict[str, tuple[str, float]] = field(default_factory=dict)

    def to_plain(self) -> dict[str, Any]:
        return {"pinned": self.pinned, "runtime_const": dict(self.runtime_const),
                "fixed_sites": dict(self.fixed_sites),
                "half": {k: [b, t] for k, (b, t) in self.half.items()}}

    @classmethod
    def from_plain(cls, d: Any) -> PatchMemory:
        """The memory stored as `d`; anything unreadable is no memory (the next check
        pins afresh)."""
        if not isinstance(d, dict):
            return cls()
        try:
            return cls(bool(d["pinned"]),
                       {str(k): int(v) for k, v in d["runtime_const"].items()},
                       {str(k): str(v) for k, v in d["fixed_sites"].items()},
                       {str(k): (str(v[0]), float(v[1])) for k, v in d["half"].items()})
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            return cls()

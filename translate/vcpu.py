"""The control state of one vCPU: what any hypervisor reports and verdicts need.

Hypervisor-neutral: QEMU's HMP parser (`scanner.qemu.hmp`) fills it in today, a replayed
VM reads it from a file, and `scanner.check` judges it without knowing where it came
from. It lives here, below both, so verdict code imports nothing of QEMU.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VcpuState"]


@dataclass(frozen=True)
class VcpuState:
    """The control state of one vCPU, as the hypervisor reports it."""

    index: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    idtr_base: int
    idtr_limit: int
    gdtr_base: int
    gdtr_limit: int
    rip: int
    cpl: int
    halted: bool

"""A VM's live kernel: which profile it runs, its slide, and where its protected
regions are right now.

`locate_kernel` identifies the profile (see `scanner.check.kaslr`), then translates the four
protected regions — `.text`, `.rodata`, `__ex_table` at their slid addresses and the
IDT at vCPU 0's IDTR — into physically contiguous runs, recording the page-table pages
each walk read, and decodes the IDT of every vCPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scanner.check.idt import Gate, IdtCheck, check_gates, decode_idt
from scanner.check.kaslr import SlideMatch, identify
from scanner.errors import VmStateError
from scanner.image.early_idt import EarlyStubs
from scanner.image.kernel_profile import PROTECTED_SECTIONS, KernelProfile
from translate import GuestMemory, PageWalker, Translation, TranslationError
from translate.vcpu import VcpuState

__all__ = ["REGIONS", "LiveKernel", "Region", "locate_kernel", "translate_regions"]

#: The four protected regions, in report order.
REGIONS = (*PROTECTED_SECTIONS, "idt")


@dataclass(frozen=True)
class Region:
    """A protected region as mapped in the guest now."""

    name: str
    va: int
    size: int
    translation: Translation

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        return self.translation.gpa_runs()

    def wx_violations(self) -> list[str]:
        """W^X: text must be read-only and executable; data read-only and no-execute."""
        out = []
        for r in self.translation.runs:
            if r.writable:
                out.append(f"{self.name} va {r.va:#x}+{r.size:#x} is writable")
            if self.name == ".text" and r.nx:
                out.append(f"{self.name} va {r.va:#x}+{r.size:#x} is not executable")
            if self.name != ".text" and not r.nx:
                out.append(f"{self.name} va {r.va:#x}+{r.size:#x} is executable")
        return out


@dataclass(frozen=True)
class LiveKernel:
    profile: KernelProfile
    match: SlideMatch
    regions: dict[str, Region]
    gates: tuple[Gate, ...]
    idt_check: IdtCheck
    idtr_shared: bool  # all vCPUs have the same IDTR

    @property
    def slide(self) -> int:
        return self.match.slide

    def link_va(self, region: str, offset: int) -> int:
        """The link-time address of a region offset (for symbolizing)."""
        return self.profile.section(region).addr + offset


def translate_regions(walker: PageWalker, profile: KernelProfile, slide: int,
                      vcpu: VcpuState) -> dict[str, Region]:
    """Translate the four protected regions; raises TranslationError if one is unmapped."""
    out: dict[str, Region] = {}
    for name in PROTECTED_SECTIONS:
        s = profile.section(name)
        t = walker.translate_range(s.addr + slide, s.size)
        out[name] = Region(name, s.addr + slide, s.size, t)
    size = min(vcpu.idtr_limit + 1, 4096)
    out["idt"] = Region("idt", vcpu.idtr_base, size,
                        walker.translate_range(vcpu.idtr_base, size))
    return out


def read_idt(mem: GuestMemory, region: Region, limit: int) -> list[Gate]:
    data = b"".join(bytes(mem.view(g, n)) for g, n in region.runs)
    return decode_idt(data, limit)


def locate_kernel(mem: GuestMemory, walker: PageWalker, vcpus: Sequence[VcpuState],
                  profiles: Iterable[KernelProfile], *, vm: str = "vm") -> LiveKernel:
    v0 = vcpus[0]
    try:
        idt_t = walker.translate_range(v0.idtr_base, min(v0.idtr_limit + 1, 4096))
    except TranslationError as err:
        raise VmStateError(f"IDT at {v0.idtr_base:#x} is not mapped: {err}", vm=vm,
                           hint="has the guest kernel finished booting?") from err
    hints = [g.handler for g in read_idt(mem, Region("idt", v0.idtr_base, 0, idt_t),
                                         v0.idtr_limit) if g.present][:16]
    found = identify(mem, walker, profiles, hints, vm=vm)
    profile, match = found.profile, found.match
    regions = translate_regions(walker, profile, match.slide, v0)
    gates = read_idt(mem, regions["idt"], v0.idtr_limit)
    text = profile.text
    init = profile.sections.get(".init.text")
    stubs = EarlyStubs(*profile.early_idt).slid(match.slide) if profile.early_idt else None
    check = check_gates(gates, (text.addr + match.slide, text.end + match.slide),
                        (init.addr + match.slide, init.end + match.slide) if init else None,
                        stubs)
    shared = len({(v.idtr_base, v.idtr_limit) for v in vcpus}) == 1
    return LiveKernel(profile, match, regions, tuple(gates), check, shared)

"""`kscan inspect`: what kscan sees of one VM, for operators and for debugging.

Memory layout (GPA → backend file and offset), each vCPU's control registers, and the
translation of the IDT page (VA → GPA, page size, permissions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from scanner.hmp import VcpuState
from scanner.vm import AttachedVm
from translate import RamRange, Run, TranslationError
from translate.paging import CR0_WP, CR4_LA57

__all__ = ["InspectReport", "inspect_vm"]

CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21


@dataclass
class InspectReport:
    name: str
    status: str
    socket: str
    memory: list[RamRange]
    vcpus: list[VcpuState]
    idt_va: int
    idt_size: int
    idt_runs: list[Run]
    idt_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        idt: dict[str, Any] = {"va": self.idt_va, "size": self.idt_size}
        if self.idt_runs:
            idt["gpa"] = self.idt_runs[0].gpa
            idt["page_size"] = self.idt_runs[0].page_size
            idt["perms"] = self.idt_runs[0].perms
            idt["runs"] = [{"va": r.va, "gpa": r.gpa, "size": r.size,
                            "page_size": r.page_size, "perms": r.perms} for r in self.idt_runs]
        else:
            idt["gpa"] = None
            idt["error"] = self.idt_error
        out = {
            "name": self.name,
            "status": self.status,
            "qmp": self.socket,
            "memory": [{"gpa": r.gpa, "size": r.size, "file": r.path, "offset": r.offset}
                       for r in self.memory],
            "vcpus": [{"index": v.index, "cr0": v.cr0, "cr3": v.cr3, "cr4": v.cr4,
                       "efer": v.efer, "idtr_base": v.idtr_base, "idtr_limit": v.idtr_limit,
                       "gdtr_base": v.gdtr_base, "gdtr_limit": v.gdtr_limit}
                      for v in self.vcpus],
            "idt": idt,
        }
        out.update(self.extra)
        return out

    def to_text(self) -> str:
        lines = [f"VM {self.name} ({self.status})  QMP {self.socket}", "memory:"]
        for r in self.memory:
            lines.append(f"  gpa {r.gpa:#014x}-{r.end - 1:#014x} {r.size >> 20:>6} MiB  "
                         f"{r.path} @ {r.offset:#x}")
        lines.append("vCPUs:")
        for v in self.vcpus:
            flags = []
            flags.append("5-level" if v.cr4 & CR4_LA57 else "4-level")
            flags.append("WP" if v.cr0 & CR0_WP else "no-WP!")
            flags.append("SMEP" if v.cr4 & CR4_SMEP else "no-SMEP")
            flags.append("SMAP" if v.cr4 & CR4_SMAP else "no-SMAP")
            lines.append(
                f"  #{v.index} CR0={v.cr0:#x} CR3={v.cr3:#x} CR4={v.cr4:#x} EFER={v.efer:#x} "
                f"IDTR={v.idtr_base:#x}/{v.idtr_limit:#x} GDTR={v.gdtr_base:#x}/"
                f"{v.gdtr_limit:#x}  [{' '.join(flags)}]")
        lines.append("IDT:")
        if self.idt_runs:
            for r in self.idt_runs:
                lines.append(f"  va {r.va:#x} -> gpa {r.gpa:#x}  {r.size:#x} bytes in "
                             f"{r.page_size >> 10} KiB pages  {r.perms}")
        else:
            lines.append(f"  va {self.idt_va:#x}: not translated: {self.idt_error}")
        for key, val in self.extra.items():
            if isinstance(val, str | int):
                lines.append(f"{key}: {val}")
        return "\n".join(lines)


async def inspect_vm(socket: str | os.PathLike[str], db: str | None = None) -> InspectReport:
    async with await AttachedVm.attach(socket) as vm:
        status = (await vm.run_state()).status
        v0 = vm.vcpus[0]
        size = v0.idtr_limit + 1
        runs: list[Run] = []
        err = None
        try:
            runs = list(vm.walker(0).translate_range(v0.idtr_base, size).runs)
        except TranslationError as e:
            err = str(e)
        return InspectReport(vm.name, status, vm.qmp.socket, vm.layout, vm.vcpus,
                             v0.idtr_base, size, runs, err)

"""`kscan inspect`: what kscan sees of one VM, for operators and for debugging.

Memory layout (GPA → backend file and offset), each vCPU's control registers, the
translation of the IDT page (VA → GPA, page size, permissions) and, when a database
with kernel profiles is at hand, the kernel: version, build id, KASLR slide, and each
protected region's VA, GPA runs, size and permissions, with the IDT gate check, and the
guest's loaded modules as its own module list has them (scanner.check.kernel_lists).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from scanner.check.kernel_lists import modules_off, read_guest_modules, walker_reader
from scanner.check.locate import LiveKernel, locate_kernel
from scanner.errors import ProfileError, VmStateError
from scanner.image.kernel_profile import KernelProfile
from scanner.vm import AttachedVm, SourceKind, VmSource
from translate import PageWalker, RamRange, Run, TranslationError
from translate.vcpu import VcpuState
from translate.x86 import CR0_WP, CR4_LA57, CR4_SMAP, CR4_SMEP

__all__ = ["InspectReport", "inspect_vm"]



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
            for run in self.idt_runs:
                lines.append(f"  va {run.va:#x} -> gpa {run.gpa:#x}  {run.size:#x} bytes in "
                             f"{run.page_size >> 10} KiB pages  {run.perms}")
        else:
            lines.append(f"  va {self.idt_va:#x}: not translated: {self.idt_error}")
        k = self.extra.get("kernel")
        if k is not None:
            lines.extend(kernel_text(k) if "error" not in k else [f"kernel: {k['error']}"])
        m = self.extra.get("modules")
        if m is not None:
            lines.extend(modules_text(m))
        return "\n".join(lines)


async def _profiles_of(db: str) -> list[KernelProfile]:
    from scanner.examine import load_profiles
    from store import Store

    async with Store.open(db) as st:
        return await load_profiles(st, required=False)


def kernel_section(lk: LiveKernel) -> dict[str, Any]:
    """The `kernel` object of inspect's JSON."""
    regions = []
    for r in lk.regions.values():
        regions.append({
            "name": r.name, "va": r.va, "size": r.size,
            "runs": [{"va": x.va, "gpa": x.gpa, "size": x.size, "page_size": x.page_size,
                      "perms": x.perms} for x in r.translation.runs],
            "wx_violations": r.wx_violations(),
        })
    c = lk.idt_check
    return {
        "version": lk.profile.version, "release": lk.profile.release,
        "build_id": lk.profile.build_id, "guest_build_id": lk.match.build_id,
        "slide": lk.slide, "regions": regions,
        "idt": {"gates": c.gates, "present": c.present, "ok": c.ok,
                "outside_text": [{"vector": g.vector, "handler": g.handler}
                                 for g in c.outside_text],
                "early_handlers": [g.vector for g in c.early_handlers],
                "shared_by_all_vcpus": lk.idtr_shared},
    }


def kernel_text(k: dict[str, Any]) -> list[str]:
    lines = [f"kernel: {k['version']}", f"  build id {k['build_id']}  slide {k['slide']:#x}"]
    for r in k["regions"]:
        lines.append(f"  {r['name']:<11} va {r['va']:#x} size {r['size']:#x}")
        for x in r["runs"]:
            lines.append(f"      gpa {x['gpa']:#x}+{x['size']:#x}  {x['page_size'] >> 10} KiB "
                         f"pages  {x['perms']}")
        for v in r["wx_violations"]:
            lines.append(f"      W^X VIOLATION: {v}")
    idt = k["idt"]
    lines.append(f"  IDT gates: {idt['gates']} ({idt['present']} present), handlers "
                 + ("all in kernel text" if idt["ok"] else
                    f"OUTSIDE text: {[hex(g['handler']) for g in idt['outside_text']]}")
                 + (f"; vectors {idt['early_handlers']} still on boot-time early handlers"
                    if idt["early_handlers"] else "")
                 + ("" if idt["shared_by_all_vcpus"] else "; vCPUs DISAGREE on the IDTR"))
    return lines


def modules_section(lk: LiveKernel, walker: PageWalker) -> dict[str, Any]:
    """The `modules` object of inspect's JSON: the guest's module list, or why not."""
    off = modules_off(lk.profile)
    if off is not None:
        return {"off": off}
    return read_guest_modules(lk.profile, lk.slide, walker_reader(walker)).to_json()


def modules_text(m: dict[str, Any]) -> list[str]:
    if "off" in m:
        return [f"modules: off: {m['off']}"]
    mods = m["modules"]
    lines = [f"modules: {len(mods)} in the kernel's module list"
             + ("" if m["complete"] else " (INCOMPLETE: " + "; ".join(m["problems"]) + ")")]
    for mod in mods:
        sig = {True: "signed", False: "UNSIGNED", None: "no-sig-check"}[mod["sig_ok"]]
        text = [a for a in mod["memory"] if a["kind"] == "text"]
        where = (f"text {text[0]['base']:#x}+{text[0]['size']:#x}" if text else "no text")
        lines.append(f"  {mod['name']:<24} {mod['state']:<8} {sig:<12} "
                     f"taint {mod['taint'] or '-':<4} {where}")
    if m["complete"] and m["problems"]:
        lines.extend(f"  note: {p}" for p in m["problems"])
    if m.get("unexplained_taint"):
        lines.append(f"  kernel taint {m['kernel_taint']}: {m['unexplained_taint']} is "
                     "carried by no listed module (one left the list, was unloaded, or "
                     "rewrote its own record)")
    return lines


async def inspect_vm(socket: str | os.PathLike[str] | VmSource,
                     db: str | None = None) -> InspectReport:
    """Inspect a VM by QMP socket, or a `VmSource` (a libvirt domain)."""
    profiles = await _profiles_of(db) if db is not None else None
    if isinstance(socket, VmSource) and socket.kind is SourceKind.LIBVIRT:
        from scanner.vm.domain import attach_domain

        attached = await attach_domain(socket.path, socket.connect or "qemu:///system")
    else:
        attached = await AttachedVm.attach(str(socket))
    async with attached as vm:
        status = (await vm.run_state()).status
        v0 = vm.vcpus[0]
        size = v0.idtr_limit + 1
        runs: list[Run] = []
        err = None
        try:
            walker = vm.walker(0)
            runs = list(walker.translate_range(v0.idtr_base, size).runs)
        except TranslationError as e:
            err = str(e)
        report = InspectReport(vm.name, status, vm.qmp.socket, vm.layout, vm.vcpus,
                               v0.idtr_base, size, runs, err)
        if profiles is not None:
            try:
                walker = vm.walker(0)
                lk = locate_kernel(vm.mem, walker, vm.vcpus, profiles, vm=vm.name)
                report.extra["kernel"] = kernel_section(lk)
                report.extra["modules"] = modules_section(lk, walker)
            except (ProfileError, VmStateError, TranslationError) as e:
                report.extra["kernel"] = {"error": str(e),
                                          "version": getattr(e, "version", None)}
        return report

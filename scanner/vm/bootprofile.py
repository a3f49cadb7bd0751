"""The boot profile: what, besides the kernel build, changes boot-time code patching.

The kernel rewrites its own `.text` at boot (alternatives, paravirt, static calls, jump
labels, SMP lock prefixes) according to the CPU it finds. Two VMs of one kernel have
identical normalized text, up to verified patch sites, only if they booted on the same
CPU model and features, so golden baselines are keyed on
(kernel build id, boot profile) where the boot profile is:

* the QEMU CPU model (QOM type of vCPU 0, e.g. `qemu64-x86_64-cpu`),
* a hash of the CPUID feature words QEMU exposes to the guest (`feature-words`),
* not the vCPU count: 1 vs many changes SMP lock-prefix patching and a few jump
  labels (measured: 2 and 4 vCPUs give identical `.text`), which the patch verifiers
  check site by site (`scanner.check.patching`: `smp_lock`, `jump_label`);
* whether page-table isolation is on (`pti=on`, or a Meltdown-affected CPU): it is
  read from the guest's own page tables — with PTI the user half of the kernel's 8 KiB
  PGD pair shares the cpu_entry_area entry; without it that half is empty.

Not covered (documented limitation): other kernel command-line options that change
patching (`mitigations=`, `spectre_v2=`, ...); VMs of one boot profile should share
them. A check that finds much of `.text` changed says so in its hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

from scanner.qemu.qmp import QmpVm
from translate import GuestMemory, TranslationError

__all__ = ["BootProfile", "pti_active", "read_boot_profile"]

_SMEP_BIT, _SMAP_BIT = 7, 20  # CPUID.(EAX=7,ECX=0):EBX


@dataclass(frozen=True)
class BootProfile:
    cpu_model: str
    features: str  # hex hash of the feature words
    vcpus: int
    smep: bool  # the virtual CPU offers SMEP / SMAP (so the kernel should enable them)
    smap: bool
    pti: bool = False  # page-table isolation on (observed in guest memory, see pti_active)

    @property
    def key(self) -> str:
        """What golden baselines are keyed on (with the kernel build). Not the vCPU
        count: the boot-time patching it changes (SMP lock prefixes, a few jump labels)
        is verified as the kernel's own patching, so one baseline serves every size."""
        return f"{self.cpu_model}/{self.features}" + ("/pti" if self.pti else "")

    @property
    def legacy_key(self) -> str:
        """The key kscan 0.1 stored baselines under (with the exact vCPU count)."""
        return f"{self.cpu_model}/{self.vcpus}vcpu/{self.features}" + ("/pti" if self.pti
                                                                       else "")

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "cpu_model": self.cpu_model, "features": self.features,
                "vcpus": self.vcpus, "smep": self.smep, "smap": self.smap, "pti": self.pti}


def pti_active(mem: GuestMemory, kernel_pgd: int, top_shift: int) -> bool:
    """Is page-table isolation on? With PTI, the user PGD (the odd page of the 8 KiB
    pair) maps the cpu_entry_area through the very same top-level entry as the kernel
    PGD; without it, that page is unused and empty."""
    if kernel_pgd & 0x1FFF:
        return False
    index = (0xFFFF_FE00_0000_0000 >> top_shift) & 0x1FF
    try:
        kern = mem.view(kernel_pgd, 4096).cast("Q")
        user = mem.view(kernel_pgd + 0x1000, 4096).cast("Q")
    except TranslationError:
        return False
    return bool(kern[index] & 1) and user[index] == kern[index]


def _leaf7_ebx(words: list[Any]) -> int:
    for w in words:
        if (isinstance(w, dict) and w.get("cpuid-input-eax") == 7
                and w.get("cpuid-input-ecx", 0) == 0 and w.get("cpuid-register") == "EBX"):
            f = w.get("features")
            return f if isinstance(f, int) else 0
    return 0


def boot_profile_from(model: str, words: list[Any], vcpus: int) -> BootProfile:
    canon = sorted(orjson.dumps(w, option=orjson.OPT_SORT_KEYS) for w in words)
    features = xxhash.xxh3_64_hexdigest(b"\n".join(canon))
    ebx = _leaf7_ebx(words)
    return BootProfile(model, features, vcpus, bool(ebx >> _SMEP_BIT & 1),
                       bool(ebx >> _SMAP_BIT & 1))


async def read_boot_profile(qmp: QmpVm, vcpus: int) -> BootProfile:
    model, words = await qmp.cpu_model()
    return boot_profile_from(model, words, vcpus)

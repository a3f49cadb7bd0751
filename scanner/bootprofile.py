"""The boot profile: what, besides the kernel build, changes boot-time code patching.

The kernel rewrites its own `.text` at boot (alternatives, paravirt, static calls, jump
labels, SMP lock prefixes) according to the CPU it finds. Two VMs of one kernel have
identical normalized text only if they booted on the same CPU model and features and
with the same number of vCPUs, so golden baselines are keyed on
(kernel build id, boot profile) where the boot profile is:

* the QEMU CPU model (QOM type of vCPU 0, e.g. `qemu64-x86_64-cpu`),
* a hash of the CPUID feature words QEMU exposes to the guest (`feature-words`),
* the vCPU count — exact, to be safe: 1 vs many changes SMP lock-prefix patching,
  and per-CPU static keys may depend on more.

Not covered (documented limitation): the kernel command line, which can also change
patching (`pti=`, `mitigations=`); VMs of one boot profile should share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

from scanner.qmp import QmpVm

__all__ = ["BootProfile", "read_boot_profile"]

_SMEP_BIT, _SMAP_BIT = 7, 20  # CPUID.(EAX=7,ECX=0):EBX


@dataclass(frozen=True)
class BootProfile:
    cpu_model: str
    features: str  # hex hash of the feature words
    vcpus: int
    smep: bool  # the virtual CPU offers SMEP / SMAP (so the kernel should enable them)
    smap: bool

    @property
    def key(self) -> str:
        return f"{self.cpu_model}/{self.vcpus}vcpu/{self.features}"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "cpu_model": self.cpu_model, "features": self.features,
                "vcpus": self.vcpus, "smep": self.smep, "smap": self.smap}


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

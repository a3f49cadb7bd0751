"""`kscan check --core FILE`: the verdict of a live check, on a memory image.

The image (an ELF core from QEMU's `dump-guest-memory`, `scanner.vm.core`) is examined
by exactly the code that examines a live VM. Two things differ:

* The boot profile. A core holds neither QEMU's CPU model nor its CPUID features, so
  the golden baseline of the kernel's build id is chosen by `--boot-profile KEY` (as
  `kscan baseline` and `kscan check` print it), or else it is the only golden baseline
  stored for that build with the page-table isolation seen in the image; with several,
  the check refuses and lists their keys.
* Nothing is recorded for the VM. The per-VM state named by `--vm NAME` (default: the
  file's name) is read — so a core of a watched VM is compared with that VM's per-boot
  and accepted pages, as its live check is — but never written: an image must not
  become a running VM's baseline. The check is logged as a `check` event with `core`.
"""

from __future__ import annotations

import dataclasses
import os

from scanner.check.verify import CheckReport
from scanner.errors import BaselineMissing, VmStateError
from scanner.examine import Examined, examine, load_profiles, verify_examined
from scanner.examine.keying import keyed_store
from scanner.vm import BootProfile, CoreVm
from store import Store

__all__ = ["check_core", "core_boot_profile"]


def _split_key(key: str) -> tuple[str, str, bool] | None:
    """(cpu_model, features, pti) of a boot-profile key `MODEL/FEATURES[/pti]`; None for
    anything else (kscan 0.1's keys carry a vCPU count and are not offered)."""
    parts = key.split("/")
    pti = parts[-1] == "pti"
    if pti:
        parts.pop()
    if len(parts) != 2 or not all(parts) or parts[1].endswith("vcpu"):
        return None
    return parts[0], parts[1], pti


async def core_boot_profile(st: Store, ex: Examined, key: str | None) -> BootProfile:
    """The boot profile a core is checked as (see the module docstring)."""
    observed = ex.boot
    build = ex.lk.profile.build_id
    if key:
        split = _split_key(key)
        if split is None:
            raise VmStateError(f"--boot-profile {key!r} is not MODEL/FEATURES[/pti]",
                               vm=ex.vm, hint="use a key as kscan baseline printed it")
        model, features, pti = split
        if pti != observed.pti:
            raise VmStateError(
                f"--boot-profile {key} says page-table isolation is "
                f"{'on' if pti else 'off'}, the image's page tables say "
                f"{'on' if observed.pti else 'off'}", vm=ex.vm,
                hint="pick the key of a baseline of the same kind of boot")
        return dataclasses.replace(observed, cpu_model=model, features=features)
    found = []
    for g in await st.list_golden():
        split = _split_key(g.boot_profile) if g.build_id == build else None
        if split is not None and split[2] == observed.pti:
            found.append(split)
    if not found:
        raise BaselineMissing(
            f"no golden baseline for kernel {ex.lk.profile.release} ({build[:12]})"
            f"{' with page-table isolation' if observed.pti else ''}", vm=ex.vm,
            hint="baseline a verified VM of that kernel first: kscan baseline --qmp SOCKET")
    if len(found) > 1:
        keys = ", ".join(sorted(f"{m}/{f}" + ("/pti" if p else "") for m, f, p in found))
        raise VmStateError(
            f"{len(found)} golden baselines fit kernel {build[:12]} and an image does not "
            f"say which CPU the VM had: {keys}", vm=ex.vm,
            hint="name one with --boot-profile KEY")
    model, features, _ = found[0]
    return dataclasses.replace(observed, cpu_model=model, features=features)


async def check_core(path: str | os.PathLike[str], db: str | None, *, vm: str | None = None,
                     boot_profile: str | None = None, strict: bool = False,
                     trusted_modules: frozenset[str] = frozenset()) -> CheckReport:
    """Check a memory image against the baselines; records only a `check` event."""
    async with await CoreVm.open(path, vm) as cvm, keyed_store(db) as st:
        ex = await examine(cvm, await load_profiles(st))
        ex = dataclasses.replace(ex, boot=await core_boot_profile(st, ex, boot_profile))
        report = (await verify_examined(st, ex, cvm.name, mem=cvm.mem, strict=strict,
                                        trusted_modules=trusted_modules)).report
        await st.append_event({"ts": report.ts, "event": "check", "vm": cvm.name,
                               "core": os.fspath(path), **report.to_json()})
        return report

"""check: pure verdict logic — guest memory, registers and profiles in, verdicts out.

No QMP, no database. Locate the kernel and its KASLR slide (`kaslr`, `locate`), decode
the IDT (`idt`), read regions zero-copy or as a normalized copy (`measure`, `normalize`),
prove nothing changed cheaply (`fastpath`), build golden baselines (`baseline`), compare
page by page (`verify`) with per-VM state (`state`), resume a VM after a restart from
its persisted fast-pass state with one fast pass (`resume`), tell the kernel's own code patching
from tampering (`patching`), say who made each run-time patch (`attribution`, with the
owner of an address — kernel, module, BPF program or nobody — from `owners`) and name
what kind of site changed (`classify`).
"""

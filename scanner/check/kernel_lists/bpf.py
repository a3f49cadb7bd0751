"""The JIT images of loaded BPF programs, from `bpf_kallsyms` (kernel/bpf/core.c).

`bpf_kallsyms` heads a list of `struct bpf_ksym` (linked through `lnode`): `start`,
`end` and `name` of each JIT image (programs, and also BPF trampolines and dispatchers).
A program's ksym is embedded in its `struct bpf_prog_aux` (`ksym`), whose `id` is the
program id `bpftool prog` shows; that id is read when `ksym.prog` says it is a program.

Hostile-safe: at most `MAX_PROGS` entries, cycle-checked, images over 16 MiB dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from scanner.check.kernel_lists.lists import walk_list
from scanner.check.kernel_lists.memory import (
    KernelReader,
    field_cstr,
    field_int,
    is_kernel_pointer,
)
from scanner.image.layouts import Layouts

__all__ = ["BpfProgram", "read_bpf_programs"]

MAX_PROGS = 4096
MAX_IMAGE = 16 << 20


@dataclass(frozen=True)
class BpfProgram:
    """A JIT image from `bpf_kallsyms`: [start, end) run-time addresses."""

    start: int
    end: int
    name: str
    id: int | None = None


def read_bpf_programs(mem: KernelReader, layouts: Layouts, head_va: int, *,
                      limit: int = MAX_PROGS) -> tuple[tuple[BpfProgram, ...], bool]:
    """The images on `bpf_kallsyms` (run-time address of the head); and whether the
    whole list was read."""
    ks = layouts.get("bpf_ksym")
    lh = layouts.get("list_head")
    if ks is None or lh is None or not all(f in ks for f in ("start", "end", "name",
                                                               "lnode")):
        return (), False
    walk = walk_list(mem, head_va, limit=limit, next_off=lh["next"].offset,
                     prev_off=lh["prev"].offset)
    aux = layouts.get("bpf_prog_aux")
    out: list[BpfProgram] = []
    for node in walk.nodes:
        at = node - ks["lnode"].offset
        buf = mem.struct(at, ks)
        if buf is None:
            continue
        start, end = field_int(buf, ks["start"]), field_int(buf, ks["end"])
        if not (is_kernel_pointer(start) and start < end <= start + MAX_IMAGE):
            continue
        pid = None
        isprog = ks.get("prog")
        if (aux is not None and "ksym" in aux and "id" in aux and isprog is not None
                and field_int(buf, isprog)):
            got = mem.u64(at - aux["ksym"].offset + aux["id"].offset)
            pid = None if got is None else got & 0xFFFFFFFF
        out.append(BpfProgram(start, end, field_cstr(buf, ks["name"]), pid))
    return tuple(out), walk.complete

"""The JIT images of loaded BPF programs, from `bpf_kallsyms` (kernel/bpf/core.c).

`bpf_kallsyms` heads a list of `struct bpf_ksym` (linked through `lnode`): `start`,
`end` and `name` of each JIT image (programs, and also BPF trampolines and dispatchers).
A program's ksym is embedded in its `struct bpf_prog_aux` (`ksym`), whose `id` is the
program id `bpftool prog` shows; that id is read when `ksym.prog` says it is a program.

Hostile-safe: at most `MAX_PROGS` entries (a caller may ask for more), cycle-checked,
images over 64 MiB dropped (and said so). One reader for patch attribution and
executable-memory accounting (`exec_owners`).
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
#: A BPF image larger than this is garbage (the JIT limits programs to 1M insns).
MAX_IMAGE = 64 << 20


@dataclass(frozen=True)
class BpfProgram:
    """A JIT image from `bpf_kallsyms`: [start, end) run-time addresses."""

    start: int
    end: int
    name: str
    id: int | None = None
    #: The `struct bpf_ksym` it was read from (0: not read from guest memory).
    ksym: int = 0


def read_bpf_programs(mem: KernelReader, layouts: Layouts, head_va: int, *,
                      limit: int = MAX_PROGS, problems: list[str] | None = None
                      ) -> tuple[tuple[BpfProgram, ...], bool]:
    """The images on `bpf_kallsyms` (run-time address of the head); and whether the
    whole list was read. What could not be read, or was dropped, goes to `problems`."""
    notes: list[str] = [] if problems is None else problems
    ks = layouts.get("bpf_ksym")
    lh = layouts.get("list_head")
    if ks is None or lh is None or not all(f in ks for f in ("start", "end", "name",
                                                               "lnode")):
        notes.append("no bpf_ksym layout: BPF images not read")
        return (), False
    walk = walk_list(mem, head_va, limit=limit, next_off=lh["next"].offset,
                     prev_off=lh["prev"].offset)
    if walk.problem:
        notes.append(f"bpf_kallsyms: {walk.problem}")
    complete = walk.complete
    aux = layouts.get("bpf_prog_aux")
    out: list[BpfProgram] = []
    for node in walk.nodes:
        at = node - ks["lnode"].offset
        buf = mem.struct(at, ks)
        if buf is None:
            notes.append(f"bpf_ksym {at:#x} cannot be read")
            complete = False
            continue
        start, end = field_int(buf, ks["start"]), field_int(buf, ks["end"])
        name = field_cstr(buf, ks["name"], 128)
        if not (is_kernel_pointer(start) and start < end <= start + MAX_IMAGE):
            notes.append(f"bpf_ksym {name or hex(at)}: image {start:#x}..{end:#x} is not "
                         "plausible")
            continue
        pid = None
        isprog = ks.get("prog")
        if (aux is not None and "ksym" in aux and "id" in aux and isprog is not None
                and field_int(buf, isprog)):
            got = mem.u64(at - aux["ksym"].offset + aux["id"].offset)
            pid = None if got is None else got & 0xFFFFFFFF
        out.append(BpfProgram(start, end, name, pid, at))
    return tuple(out), complete

"""The registered kprobes, from `kprobe_table` (kernel/kprobes.c).

`kprobe_table` is an array of `KPROBE_TABLE_SIZE` (64) `hlist_head`s; each chain links
`struct kprobe`s through their `hlist` member. Each kprobe has the probed `addr` and its
`pre_handler` / `post_handler`. When several probes share an address the table holds one
aggregate probe (`aggr_pre_handler`; an optprobe is always one, inside a
`struct optimized_kprobe`) whose `list` is the head of the probes it stands for: their
handlers are read too, so a module's handler is not hidden behind the kernel's
aggregate one.

Hostile-safe: at most `MAX_PROBES` probes over the table and `MAX_CHILDREN` per
aggregate, cycles detected, and an unreadable chain makes the reading incomplete.
"""

from __future__ import annotations

from dataclasses import dataclass

from scanner.check.kernel_lists.lists import walk_list
from scanner.check.kernel_lists.memory import KernelReader, field_int, is_kernel_pointer
from scanner.image.layouts import Layouts

__all__ = ["Kprobe", "KprobeTable", "kprobes_off", "read_kprobes"]

TABLE_SIZE = 64
MAX_PROBES = 4096
MAX_CHILDREN = 64


@dataclass(frozen=True)
class Kprobe:
    address: int          #: of the struct kprobe
    addr: int             #: the probed address
    pre_handler: int
    post_handler: int
    #: An aggregate probe's members (their own handlers).
    children: tuple[Kprobe, ...] = ()

    def handlers(self) -> tuple[tuple[int, int], ...]:
        """(struct kprobe, handler) of every non-null handler, members included."""
        out = [(self.address, h) for h in (self.pre_handler, self.post_handler) if h]
        for c in self.children:
            out += c.handlers()
        return tuple(out)


@dataclass(frozen=True)
class KprobeTable:
    probes: tuple[Kprobe, ...]
    complete: bool
    problems: tuple[str, ...] = ()

    def at(self, addr: int) -> tuple[Kprobe, ...]:
        return tuple(p for p in self.probes if p.addr == addr)


def kprobes_off(layouts: Layouts | None) -> str | None:
    if layouts is None:
        return "no struct layouts"
    kp = layouts.get("kprobe")
    if kp is None or not all(f in kp for f in ("hlist", "list", "addr", "pre_handler",
                                                 "post_handler")):
        return "the kernel's BTF lacks struct kprobe (hlist, list, addr, handlers)"
    if "hlist_node" not in layouts or "list_head" not in layouts:
        return "the kernel's BTF lacks hlist_node / list_head"
    return None


def _probe(mem: KernelReader, layouts: Layouts, at: int) -> Kprobe | None:
    kp = layouts["kprobe"]
    buf = mem.struct(at, kp)
    if buf is None:
        return None
    return Kprobe(at, field_int(buf, kp["addr"]), field_int(buf, kp["pre_handler"]),
                  field_int(buf, kp["post_handler"]))


def read_kprobes(mem: KernelReader, layouts: Layouts, table_va: int, *,
                 size: int = TABLE_SIZE, limit: int = MAX_PROBES) -> KprobeTable:
    kp = layouts["kprobe"]
    hl, lo = kp["hlist"].offset, kp["list"].offset
    node_next = layouts["hlist_node"]["next"].offset
    lh = layouts["list_head"]
    heads = mem.read(table_va, 8 * size)
    if heads is None:
        return KprobeTable((), False, ("kprobe_table cannot be read",))
    out: list[Kprobe] = []
    problems: list[str] = []
    seen: set[int] = set()
    for i in range(size):
        node = int.from_bytes(heads[8 * i:8 * i + 8], "little")
        while node:
            if len(seen) >= limit:
                problems.append(f"kprobe_table: more than {limit} probes")
                return KprobeTable(tuple(out), False, tuple(problems))
            if node in seen or not is_kernel_pointer(node):
                problems.append(f"kprobe_table[{i}]: bad node {node:#x}")
                break
            seen.add(node)
            p = _probe(mem, layouts, node - hl)
            nxt = mem.u64(node + node_next)
            if p is None or nxt is None:
                problems.append(f"kprobe_table[{i}]: kprobe at {node - hl:#x} unreadable")
                break
            # An aggregate's `list` heads its members; a plain probe's is empty.
            walk = walk_list(mem, p.address + lo, limit=MAX_CHILDREN,
                             next_off=lh["next"].offset, prev_off=lh["prev"].offset)
            kids = [c for c in (_probe(mem, layouts, n - lo) for n in walk.nodes)
                    if c is not None]
            if not walk.complete or len(kids) != len(walk.nodes):
                problems.append(f"kprobe at {p.address:#x}: member list "
                                f"{walk.problem or 'unreadable'}")
            out.append(Kprobe(p.address, p.addr, p.pre_handler, p.post_handler,
                              tuple(kids)))
            node = nxt
    return KprobeTable(tuple(out), not problems, tuple(problems))

"""The registered ftrace callbacks, from `ftrace_ops_list` (kernel/trace/ftrace.c).

`ftrace_ops_list` points at the first `struct ftrace_ops`; each `next` points at the
following one, and the list ends at the sentinel `ftrace_list_end`. For each ops: its
callback `func` (`saved_func` when `func` is one of ftrace's own wrappers), `flags`
(FTRACE_OPS_FL_*: IPMODIFY means the callback may redirect execution), the trampoline
the kernel allocated for it (`trampoline`, `trampoline_size`) and the functions it
traces: `func_hash->filter_hash` (an empty hash: every function) minus
`func_hash->notrace_hash`. A `struct ftrace_hash` is `size_bits`, `buckets` (an array
of `1 << size_bits` hlist heads) and `count`; each entry a `ftrace_func_entry`
{hlist, ip}.

`direct_functions` (6.1, 6.12) is one more such hash whose entries also carry `direct`:
the address an ftrace site of that ip calls directly (a BPF trampoline, or a module's
own trampoline registered with `register_ftrace_direct*`). `read_direct_calls` reads it.

Hostile-safe: at most `MAX_OPS` ops, `MAX_BITS` bits of buckets, `MAX_ENTRIES`
entries over all hashes, cycles detected; a list or hash that cannot be read in full
says so (`complete`), never guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

from scanner.check.kernel_lists.lists import walk_chain
from scanner.check.kernel_lists.memory import KernelReader, field_int, is_kernel_pointer
from scanner.image.layouts import Layouts

__all__ = ["NO_DIRECT_ENTRY", "DirectCalls", "FtraceHash", "FtraceOps", "OpsList", "direct_off",
           "ftrace_off",
           "read_direct_calls", "read_ftrace_ops"]

MAX_OPS = 256
MAX_BITS = 16
MAX_ENTRIES = 1 << 18


@dataclass(frozen=True)
class FtraceHash:
    """The ips of one hash; `ips` is None when the hash is empty (every function)."""

    ips: frozenset[int] | None
    complete: bool = True

    def has(self, ip: int) -> bool:
        return self.ips is not None and ip in self.ips


ALL = FtraceHash(None)


@dataclass(frozen=True)
class FtraceOps:
    address: int
    func: int
    flags: int
    trampoline: int
    trampoline_size: int
    filter: FtraceHash
    notrace: FtraceHash
    saved_func: int = 0
    #: 6.5+: the direct-call target of a direct ops (`direct_call`; 0: none or 6.1).
    direct_call: int = 0

    def covers(self, ip: int) -> bool:
        """Whether this ops traces the function at `ip` (ftrace_ops_test). A filter
        that could not be read in full is taken to cover every function: its callback
        is then attributed to more sites, never hidden from one."""
        return ((self.filter.ips is None or not self.filter.complete or ip in self.filter.ips)
                and not (self.notrace.complete and self.notrace.has(ip)))


@dataclass(frozen=True)
class OpsList:
    ops: tuple[FtraceOps, ...]
    complete: bool
    problems: tuple[str, ...] = ()

    def by_address(self, addr: int) -> FtraceOps | None:
        return next((o for o in self.ops if o.address == addr), None)


def ftrace_off(layouts: Layouts | None) -> str | None:
    """Why ftrace ops cannot be read with these layouts (None: they can)."""
    if layouts is None:
        return "no struct layouts"
    need = {"ftrace_ops": ("func", "next", "flags", "func_hash"),
            "ftrace_ops_hash": ("filter_hash", "notrace_hash"),
            "ftrace_hash": ("size_bits", "buckets", "count"),
            "ftrace_func_entry": ("hlist", "ip"), "hlist_node": ("next",)}
    for s, fs in need.items():
        lay = layouts.get(s)
        if lay is None or not all(f in lay for f in fs):
            return f"the kernel's BTF lacks struct {s} ({', '.join(fs)})"
    return None


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_ENTRIES


def _hash_entries(mem: KernelReader, layouts: Layouts, va: int, budget: _Budget,
                  value: str | None = None) -> tuple[dict[int, int] | None, bool]:
    """The entries of the `struct ftrace_hash` at `va`: ip → the entry's `value` field
    (0 without one); None for an empty hash. And whether it was read in full."""
    if va == 0:
        return None, True
    h = layouts["ftrace_hash"]
    buf = mem.struct(va, h) if is_kernel_pointer(va) else None
    if buf is None:
        return {}, False
    bits = field_int(buf, h["size_bits"])
    count = field_int(buf, h["count"])
    buckets = field_int(buf, h["buckets"])
    if count == 0:
        return None, True
    if bits > MAX_BITS or not is_kernel_pointer(buckets):
        return {}, False
    heads = mem.read(buckets, 8 << bits)
    if heads is None:
        return {}, False
    e = layouts["ftrace_func_entry"]
    node_next = layouts["hlist_node"]["next"].offset
    hl, ip_off = e["hlist"].offset, e["ip"].offset
    val_off = e[value].offset if value is not None else None
    out: dict[int, int] = {}
    complete = True
    for i in range(1 << bits):
        node = int.from_bytes(heads[8 * i:8 * i + 8], "little")
        seen: set[int] = set()
        while node:
            if budget.left <= 0 or node in seen or not is_kernel_pointer(node):
                complete = False
                break
            budget.left -= 1
            seen.add(node)
            ip = mem.u64(node - hl + ip_off)
            val = mem.u64(node - hl + val_off) if val_off is not None else 0
            nxt = mem.u64(node + node_next)
            if ip is None or nxt is None or val is None:
                complete = False
                break
            if ip in out and out[ip] != val:
                complete = False     # one ip twice with two values: which one is used?
            out[ip] = val
            node = nxt
    if len(out) != count:
        complete = False
    return out, complete


def _read_hash(mem: KernelReader, layouts: Layouts, va: int, budget: _Budget) -> FtraceHash:
    got, complete = _hash_entries(mem, layouts, va, budget)
    return ALL if got is None else FtraceHash(frozenset(got), complete)


#: What `DirectCalls.lookup` says of an ip a complete hash has no entry for.
NO_DIRECT_ENTRY = "direct_functions has no entry for this function"


@dataclass(frozen=True)
class DirectCalls:
    """`direct_functions`: the ftrace direct calls (BPF trampolines, modules' direct
    trampolines), ip of the traced function → the address its site calls."""

    targets: dict[int, int]
    complete: bool
    problem: str = ""

    def lookup(self, ip: int) -> tuple[int | None, str]:
        """The direct-call target the kernel's bookkeeping names for `ip`, or None and
        why not."""
        got = self.targets.get(ip)
        if got is not None:
            return got, ""
        if not self.complete:
            return None, f"direct_functions cannot be read in full ({self.problem})"
        return None, NO_DIRECT_ENTRY


def direct_off(layouts: Layouts | None) -> str | None:
    """Why `direct_functions` cannot be read with these layouts (None: it can)."""
    why = ftrace_off(layouts)
    if why:
        return why
    assert layouts is not None
    if "direct" not in layouts["ftrace_func_entry"]:
        return "the kernel's BTF has no ftrace_func_entry.direct (no direct calls)"
    return None


def read_direct_calls(mem: KernelReader, layouts: Layouts, var_va: int) -> DirectCalls:
    """The hash the pointer variable at `var_va` (`direct_functions`, kernel/trace/
    ftrace.c, 6.1 and 6.12: `struct ftrace_hash *`) points to; `direct_off` must be None.
    Bounded as the ops' hashes (MAX_BITS, MAX_ENTRIES, cycle checks)."""
    va = mem.u64(var_va)
    if va is None or not is_kernel_pointer(va):
        return DirectCalls({}, False, "direct_functions: " + (
            "unreadable" if va is None else f"pointer {va:#x} is not a kernel address"))
    got, complete = _hash_entries(mem, layouts, va, _Budget(), "direct")
    return DirectCalls(got or {}, complete,
                       "" if complete else "the hash is malformed or unreadable")


def read_ftrace_ops(mem: KernelReader, layouts: Layouts, list_va: int, end_va: int, *,
                    limit: int = MAX_OPS) -> OpsList:
    """The ops on the list whose head pointer is the variable at `list_va`
    (`ftrace_ops_list`), up to the sentinel at `end_va` (`ftrace_list_end`)."""
    o = layouts["ftrace_ops"]
    hh = layouts["ftrace_ops_hash"]
    chain = walk_chain(mem, list_va, end_va, next_off=o["next"].offset, limit=limit,
                       name="ftrace_ops_list")
    out: list[FtraceOps] = []
    problems: list[str] = []
    budget = _Budget()
    for cur in chain.nodes:
        buf = mem.struct(cur, o)
        if buf is None:
            problems.append(f"ftrace_ops at {cur:#x} cannot be read")
            return OpsList(tuple(out), False, tuple(problems))
        fh = field_int(buf, o["func_hash"])
        filt, notrace = ALL, FtraceHash(frozenset())
        hbuf = mem.struct(fh, hh) if is_kernel_pointer(fh) else None
        if hbuf is None:
            problems.append(f"ftrace_ops at {cur:#x}: func_hash {fh:#x} cannot be read")
            filt = FtraceHash(frozenset(), False)
        else:
            filt = _read_hash(mem, layouts, field_int(hbuf, hh["filter_hash"]), budget)
            notrace = _read_hash(mem, layouts, field_int(hbuf, hh["notrace_hash"]), budget)
            if notrace.ips is None:
                notrace = FtraceHash(frozenset())
            if not (filt.complete and notrace.complete):
                problems.append(f"ftrace_ops at {cur:#x}: a hash could not be read in full")

        def opt(name: str, buf: bytes = buf) -> int:
            f = o.get(name)
            return field_int(buf, f) if f is not None else 0

        out.append(FtraceOps(cur, field_int(buf, o["func"]), field_int(buf, o["flags"]),
                             opt("trampoline"), opt("trampoline_size"), filt, notrace,
                             opt("saved_func"), opt("direct_call")))
    if chain.problem:
        problems.append(chain.problem)
    return OpsList(tuple(out), chain.complete and not problems, tuple(problems))

"""A bounded, cycle-checked walk of a kernel `list_head` list.

`walk_list` follows `next` from a head until it comes back to the head. It stops —
and says why — on an unreadable or non-kernel pointer, a node seen twice (a cycle
that does not pass through the head), or more than `limit` nodes; it also notes nodes
whose `prev` does not point back (a list being changed under us, or an entry unlinked
by hand). It returns the node addresses (the `list_head` inside each entry), never
the entries: `container_of` is the caller's, with the member offset from BTF.

`walk_chain` follows a singly linked chain (`ftrace_ops_list`: a pointer variable, then
each node's `next`, up to a sentinel) with the same bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from scanner.check.kernel_lists.memory import KernelReader, is_kernel_pointer

__all__ = ["ListWalk", "walk_chain", "walk_list"]

DEFAULT_LIMIT = 4096


@dataclass(frozen=True)
class ListWalk:
    nodes: tuple[int, ...]
    #: The walk came back to the head: `nodes` is the whole list.
    complete: bool
    #: Why it is not complete, or what looked wrong on the way ("" when nothing did).
    problem: str = ""
    #: Nodes whose successor's `prev` does not point back at them.
    broken_links: tuple[int, ...] = ()


def walk_list(mem: KernelReader, head: int, *, limit: int = DEFAULT_LIMIT,
              next_off: int = 0, prev_off: int = 8) -> ListWalk:
    """The nodes of the list whose head (a `struct list_head`) is at `head`."""
    nodes: list[int] = []
    seen = {head}
    broken: list[int] = []
    cur = head
    for _ in range(limit + 1):
        nxt = mem.u64(cur + next_off)
        if nxt is None:
            return ListWalk(tuple(nodes), False, f"cannot read the next pointer at "
                            f"{cur + next_off:#x}", tuple(broken))
        if not is_kernel_pointer(nxt) or nxt % 8:
            return ListWalk(tuple(nodes), False, f"next pointer {nxt:#x} at {cur:#x} is "
                            "not a kernel address", tuple(broken))
        back = mem.u64(nxt + prev_off)
        if back is not None and back != cur:
            broken.append(cur)
        if nxt == head:
            return ListWalk(tuple(nodes), True,
                            "prev pointers disagree" if broken else "", tuple(broken))
        if nxt in seen:
            return ListWalk(tuple(nodes), False, f"cycle: node {nxt:#x} seen twice",
                            tuple(broken))
        seen.add(nxt)
        nodes.append(nxt)
        cur = nxt
    return ListWalk(tuple(nodes[:limit]), False, f"more than {limit} entries",
                    tuple(broken))


def walk_chain(mem: KernelReader, first_va: int, end: int, *, next_off: int,
               limit: int = DEFAULT_LIMIT, name: str = "list") -> ListWalk:
    """The nodes of the chain whose first pointer is the variable at `first_va`, each
    node's successor at `next_off`, ending at the sentinel address `end`."""
    nodes: list[int] = []
    seen: set[int] = set()
    cur = mem.u64(first_va)
    for _ in range(limit + 1):
        if cur == end:
            return ListWalk(tuple(nodes), True)
        if cur is None or not is_kernel_pointer(cur) or cur in seen:
            return ListWalk(tuple(nodes), False, f"{name}: " + (
                "unreadable" if cur is None else f"cycle at {cur:#x}" if cur in seen
                else f"pointer {cur:#x} is not a kernel address"))
        seen.add(cur)
        nodes.append(cur)
        cur = mem.u64(cur + next_off)
    return ListWalk(tuple(nodes[:limit]), False, f"{name}: more than {limit} entries")

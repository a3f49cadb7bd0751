"""kernel_lists: the kernel's own bookkeeping, read from guest memory (pure).

The kernel keeps lists of what changed it at run time — loaded modules first (and, for
hook attribution, ftrace ops, kprobes, BPF programs). This package reads them through a
`ReadVA` (guest-virtual reads through the kernel page table) with the struct layouts of
the kernel's own BTF (`scanner.image.layouts`), never with offsets hard-coded per
version. Everything read is hostile: lists are walked with a bound and cycle detection,
every pointer is range-checked, every string is bounded, and a list that cannot be read
in full is said to be incomplete rather than trusted.

* `memory.KernelReader` — bounded typed reads (u64, whole structs, bounded strings);
  `memory.walker_reader` — a `ReadVA` through a kernel page table;
* `lists.walk_list` — a bounded, cycle-checked `list_head` walk;
* `modules.read_modules` — the module list (`struct module` via `modules`): name, state,
  memory ranges (6.1's `core_layout`/`init_layout`, 6.4+'s `mem[]`), `sig_ok`, taints;
  `ModuleList.owner` finds the module whose memory holds an address;
* `ftrace_ops.read_ftrace_ops` — the registered ftrace callbacks (`ftrace_ops_list`)
  with their filters, and `read_direct_calls` the ftrace direct calls
  (`direct_functions`: ip → the trampoline its site calls); `kprobes.read_kprobes` —
  the kprobes (`kprobe_table`), members of aggregate probes included;
  `bpf.read_bpf_programs` — BPF JIT images (`bpf_kallsyms`);
* `modsyms.read_module_symbols` — a listed module's own symbols (its kallsyms copy), to
  name an address inside it ``func+0xoff [module]``.
"""

from scanner.check.kernel_lists.bpf import BpfProgram, read_bpf_programs
from scanner.check.kernel_lists.ftrace_ops import (
    NO_DIRECT_ENTRY,
    DirectCalls,
    FtraceOps,
    OpsList,
    direct_off,
    ftrace_off,
    read_direct_calls,
    read_ftrace_ops,
)
from scanner.check.kernel_lists.kprobes import Kprobe, KprobeTable, kprobes_off, read_kprobes
from scanner.check.kernel_lists.lists import ListWalk, walk_list
from scanner.check.kernel_lists.memory import KernelReader, walker_reader
from scanner.check.kernel_lists.modsyms import ModuleSymbols, read_module_symbols
from scanner.check.kernel_lists.modules import (
    ModuleInfo,
    ModuleList,
    ModuleMemory,
    modules_off,
    read_guest_modules,
    read_modules,
    taint_letters,
)

__all__ = [
    "NO_DIRECT_ENTRY",
    "BpfProgram",
    "DirectCalls",
    "FtraceOps",
    "KernelReader",
    "Kprobe",
    "KprobeTable",
    "ListWalk",
    "ModuleInfo",
    "ModuleList",
    "ModuleMemory",
    "ModuleSymbols",
    "OpsList",
    "direct_off",
    "ftrace_off",
    "kprobes_off",
    "modules_off",
    "read_bpf_programs",
    "read_direct_calls",
    "read_ftrace_ops",
    "read_guest_modules",
    "read_kprobes",
    "read_module_symbols",
    "read_modules",
    "taint_letters",
    "walk_list",
    "walker_reader",
]

"""The kernel's self-patching sites, read from the kernel image (no debug package).

Linux rewrites parts of its own `.text` while it runs. Every such site is listed in a
table the kernel image carries; kscan reads those tables at `profile add` time so that a
changed byte in a running guest can be verified as the kernel's own patching (or not).

All addresses are link-time virtual addresses (KASLR undone), like everything else in a
profile. Mechanism names are the ones used in reports and events:
`ftrace`, `jump_label`, `static_call`, `kprobe`, `optprobe`, `smp_lock`, `runtime_const`.

(Interface fixed first so that the extractor and the verifiers can be built in parallel;
the extractor fills it from the image, `scanner.check.patching` consumes it.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["SYMBOLS", "PatchSites", "RuntimeConst", "extract_patch_sites"]

U64 = npt.NDArray[np.uint64]


def _empty() -> U64:
    return np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class RuntimeConst:
    """A runtime-constant site (6.11+): the immediate of one instruction, patched at boot.

    `addr` is the address of the immediate's first byte, `size` its width in bytes (8 for
    `runtime_ptr_*`, 1 for `runtime_shift_*`), `name` the variable (`d_hash_shift`...)."""

    addr: int
    size: int
    name: str


@dataclass(frozen=True)
class PatchSites:
    """Every self-patching site of one kernel build, as sorted link-time addresses."""

    #: ftrace call sites (`__mcount_loc`): the 5-byte NOP / `call` at each function entry.
    ftrace: U64 = field(default_factory=_empty)
    #: `__jump_table` entries: code address, target address, key address (same order).
    jump_code: U64 = field(default_factory=_empty)
    jump_target: U64 = field(default_factory=_empty)
    jump_key: U64 = field(default_factory=_empty)
    #: `.static_call_sites`: site address, key address, tail-call flag (same order).
    static_call_addr: U64 = field(default_factory=_empty)
    static_call_key: U64 = field(default_factory=_empty)
    static_call_tail: npt.NDArray[np.bool_] = field(
        default_factory=lambda: np.zeros(0, dtype=np.bool_))
    #: Static-call trampolines (`__SCT__*`): address → key address they belong to.
    static_call_trampolines: dict[int, int] = field(default_factory=dict)
    #: `.smp_locks`: addresses of `lock` prefixes (0xf0 ↔ 0x3e on UP/SMP switches).
    smp_locks: U64 = field(default_factory=_empty)
    #: Runtime-constant immediates (none before 6.11).
    runtime_const: tuple[RuntimeConst, ...] = ()
    #: [start, end) ranges where kprobes may not be placed (`_kprobe_blacklist`,
    #: `.kprobes.text`, `.noinstr.text`, entry text), sorted by start.
    kprobe_blacklist: tuple[tuple[int, int], ...] = ()
    #: ftrace's own code in `.text`: name → [start, end) (ftrace_caller,
    #: ftrace_regs_caller, ftrace_stub, return_to_handler, ...).
    ftrace_trampolines: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: The optprobe template in `.text` ([start, end) of optprobe_template_entry..end).
    optprobe_template: tuple[int, int] | None = None
    #: Start addresses of all functions in `.text` (from kallsyms), sorted: a static
    #: call may target any of them; an `int3` must sit on an instruction boundary
    #: decoded from the function start.
    function_starts: U64 = field(default_factory=_empty)
    #: Branch bit of each `__jump_table` entry (key bit 0; same order as `jump_code`):
    #: an entry jumps when its key's state differs from it.
    jump_branch: npt.NDArray[np.bool_] = field(
        default_factory=lambda: np.zeros(0, dtype=np.bool_))
    #: [start, end) of the image's data that is read-only once the kernel has booted
    #: (x86 keeps `.data..ro_after_init` inside `.rodata`): a static key there cannot
    #: change after boot.
    readonly: tuple[tuple[int, int], ...] = ()
    #: Functions the kernel's patching may branch to, sorted: text symbols that are
    #: functions, not labels inside one (empty: unknown, `function_starts` serves).
    call_targets: U64 = field(default_factory=_empty)
    #: Named addresses the verifiers pin targets and values to (`SYMBOLS`, and the
    #: runtime-constant variables), when kallsyms has them.
    symbols: dict[str, int] = field(default_factory=dict)
    #: Static keys only boot code changes, though they lie in writable data: the LSM
    #: hooks' `security_hook_active_<hook>_<n>` (6.9+; set by lsm_static_call_init),
    #: sorted, with the trampoline of the same hook slot's static call (same order).
    #: A BPF LSM hook's key may be toggled at run time (its trampoline jumps to a
    #: `bpf_lsm_*` function, listed in `bpf_lsm_hooks`).
    boot_jump_keys: U64 = field(default_factory=_empty)
    boot_jump_tramps: U64 = field(default_factory=_empty)
    bpf_lsm_hooks: U64 = field(default_factory=_empty)
    #: Static-call keys only boot code updates: the LSM hooks' `lsm_static_call_*`.
    boot_static_keys: U64 = field(default_factory=_empty)


#: Symbols `PatchSites.symbols` keeps: what the kernel writes as branch targets
#: (return thunks, ftrace_ops_get_func's helpers, the optprobe callback,
#: __static_call_return0) and variables whose values the patching must agree with.
SYMBOLS = ("__x86_return_thunk", "retbleed_return_thunk", "srso_return_thunk",
           "srso_alias_return_thunk", "its_return_thunk", "x86_return_thunk",
           "ftrace_ops_assist_func", "ftrace_ops_list_func", "optimized_callback",
           "__static_call_return0", "__static_call_return")


# =========================================================================== extraction
#
# `extract_patch_sites` fills a `PatchSites` from the kernel image and its recovered
# kallsyms (`scanner.image.kallsyms`). Table formats, as the kernel reads them:
#
# * `__mcount_loc` (`__start_mcount_loc`..`__stop_mcount_loc`, merged into .init.data):
#   u64 absolute link-time addresses of each function's `__fentry__` call site (relocated
#   by the KASLR 64-bit relocations; zero entries are skipped, as ftrace_process_locs()
#   does). The file holds the 5-byte NOP `0f 1f 44 00 00` (objtool/recordmcount nopped
#   the `call __fentry__`); `e8` (call) is accepted too.
# * `__jump_table` (include/linux/jump_label.h, CONFIG_HAVE_ARCH_JUMP_LABEL_RELATIVE):
#   struct jump_entry { s32 code; s32 target; long key; }, each relative to its own
#   field's address. The key's low 2 bits are flags (bit 0: branch/likely, bit 1: init,
#   set at run time for init text) and are masked off (`& ~3`) before adding.
# * `.static_call_sites` (include/linux/static_call_types.h): struct static_call_site
#   { s32 addr; s32 key; }, relative; key bit 0 = STATIC_CALL_SITE_TAIL, bit 1 =
#   STATIC_CALL_SITE_INIT, masked off. Trampolines are the kallsyms `__SCT__<name>`
#   symbols; their key is `__SCK__<name>`.
# * `.smp_locks` (`__smp_locks`..`__smp_locks_end`, arch/x86/kernel/alternative.c):
#   s32 relative offsets of `lock` prefixes (0xf0 in the file).
# * runtime constants (6.11+, arch/x86/include/asm/runtime-const.h): per variable a
#   section `runtime_ptr_<sym>` / `runtime_shift_<sym>` of s32 entries. The asm is
#   `.long 1b - <size> - .` where `1:` follows the instruction: label minus the
#   immediate's size, so entry address + value is the immediate's FIRST byte (8-byte
#   `movabs` immediate, file value 0x0123456789abcdef; 1-byte `shrl $12` count).
# * `_kprobe_blacklist` (`__start_kprobe_blacklist`..`__stop_kprobe_blacklist`): u64
#   function addresses (NOKPROBE_SYMBOL); kernel/kprobes.c sizes each by kallsyms
#   (kallsyms_lookup_size_offset: up to the next symbol) and adds the areas
#   `__kprobes_text_*`, `__noinstr_text_*`, and on x86 (arch_populate_kprobe_blacklist)
#   `__irqentry_text_*` and `__entry_text_*`.
# * ftrace's own code (arch/x86/kernel/ftrace_64.S): `ftrace_caller`..`ftrace_caller_end`
#   and `ftrace_regs_caller`..`ftrace_regs_caller_end` (templates copied into
#   trampolines; `ftrace_call`/`ftrace_regs_call` inside them are patched), plus
#   `ftrace_stub`, `ftrace_stub_graph`, `__fentry__`, `return_to_handler`, ... each up
#   to the next symbol.
# * optprobe template (arch/x86/kernel/kprobes/opt.c): `optprobe_template_entry`..
#   `optprobe_template_end`. On 6.1 and 6.12 it lives in `.rodata` (it is only copied).
#
# Only sites inside `.text` are kept (init text is freed after boot); the others are
# counted in the optional `report` dict, as are entries whose bytes are not what the
# mechanism writes (dropped).

MAX_TABLE_BYTES = 64 << 20
_NOP5 = bytes.fromhex("0f1f440000")
_FTRACE_NAMES = ("ftrace_caller", "ftrace_caller_op_ptr", "ftrace_call", "ftrace_caller_end",
                 "ftrace_regs_caller", "ftrace_regs_caller_op_ptr", "ftrace_regs_call",
                 "ftrace_regs_caller_jmp", "ftrace_regs_caller_ret", "ftrace_regs_caller_end",
                 "ftrace_graph_call", "ftrace_graph_caller", "ftrace_epilogue", "ftrace_stub",
                 "ftrace_stub_graph", "ftrace_stub_direct_tramp", "ftrace_graph_func",
                 "__fentry__", "return_to_handler", "ftrace_trampoline")
_KPROBE_AREAS = ("__kprobes_text", "__noinstr_text", "__irqentry_text", "__entry_text")


def extract_patch_sites(image: Any, kallsyms: Any, *,
                        report: dict[str, Any] | None = None) -> PatchSites:
    """Read every self-patching table of `image` (a `scanner.image.vmlinux.KernelImage`) with
    the help of its `kallsyms` (`scanner.image.kallsyms.Kallsyms`). Raises
    `scanner.errors.KernelImageError` if a table is malformed; a table that does not
    exist (mechanism not configured) is simply empty. `report`, when given, receives
    counts per mechanism (kept, outside .text, rejected) and where each table was."""
    from scanner.errors import KernelImageError

    rep: dict[str, Any] = report if report is not None else {}
    try:
        return _extract(_Image(image, kallsyms), rep)
    except KernelImageError:
        raise
    except (ValueError, IndexError, OverflowError, KeyError, TypeError) as err:
        raise KernelImageError(f"malformed patch-site tables: {err}",
                               path=str(getattr(image, "path", "<image>"))) from err


class _Image:
    """Link-time address → file bytes, over the image's file-backed sections."""

    def __init__(self, image: Any, kallsyms: Any) -> None:
        self.image = image
        self.ks = kallsyms
        self.where = str(getattr(image, "path", "<image>"))
        nobits: frozenset[str] = getattr(image, "_nobits", frozenset())
        self.sections = sorted((s for s in image.sections.values()
                                if s.size and s.name not in nobits and s.addr),
                               key=lambda s: s.addr)
        self._cache: dict[str, bytes] = {}
        text = image.sections[".text"]
        self.text = (text.addr, text.end)
        self.text_bytes = np.frombuffer(self.section(".text"), dtype=np.uint8)

    def error(self, msg: str) -> Exception:
        from scanner.errors import KernelImageError

        return KernelImageError(msg, path=self.where)

    def section(self, name: str) -> bytes:
        if name not in self._cache:
            self._cache[name] = self.image.section_bytes(name)
        return self._cache[name]

    def read(self, lo: int, hi: int, what: str) -> bytes:
        if not 0 <= hi - lo <= MAX_TABLE_BYTES:
            raise self.error(f"{what}: implausible extent {lo:#x}..{hi:#x}")
        for s in self.sections:
            if s.addr <= lo and hi <= s.end:
                data = self.section(s.name)
                return data[lo - s.addr:hi - s.addr]
        raise self.error(f"{what}: {lo:#x}..{hi:#x} is not inside one section of the file")

    def table(self, start_sym: str, stop_sym: str, section: str | None, entry: int,
              rep: dict[str, Any], key: str) -> tuple[int, bytes] | None:
        """(address, bytes) of a table bounded by kallsyms symbols, else by an ELF section."""
        lo, hi = self.ks.lookup(start_sym), self.ks.lookup(stop_sym)
        if lo is None or hi is None:
            sec = self.image.sections.get(section) if section else None
            if sec is None:
                rep[key] = {"table": None}
                return None
            lo, hi = sec.addr, sec.end
            src = f"section {section}"
        else:
            src = f"{start_sym}..{stop_sym}"
        if hi < lo or (hi - lo) % entry:
            raise self.error(f"{key} table {src} at {lo:#x}..{hi:#x} is not a whole "
                             f"number of {entry}-byte entries")
        rep[key] = {"table": src, "addr": lo, "entries": (hi - lo) // entry}
        return lo, self.read(lo, hi, f"{key} table")

    def in_text(self, addrs: npt.NDArray[np.uint64], size: int = 1) -> npt.NDArray[np.bool_]:
        lo, hi = self.text
        return (addrs >= np.uint64(lo)) & (addrs <= np.uint64(hi - size))

    def text_at(self, addrs: npt.NDArray[np.uint64], n: int) -> npt.NDArray[np.uint8]:
        """(len(addrs), n) bytes of `.text` at each address (all must be in .text)."""
        off = (addrs - np.uint64(self.text[0])).astype(np.int64)
        out: npt.NDArray[np.uint8] = self.text_bytes[off[:, None] + np.arange(n)]
        return out


def _rel(base: int, values: npt.NDArray[np.int64], field_off: int,
         stride: int) -> npt.NDArray[np.uint64]:
    """Absolute addresses of relative entries: &entry[i].field + value[i] (mod 2**64)."""
    idx = np.arange(values.size, dtype=np.uint64)
    where = np.uint64(base + field_off) + idx * np.uint64(stride)
    return where + values.astype(np.uint64)          # int64 → uint64 wraps: two's complement


def _extract(img: _Image, rep: dict[str, Any]) -> PatchSites:
    ks = img.ks
    ftrace = _ftrace(img, rep)
    jump_code, jump_target, jump_key, jump_branch = _jump_table(img, rep)
    sc_addr, sc_key, sc_tail = _static_calls(img, rep)
    rc = _runtime_consts(img, rep)
    return PatchSites(
        ftrace=ftrace,
        jump_code=jump_code, jump_target=jump_target, jump_key=jump_key,
        static_call_addr=sc_addr, static_call_key=sc_key, static_call_tail=sc_tail,
        static_call_trampolines=_sct_trampolines(img, rep),
        smp_locks=_smp_locks(img, rep),
        runtime_const=rc,
        kprobe_blacklist=_kprobe_blacklist(img, rep),
        ftrace_trampolines=_ftrace_trampolines(img, rep),
        optprobe_template=_optprobe(img, rep),
        function_starts=ks.function_starts().astype(np.uint64),
        jump_branch=jump_branch,
        readonly=_readonly(img),
        call_targets=_call_targets(ks),
        symbols=_symbols(img, rc),
        **_lsm_keys(img),
    )


def _lsm_keys(img: _Image) -> dict[str, U64]:
    """security_hook_active_<h>_<n> keys with their slot's `__SCT__lsm_static_call_<h>_<n>`
    trampoline, the `__SCK__lsm_static_call_*` keys and the `bpf_lsm_*` functions."""
    ks = img.ks
    lo, hi = img.text
    keys: list[tuple[int, int]] = []
    skeys: list[int] = []
    bpf: list[int] = []
    for a, name in zip(ks.addresses.tolist(), ks.names, strict=True):
        if name.startswith("security_hook_active_"):
            tr = ks.lookup("__SCT__lsm_static_call_" + name[len("security_hook_active_"):])
            keys.append((int(a), int(tr or 0)))
        elif name.startswith("__SCK__lsm_static_call_"):
            skeys.append(int(a))
        elif name.startswith("bpf_lsm_") and lo <= int(a) < hi:
            bpf.append(int(a))
    keys.sort()
    return {"boot_jump_keys": np.array([k for k, _ in keys], dtype=np.uint64),
            "boot_jump_tramps": np.array([t for _, t in keys], dtype=np.uint64),
            "bpf_lsm_hooks": np.unique(np.array(bpf, dtype=np.uint64)),
            "boot_static_keys": np.unique(np.array(skeys, dtype=np.uint64))}


def _readonly(img: _Image) -> tuple[tuple[int, int], ...]:
    """`.rodata` (with `.data..ro_after_init` in it, mark_rodata_ro() makes it read-only
    at the end of boot)."""
    s = img.image.sections.get(".rodata")
    return ((s.addr, s.end),) if s is not None and s.size else ()


#: Labels inside asm functions (SYM_INNER_LABEL), not functions: never a branch target
#: the kernel writes.
_INNER = re.compile(r"^(ftrace_(regs_)?call|ftrace_(regs_)?caller_(op_ptr|end|jmp|ret)|"
                    r"ftrace_graph_call|ftrace_epilogue|optprobe_template_\w+|"
                    r"__\w+_text_(start|end))$")


def _call_targets(ks: Any) -> U64:
    """Text symbols that are functions. On kernels with function padding (6.2+, a
    `__pfx_<name>` symbol before every function objtool knows as one), a symbol is a
    function when it has its `__pfx_`; everywhere, asm inner labels are not."""
    lo, hi = ks.text
    names: tuple[str, ...] = ks.names
    pfx = {n[6:] for n in names if n.startswith("__pfx_")}
    out = [int(a) for a, t, n in zip(ks.addresses.tolist(), ks.types, names, strict=True)
           if t in "tTwW" and lo <= int(a) < hi and not n.startswith("__pfx_")
           and not _INNER.match(n) and (not pfx or n in pfx)]
    return np.unique(np.array(out, dtype=np.uint64))


def _symbols(img: _Image, rc: tuple[RuntimeConst, ...]) -> dict[str, int]:
    ks = img.ks
    wanted = list(SYMBOLS) + sorted({c.name for c in rc})
    return {n: int(a) for n in wanted if (a := ks.lookup(n)) is not None}


def _ftrace(img: _Image, rep: dict[str, Any]) -> U64:
    t = img.table("__start_mcount_loc", "__stop_mcount_loc", "__mcount_loc", 8, rep, "ftrace")
    if t is None:
        return _empty()
    a = np.frombuffer(t[1], dtype="<u8").astype(np.uint64)
    a = a[a != 0]
    inside = img.in_text(a, 5)
    r = rep["ftrace"]
    r["outside_text"] = int((~inside).sum())
    a = a[inside]
    b = img.text_at(a, 5)
    nop = (b == np.frombuffer(_NOP5, dtype=np.uint8)).all(axis=1)
    ok = nop | (b[:, 0] == 0xE8)
    r["rejected"] = int((~ok).sum())
    r["calls_in_file"] = int((ok & ~nop).sum())
    out = np.unique(a[ok])
    r["kept"] = int(out.size)
    return out


def _jump_table(img: _Image, rep: dict[str, Any]
                ) -> tuple[U64, U64, U64, npt.NDArray[np.bool_]]:
    t = img.table("__start___jump_table", "__stop___jump_table", "__jump_table", 16, rep,
                  "jump_label")
    if t is None:
        return _empty(), _empty(), _empty(), np.zeros(0, dtype=np.bool_)
    base, raw = t
    rec = np.frombuffer(raw, dtype=np.dtype([("code", "<i4"), ("target", "<i4"), ("key", "<i8")]))
    code = _rel(base, rec["code"].astype(np.int64), 0, 16)
    target = _rel(base, rec["target"].astype(np.int64), 4, 16)
    key = _rel(base, rec["key"] & ~np.int64(3), 8, 16)
    r = rep["jump_label"]
    r["branch_flag"] = int((rec["key"] & 1).sum())
    r["init_flag"] = int((rec["key"] & 2).astype(bool).sum())
    inside = img.in_text(code, 5) & img.in_text(target, 1)
    r["outside_text"] = int((~inside).sum())
    branch = (rec["key"] & 1).astype(bool)[inside]
    code, target, key = code[inside], target[inside], key[inside]
    b = img.text_at(code, 5)
    nop5 = (b == np.frombuffer(_NOP5, dtype=np.uint8)).all(axis=1)
    nop2 = (b[:, 0] == 0x66) & (b[:, 1] == 0x90)
    jmp = (b[:, 0] == 0xEB) | (b[:, 0] == 0xE9)
    ok = nop5 | nop2 | jmp
    r["rejected"] = int((~ok).sum())
    r["nop2"], r["nop5"], r["jmp"] = int(nop2.sum()), int(nop5.sum()), int(jmp.sum())
    code, target, key, branch = code[ok], target[ok], key[ok], branch[ok]
    order = np.argsort(code, kind="stable")
    r["kept"] = int(code.size)
    return code[order], target[order], key[order], branch[order]


def _static_calls(img: _Image, rep: dict[str, Any]) -> tuple[U64, U64, npt.NDArray[np.bool_]]:
    t = img.table("__start_static_call_sites", "__stop_static_call_sites",
                  ".static_call_sites", 8, rep, "static_call")
    empty = (_empty(), _empty(), np.zeros(0, dtype=np.bool_))
    if t is None:
        return empty
    base, raw = t
    rec = np.frombuffer(raw, dtype=np.dtype([("addr", "<i4"), ("key", "<i4")]))
    addr = _rel(base, rec["addr"].astype(np.int64), 0, 8)
    keyv = rec["key"].astype(np.int64)
    key = _rel(base, keyv & ~np.int64(3), 4, 8)
    tail = (keyv & 1).astype(bool)
    r = rep["static_call"]
    r["init_flag"] = int((keyv & 2).astype(bool).sum())
    inside = img.in_text(addr, 5)
    r["outside_text"] = int((~inside).sum())
    addr, key, tail = addr[inside], key[inside], tail[inside]
    b = img.text_at(addr, 5)
    nop5 = (b == np.frombuffer(_NOP5, dtype=np.uint8)).all(axis=1)
    ok = nop5 | (b[:, 0] == 0xE8) | (b[:, 0] == 0xE9)
    r["rejected"] = int((~ok).sum())
    addr, key, tail = addr[ok], key[ok], tail[ok]
    order = np.argsort(addr, kind="stable")
    r["kept"] = int(addr.size)
    r["tail"] = int(tail.sum())
    return addr[order], key[order], tail[order]


def _sct_trampolines(img: _Image, rep: dict[str, Any]) -> dict[int, int]:
    ks = img.ks
    lo, hi = img.text
    out: dict[int, int] = {}
    missing = 0
    for name in ks.names:
        if not name.startswith("__SCT__"):
            continue
        a = ks.lookup(name)
        k = ks.lookup("__SCK__" + name[len("__SCT__"):])
        if a is None or not lo <= a < hi:
            continue
        if k is None:
            missing += 1
            continue
        out[a] = k
    rep["static_call_trampolines"] = {"kept": len(out), "no_key": missing}
    return dict(sorted(out.items()))


def _smp_locks(img: _Image, rep: dict[str, Any]) -> U64:
    t = img.table("__smp_locks", "__smp_locks_end", ".smp_locks", 4, rep, "smp_lock")
    if t is None:
        return _empty()
    base, raw = t
    a = _rel(base, np.frombuffer(raw, dtype="<i4").astype(np.int64), 0, 4)
    inside = img.in_text(a, 1)
    r = rep["smp_lock"]
    r["outside_text"] = int((~inside).sum())
    a = a[inside]
    ok = img.text_at(a, 1)[:, 0] == 0xF0
    r["rejected"] = int((~ok).sum())
    out = np.unique(a[ok])
    r["kept"] = int(out.size)
    return out


def _runtime_consts(img: _Image, rep: dict[str, Any]) -> tuple[RuntimeConst, ...]:
    ks = img.ks
    names: set[tuple[str, str]] = set()
    for prefix in ("runtime_ptr_", "runtime_shift_"):
        names.update((prefix, n[len("__start_" + prefix):]) for n in ks.names
                     if n.startswith("__start_" + prefix))
        names.update((prefix, n[len(prefix):]) for n in img.image.sections
                     if n.startswith(prefix))
    out: list[RuntimeConst] = []
    r: dict[str, Any] = {"variables": {}, "rejected": 0, "outside_text": 0}
    tmp: dict[str, Any] = {}
    for prefix, var in sorted(names):
        sec = prefix + var
        t = img.table(f"__start_{sec}", f"__stop_{sec}", sec, 4, tmp, sec)
        if t is None:
            continue
        base, raw = t
        a = _rel(base, np.frombuffer(raw, dtype="<i4").astype(np.int64), 0, 4)
        size = 8 if prefix == "runtime_ptr_" else 1
        inside = img.in_text(a, size) & (a >= np.uint64(img.text[0] + 2))
        r["outside_text"] += int((~inside).sum())
        a = a[inside]
        b = img.text_at(a - np.uint64(2), 2 + size)
        if size == 8:   # movabs $0x0123456789abcdef, %reg: REX.W(+B) B8+r imm64
            ok = (((b[:, 0] == 0x48) | (b[:, 0] == 0x49)) & (b[:, 1] >= 0xB8) & (b[:, 1] <= 0xBF)
                  & (b[:, 2:] == np.frombuffer((0x0123456789ABCDEF).to_bytes(8, "little"),
                                                dtype=np.uint8)).all(axis=1))
        else:           # shrl $12, %r32: C1 /5 ib (ModRM E8+r), optional REX before
            ok = (b[:, 0] == 0xC1) & (b[:, 1] >= 0xE8) & (b[:, 1] <= 0xEF) & (b[:, 2] == 12)
        r["rejected"] += int((~ok).sum())
        r["variables"][sec] = int(ok.sum())
        out.extend(RuntimeConst(int(x), size, var) for x in a[ok].tolist())
    r["kept"] = len(out)
    rep["runtime_const"] = r
    return tuple(sorted(out, key=lambda c: c.addr))


def _kprobe_blacklist(img: _Image, rep: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    ks = img.ks
    ranges: list[tuple[int, int]] = []
    r: dict[str, Any] = {}
    t = img.table("__start_kprobe_blacklist", "__stop_kprobe_blacklist", "_kprobe_blacklist",
                  8, r, "entries")
    text_ranges = [img.text]
    si, ei = ks.lookup("_sinittext"), ks.lookup("_einittext")
    if si is not None and ei is not None and si < ei:
        text_ranges.append((si, ei))
    skipped = 0
    if t is not None:
        for a in np.frombuffer(t[1], dtype="<u8").tolist():
            # kprobe_add_ksym_blacklist(): kernel text only, sized by kallsyms.
            span = ks.size_of(a) if any(lo <= a < hi for lo, hi in text_ranges) else None
            if span is None or span[0] != a:
                skipped += 1
                continue
            ranges.append((a, max(span[1], a + 1)))
    areas = {}
    for area in _KPROBE_AREAS:
        lo, hi = ks.lookup(area + "_start"), ks.lookup(area + "_end")
        if lo is not None and hi is not None and lo < hi and hi - lo <= MAX_TABLE_BYTES:
            ranges.append((lo, hi))
            areas[area] = (lo, hi)
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    r.update(symbols=len(ranges) - len(areas), skipped=skipped, areas=areas,
             kept=len(merged))
    rep["kprobe"] = r
    return tuple(merged)


def _ftrace_trampolines(img: _Image, rep: dict[str, Any]) -> dict[str, tuple[int, int]]:
    ks = img.ks
    lo, hi = img.text
    out: dict[str, tuple[int, int]] = {}
    for name in _FTRACE_NAMES:
        a = ks.lookup(name)
        if a is None or not lo <= a < hi:
            continue
        if name.endswith("_end"):  # a label: the verifier needs where it is
            out[name] = (a, a + 1)
            continue
        end = ks.lookup(name + "_end") if name in ("ftrace_caller", "ftrace_regs_caller") else None
        if end is None or not a < end <= hi:
            span = ks.size_of(a)
            end = span[1] if span else a + 1
        out[name] = (a, max(end, a + 1))
    rep["ftrace_trampolines"] = {"kept": len(out)}
    return out


def _optprobe(img: _Image, rep: dict[str, Any]) -> tuple[int, int] | None:
    ks = img.ks
    lo, hi = ks.lookup("optprobe_template_entry"), ks.lookup("optprobe_template_end")
    if lo is None or hi is None or not 0 < hi - lo <= 4096:
        rep["optprobe"] = {"kept": 0}
        return None
    sec = next((s.name for s in img.sections if s.addr <= lo and hi <= s.end), None)
    rep["optprobe"] = {"kept": 1, "section": sec, "size": hi - lo}
    return (lo, hi)

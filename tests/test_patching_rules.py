"""Rules of the kernel's own patching that hold across sites and across checks of one
boot (scanner.check.patching with scanner.check.patch_state), each with the attack it
stops, on the synthetic .text of tests/test_patching.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from scanner.check.patch_state import PatchMemory, VmFacts
from scanner.check.patching import RETINSN, XOR5RAX, PatchVerdict
from scanner.image.patchsites import RuntimeConst
from tests.test_patching import (
    KEY1,
    OPS,
    SITES,
    SLIDE,
    SLOT_VA,
    SYM,
    TEXT,
    TRAMP_VA,
    Mem,
    bad,
    check,
    make_slot,
    make_tramp,
    only,
    patch,
    rel_insn,
)


def reasons(v: PatchVerdict) -> str:
    return " | ".join(u.reason for u in v.unverified)


# -- 1. optprobe slots belong to one site ------------------------------------------

def test_optprobe_slot_is_verified_for_its_own_site_only() -> None:
    """A second probe site jumping into a slot already verified for another site:
    an arbitrary jump from one instruction to another's continuation."""
    mem = Mem()
    mem.add(SLOT_VA, make_slot())
    at, other = SYM["probe_a"], SYM["relbr_a"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe9", at, SLOT_VA, runtime=True))
    only(check(live, mem), "optprobe")
    patch(live, other, rel_insn(b"\xe9", other, SLOT_VA, runtime=True))
    v = check(live, mem)
    assert [(u.start, u.end) for u in v.unverified] == [(other, other + 5)], v.unverified


def test_optprobe_op_and_callback_are_pinned() -> None:
    at = SYM["probe_a"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe9", at, SLOT_VA, runtime=True))
    mem = Mem()                        # op's kp.addr names another probed address
    mem.add(SLOT_VA, make_slot())
    mem.add(0xFFFF888055550000 + 40, (SYM["relbr_a"] + SLIDE).to_bytes(8, "little"))
    assert "probes another address" in bad(check(live, mem), at, at + 5)
    slot = make_slot()                 # calls a function, but not optimized_callback
    tmpl_val = slot.find(b"\x48\xbf")
    c = tmpl_val + 10
    slot[c + 1:c + 5] = (SYM["callback_a"] + SLIDE - (SLOT_VA + c + 5)).to_bytes(
        4, "little", signed=True)
    mem = Mem()
    mem.add(SLOT_VA, slot)
    assert "optimized_callback" in bad(check(live, mem), at, at + 5)


# -- 2. one key, one state ---------------------------------------------------------

def test_static_call_site_alone_is_tampering() -> None:
    """One hook's call site set to `xor eax,eax` ("return 0") while its trampoline
    still jumps to the hook."""
    at = SYM["sc_call"]
    live = bytearray(TEXT)
    patch(live, at, XOR5RAX)
    assert "different functions" in bad(check(live), at, at + 5)
    patch(live, SYM["__SCT__k1"], rel_insn(b"\xe9", SYM["__SCT__k1"],
                                          SYM["__static_call_return0"]))
    only(check(live), "static_call", 2)
    live = bytearray(TEXT)             # the trampoline alone retargeted
    patch(live, SYM["__SCT__k1"], RETINSN)
    bad(check(live), SYM["__SCT__k1"], SYM["__SCT__k1"] + 5)


def test_jump_label_sites_of_one_key_flip_together() -> None:
    live = bytearray(TEXT)             # jl5 and jl2 share KEY1
    patch(live, SYM["jl5"], b"\xe9" + (SYM["jl5_target"] - SYM["jl5"] - 5).to_bytes(
        4, "little", signed=True))
    assert "not flipped" in bad(check(live), SYM["jl5"], SYM["jl5"] + 5)
    patch(live, SYM["jl2"], bytes((0xEB, SYM["jl2_target"] - SYM["jl2"] - 2)))
    only(check(live), "jump_label", 2)


# -- 3. runtime constants ----------------------------------------------------------

def _rc_sites(name: str) -> tuple[RuntimeConst, ...]:
    """Two sites of one variable: the movabs immediate in rc_fn, and (only the bytes
    matter here) the first 8 bytes of blk_fn."""
    return (RuntimeConst(SYM["rc_ptr"] + 2, 8, name), RuntimeConst(SYM["blk_fn"], 8, name))


def test_runtime_constant_is_one_value_across_its_sites() -> None:
    sites = replace(SITES, runtime_const=_rc_sites("dentry_hashtable"))
    live = bytearray(TEXT)
    patch(live, SYM["rc_ptr"] + 2, (0xFFFF888000123000).to_bytes(8, "little"))
    patch(live, SYM["blk_fn"], (0xFFFF888000123000).to_bytes(8, "little"))
    only(check(live, sites=sites), "runtime_const", 2)
    patch(live, SYM["blk_fn"], (0xFFFF888000999000).to_bytes(8, "little"))
    assert "different values" in reasons(check(live, sites=sites))


def test_user_ptr_max_is_what_the_kernel_computes() -> None:
    """6.12: every USER_PTR_MAX immediate set to all ones disables the user-pointer
    range checks."""
    sites = replace(SITES, runtime_const=_rc_sites("USER_PTR_MAX"))
    for la57, want in ((False, (1 << 47) - 4096), (True, (1 << 56) - 4096)):
        live = bytearray(TEXT)
        for at in (SYM["rc_ptr"] + 2, SYM["blk_fn"]):
            patch(live, at, want.to_bytes(8, "little"))
        only(check(live, sites=sites, facts=VmFacts(la57=la57)), "runtime_const", 2)
        for at in (SYM["rc_ptr"] + 2, SYM["blk_fn"]):
            patch(live, at, b"\xff" * 8)
        v = check(live, sites=sites, facts=VmFacts(la57=la57))
        assert "TASK_SIZE_MAX" in reasons(v) and not v.verified


def test_runtime_constant_equals_its_variable_and_stays_pinned() -> None:
    var = 0xFFFFFFFF82C3FC30
    sites = replace(SITES, runtime_const=_rc_sites("dentry_hashtable"),
                    symbols={**SITES.symbols, "dentry_hashtable": var})
    value = 0xFFFF888000123000
    mem = Mem()
    mem.add(var + SLIDE, value.to_bytes(8, "little"))
    live = bytearray(TEXT)
    for at in (SYM["rc_ptr"] + 2, SYM["blk_fn"]):
        patch(live, at, value.to_bytes(8, "little"))
    first = check(live, mem, sites=sites)
    assert first.clean and first.memory.runtime_const == {"dentry_hashtable": value}
    for at in (SYM["rc_ptr"] + 2, SYM["blk_fn"]):
        patch(live, at, (value + 0x1000).to_bytes(8, "little"))
    assert "in the variable" in reasons(check(live, mem, sites=sites))
    mem.add(var + SLIDE, (value + 0x1000).to_bytes(8, "little"))   # variable moved too
    assert "first check of this boot" in reasons(check(live, mem, sites=sites,
                                                       memory=first.memory))


# -- 4. keys that cannot change after boot ----------------------------------------

def test_read_only_key_sites_are_pinned_at_the_first_check() -> None:
    sites = replace(SITES, readonly=((KEY1 - 0x40, KEY1 + 0x40),))
    flipped = bytearray(TEXT)
    patch(flipped, SYM["jl5"], b"\xe9" + (SYM["jl5_target"] - SYM["jl5"] - 5).to_bytes(
        4, "little", signed=True))
    patch(flipped, SYM["jl2"], bytes((0xEB, SYM["jl2_target"] - SYM["jl2"] - 2)))
    # As the boot set them: pinned.
    first = check(flipped, sites=sites)
    only(first, "jump_label", 2)
    assert len(first.memory.fixed_sites) == 2
    only(check(flipped, sites=sites, memory=first.memory), "jump_label", 2)
    # Undone later (the sites back to the golden NOPs): tampering, though equal to golden.
    v = check(TEXT, sites=sites, memory=first.memory)
    assert [(u.start, u.end) for u in v.unverified] == [
        (SYM["jl5"], SYM["jl5"] + 5), (SYM["jl2"], SYM["jl2"] + 2)]
    assert "read-only data" in v.unverified[0].reason
    # Flipped after a first check that saw them as golden: tampering.
    clean_first = check(TEXT, sites=sites)
    assert clean_first.memory.pinned and clean_first.memory.fixed_sites == {}
    v = check(flipped, sites=sites, memory=clean_first.memory)
    assert not v.verified and "read-only data" in reasons(v)
    # A key in writable data flips freely.
    only(check(flipped, memory=clean_first.memory), "jump_label", 2)


def test_lsm_hook_keys_are_pinned_unless_bpf() -> None:
    """6.12: security_hook_active_capable_0 lies in writable data, but only boot code
    sets it: NOPing its site skips cap_capable (every capable() succeeds)."""
    flipped = bytearray(TEXT)
    patch(flipped, SYM["jl5"], b"\xe9" + (SYM["jl5_target"] - SYM["jl5"] - 5).to_bytes(
        4, "little", signed=True))
    patch(flipped, SYM["jl2"], bytes((0xEB, SYM["jl2_target"] - SYM["jl2"] - 2)))
    u64 = lambda xs: np.array(xs, dtype=np.uint64)  # noqa: E731
    lsm = replace(SITES, boot_jump_keys=u64([KEY1]), boot_jump_tramps=u64([SYM["__SCT__k1"]]))
    first = check(TEXT, sites=lsm)
    v = check(flipped, sites=lsm, memory=first.memory)
    assert not v.verified and "LSM hook" in reasons(v)
    # A BPF LSM hook's key (its slot's trampoline jumps to a bpf_lsm_* function) is
    # toggled when a program attaches: free to flip.
    bpf = replace(lsm, bpf_lsm_hooks=u64([SYM["target_fn"]]))
    only(check(flipped, sites=bpf, memory=first.memory), "jump_label", 2)
    # The LSM static calls themselves are set at boot only, too.
    lsm_sc = replace(SITES, boot_static_keys=u64([KEY1]))
    first = check(TEXT, sites=lsm_sc)
    live = bytearray(TEXT)
    patch(live, SYM["sc_call"], rel_insn(b"\xe8", SYM["sc_call"], SYM["other_fn"]))
    patch(live, SYM["__SCT__k1"], rel_insn(b"\xe9", SYM["__SCT__k1"], SYM["other_fn"]))
    only(check(live), "static_call", 2)
    v = check(live, sites=lsm_sc, memory=first.memory)
    assert not v.verified and "LSM hook" in reasons(v)


# -- 5. half-states are transient --------------------------------------------------

def _half(at: str, target: str) -> bytearray:
    live = bytearray(TEXT)
    patch(live, SYM[at], rel_insn(b"\xe8", SYM[at], SYM[target]))
    live[SYM[at] - 0xFFFFFFFF81000000] = 0xCC
    return live


def test_half_state_seen_again_a_second_later_is_tampering() -> None:
    live = _half("ftrace_a", "ftrace_caller")
    first = check(live, facts=VmFacts(now=100.0))
    only(first, "ftrace")
    assert first.verified[0].in_progress and len(first.memory.half) == 1
    soon = check(live, facts=VmFacts(now=100.4), memory=first.memory)
    only(soon, "ftrace")
    assert soon.memory.half == first.memory.half          # first seen at 100.0
    late = check(live, facts=VmFacts(now=101.2), memory=soon.memory)
    assert "half-state" in bad(late, SYM["ftrace_a"], SYM["ftrace_a"] + 5)
    # Gone in between: a new half-state later is new.
    gone = check(TEXT, facts=VmFacts(now=101.0), memory=first.memory)
    assert gone.memory.half == {}
    only(check(live, facts=VmFacts(now=103.0), memory=gone.memory), "ftrace")


def test_half_state_obeys_the_kprobe_blacklist() -> None:
    sites = replace(SITES, kprobe_blacklist=((SYM["traced_a"], SYM["traced_b"]),))
    v = check(_half("ftrace_a", "ftrace_caller"), sites=sites)
    assert "blacklist" in bad(v, SYM["ftrace_a"], SYM["ftrace_a"] + 5)


def test_trampoline_half_state_is_transient_too() -> None:
    tr = make_tramp(TEXT, False, 2)
    c = SYM["ftrace_call"] - SYM["ftrace_caller"]
    tr[c] = 0xCC
    mem = Mem()
    mem.add(TRAMP_VA, tr)
    mem.add(OPS, (SYM["callback_a"] + SLIDE).to_bytes(8, "little"))
    at = SYM["ftrace_a"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe8", at, TRAMP_VA, runtime=True))
    first = check(live, mem, facts=VmFacts(now=10.0))
    only(first, "ftrace")
    late = check(live, mem, facts=VmFacts(now=12.0), memory=first.memory)
    assert "half-state" in bad(late, at, at + 5)


# -- 6. lock prefixes --------------------------------------------------------------

def test_lock_prefix_removed_only_on_one_cpu() -> None:
    live = bytearray(TEXT)
    patch(live, SYM["lock_a"], "3e")
    only(check(live, facts=VmFacts(cpus=1)), "smp_lock")
    assert "2 vCPUs" in bad(check(live, facts=VmFacts(cpus=2)), SYM["lock_a"],
                            SYM["lock_a"] + 1)


def test_lock_prefixes_all_or_none() -> None:
    other = SYM["probe_a"]             # a second "lock" site for this test
    base = bytearray(TEXT)
    base[other - 0xFFFFFFFF81000000] = 0xF0
    sites = replace(SITES, smp_locks=np.array(sorted([SYM["lock_a"], other]),
                                              dtype=np.uint64))
    from scanner.check.patching import verify_text_changes

    live = bytearray(base)
    live[SYM["lock_a"] - 0xFFFFFFFF81000000] = 0x3E
    v = verify_text_changes(bytes(base), bytes(live), 0xFFFFFFFF81000000, SLIDE, sites,
                            None, facts=VmFacts(cpus=1))
    assert not v.clean and "all or none" in reasons(v)
    live[other - 0xFFFFFFFF81000000] = 0x3E
    v = verify_text_changes(bytes(base), bytes(live), 0xFFFFFFFF81000000, SLIDE, sites,
                            None, facts=VmFacts(cpus=1))
    assert v.clean and v.summary()["smp_lock"].count == 2


# -- 7. targets pinned to what the kernel writes -----------------------------------

def test_trampoline_return_goes_to_the_return_thunk() -> None:
    sites = replace(SITES, symbols={**SITES.symbols,
                                    "__x86_return_thunk": SYM["x86_return_thunk"]})
    at = SYM["ftrace_a"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe8", at, TRAMP_VA, runtime=True))
    mem = Mem()
    mem.add(TRAMP_VA, make_tramp(TEXT, True, 5, rethunk=True))
    only(check(live, mem, sites=sites), "ftrace")
    tr = make_tramp(TEXT, True, 5, rethunk=True)
    size = SYM["ftrace_regs_caller_end"] - SYM["ftrace_regs_caller"]
    tr[size:size + 5] = b"\xe9" + (SYM["other_fn"] + SLIDE - (TRAMP_VA + size + 5)).to_bytes(
        4, "little", signed=True)
    mem = Mem()
    mem.add(TRAMP_VA, tr)
    assert "return thunk" in bad(check(live, mem, sites=sites), at, at + 5)


def test_trampoline_calls_the_ops_function_or_the_assist_helper() -> None:
    sites = replace(SITES, symbols={**SITES.symbols,
                                    "ftrace_ops_list_func": SYM["ftrace_ops_list_func"]})
    at = SYM["ftrace_a"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe8", at, TRAMP_VA, runtime=True))
    for func, ops_func, ok in (("callback_a", "callback_a", True),
                               ("ftrace_ops_list_func", "target_fn", True),
                               ("other_fn", "callback_a", False)):
        mem = Mem()
        mem.add(TRAMP_VA, make_tramp(TEXT, False, 2, func=func))
        mem.add(OPS, (SYM[ops_func] + SLIDE).to_bytes(8, "little"))
        v = check(live, mem, sites=sites)
        assert v.clean is ok, (func, v.unverified)


def test_branch_targets_are_functions_not_labels() -> None:
    """Static-call targets must be functions (call_targets), not any text symbol."""
    at, tr = SYM["sc_call"], SYM["__SCT__k1"]
    live = bytearray(TEXT)
    patch(live, at, rel_insn(b"\xe8", at, SYM["other_fn"]))
    patch(live, tr, rel_insn(b"\xe9", tr, SYM["other_fn"]))
    only(check(live), "static_call", 2)
    funcs = [a for a in SITES.function_starts.tolist() if a != SYM["other_fn"]]
    sites = replace(SITES, call_targets=np.array(funcs, dtype=np.uint64))
    assert not check(live, sites=sites).clean


def test_memory_round_trips_as_plain_data() -> None:
    m = PatchMemory(True, {"d_hash_shift": 12}, {"0xffffffff81000010": "eb05"},
                    {"0xffffffff81000020": ("cc0f1f4400", 5.0)})
    assert PatchMemory.from_plain(m.to_plain()) == m
    assert PatchMemory.from_plain({"pinned": True}) == PatchMemory()
    assert PatchMemory.from_plain(None) == PatchMemory()



def test_pinned_without_values_means_the_golden_bytes() -> None:
    """A first check that found `.text` equal to the golden baseline pins without
    running the verifier: later, a runtime constant must still hold the golden value."""
    from scanner.check.patching import verify_text_changes

    sites = replace(SITES, runtime_const=_rc_sites("dentry_hashtable"))
    golden = bytearray(TEXT)           # both sites hold one (golden) value
    patch(golden, SYM["blk_fn"], (0x0123456789ABCDEF).to_bytes(8, "little"))
    live = bytearray(golden)
    for at in (SYM["rc_ptr"] + 2, SYM["blk_fn"]):
        patch(live, at, (0xFFFF888000123000).to_bytes(8, "little"))
    base = 0xFFFFFFFF81000000
    first = verify_text_changes(bytes(golden), bytes(live), base, SLIDE, sites, None)
    only(first, "runtime_const", 2)    # a first check that saw these: pins them
    v = verify_text_changes(bytes(golden), bytes(live), base, SLIDE, sites, None,
                            memory=PatchMemory(pinned=True))
    assert "first check of this boot" in reasons(v) and not v.verified

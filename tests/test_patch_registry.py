"""The registry of patching mechanisms (scanner.check.patching.registry) is the one list:
the events schema enumerates its names, verdicts and reports list mechanisms in its
order, --strict skips exactly its boot-time ones, and each mechanism's sites from the
profile hold every site the verifiers accept for it (on the synthetic .text of
tests/test_patching.py)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from scanner.check.patch_report import PatchReport
from scanner.check.patching import (
    BOOT_TIME,
    MECHANISMS,
    NOP5,
    REGISTRY,
    RETINSN,
    Mechanism,
    VerifiedPatch,
    _Verifier,
)
from scanner.check.patching.registry import by_name
from tests.test_event_schema import SCHEMA, UUID, VALIDATOR, emit_all
from tests.test_patching import SITES, SYM, TEXT, check, patch, rel_insn


def _schema_enums() -> list[list[str]]:
    """Every enum of mechanism names in the schema: `mechanisms` keys, `sites[].mechanism`."""
    out: list[list[str]] = []

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "mechanisms" and isinstance(v, dict):
                    out.append(v["propertyNames"]["enum"])
                if k == "mechanism" and isinstance(v, dict):
                    out.append(v["enum"])
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(SCHEMA)
    return out


def test_the_schema_enumerates_the_registry() -> None:
    enums = _schema_enums()
    # kernel_patched and $defs.patched: keys and site rows; the patch_owner finding
    assert len(enums) == 5
    assert all(e == list(MECHANISMS) for e in enums), enums
    assert list(MECHANISMS) == [m.name for m in REGISTRY]
    assert len(set(MECHANISMS)) == len(MECHANISMS)


def test_the_schema_rejects_a_mechanism_the_registry_does_not_know() -> None:
    ev = next(e for e in emit_all({"vm1": {"uuid": UUID}}) if e["event"] == "kernel_patched")
    assert not list(VALIDATOR.iter_errors(ev))
    bad = json.loads(json.dumps(ev))
    bad["mechanisms"]["inline_hook"] = 1
    assert list(VALIDATOR.iter_errors(bad))
    bad = json.loads(json.dumps(ev))
    bad["sites"][0]["mechanism"] = "inline_hook"
    assert list(VALIDATOR.iter_errors(bad))


def test_boot_time_mechanisms_never_make_a_vm_patched() -> None:
    assert {"smp_lock", "runtime_const"} == BOOT_TIME
    assert {m.name for m in REGISTRY if m.boot_time} == BOOT_TIME
    rep = PatchReport(tuple(VerifiedPatch(m, 0x1000 + i, 0x1000 + i, 0x1001 + i, b"\0", b"\1",
                                          "x") for i, m in enumerate(reversed(MECHANISMS))),
                      (), lambda _va: None)
    # counts (the CLI's lines, the events' `mechanisms`) in registry order
    assert list(rep.counts()) == list(MECHANISMS)
    assert {v.mechanism for v in rep.runtime} == set(MECHANISMS) - BOOT_TIME


def test_each_fixed_site_pass_is_the_verifiers_own_method() -> None:
    for m in REGISTRY:
        assert isinstance(m, Mechanism) and by_name(m.name) is m
        assert m.owner is None    # the seam owner attribution fills
        if m.verify is not None:
            name = m.verify.__name__
            assert name.startswith("do_") and getattr(_Verifier, name) is m.verify, m.name
    assert {m.name for m in REGISTRY if m.verify is None} == {"kprobe", "optprobe"}


def test_sites_from_the_profile_hold_every_verified_site() -> None:
    live = bytearray(TEXT)
    patch(live, SYM["ftrace_a"], rel_insn(b"\xe8", SYM["ftrace_a"], SYM["ftrace_caller"]))
    patch(live, SYM["ftrace_call"],
          rel_insn(b"\xe8", SYM["ftrace_call"], SYM["ftrace_ops_list_func"]))
    patch(live, SYM["jl5"], rel_insn(b"\xe9", SYM["jl5"], SYM["jl5_target"]))
    patch(live, SYM["jl2"], bytes([0xEB, SYM["jl2_target"] - (SYM["jl2"] + 2)]))
    patch(live, SYM["sc_call"], NOP5)
    patch(live, SYM["__SCT__k1"], RETINSN)
    patch(live, SYM["lock_a"], "3e")
    patch(live, SYM["rc_ptr"] + 2, (0xFFFF888000123000).to_bytes(8, "little"))
    patch(live, SYM["rc_shift"] + 2, "0e")
    patch(live, SYM["probe_b"], "cc")
    v = check(live)
    assert v.clean, v.unverified
    summary = v.summary()
    assert list(summary) == [m for m in MECHANISMS if m != "optprobe"]
    fixed = {m.name: set(m.sites(SITES).tolist()) for m in REGISTRY}
    for p in v.verified:
        if by_name(p.mechanism).verify is not None:
            assert p.site in fixed[p.mechanism], (p.mechanism, hex(p.site))
        else:       # a probe sits at no fixed site of any mechanism
            assert not fixed[p.mechanism]
            assert all(p.site not in s for s in fixed.values())
    assert SYM["ftrace_call"] in fixed["ftrace"] and SYM["__SCT__k1"] in fixed["static_call"]
    assert len(fixed["ftrace"]) > np.unique(SITES.ftrace).size
    assert fixed["smp_lock"].isdisjoint(fixed["ftrace"])

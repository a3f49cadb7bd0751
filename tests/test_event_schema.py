"""Events for SIEMs: every event carries host, severity and (where the VM has one) uuid,
and matches the JSON Schema shipped in kscan/contrib/events.schema.json. (conftest.py also
validates every event the whole suite emits against it.)"""

from __future__ import annotations

import asyncio
import io
import json
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kscan.shipped import contrib_path
from scanner.run.events import SEVERITIES, EventSink, severity

SCHEMA = json.loads(contrib_path("events.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
UUID = "6a1f0e3c-2b7d-4c9e-8f00-0123456789ab"
MISMATCH = {"region": ".text", "page": 5, "va": "0xffffffff9a005000", "gpa": "0x1005000",
            "basis": "golden", "symbol": "vfs_read+0x10",
            "ranges": [{"start": 16, "end": 21, "before": "0f1f440000",
                        "after": "e911223344", "kind": "code overwritten with a jmp (inline "
                        "hook?)", "code": "inline_hook"}]}
FINDING = {"kind": "idt_handler_outside_text", "vector": 14, "handler": "0xffffc90000a01000",
           "message": "IDT gate 14 handler 0xffffc90000a01000 is outside kernel text"}
SOURCES = {"qmp": ["/run/vm1/qmp.sock"], "discover": False, "replay": [], "libvirt": None}
PATCHED = {"mechanisms": {"ftrace": 35053, "jump_label": 4}, "pages": 2363,
           "in_progress": 0, "more": 0,
           "sites": [{"mechanism": "jump_label", "symbol": "__schedule", "count": 1}]}

EXAMPLES: list[tuple[str, str | None, dict[str, Any]]] = [
    ("kscan_started", None, {"version": "0.1.0", "policy": "interval auto",
                             "on_tamper": "report", "strict": False, "forensics_dir": "/f",
                             "sources": SOURCES}),
    ("vm_found", "vm1", {"source": "/run/vm1/qmp.sock", "kind": "qmp"}),
    ("vm_unreachable", None, {"source": "/run/x.sock", "message": "no such socket",
                              "retry_s": 30.0}),
    ("vm_skipped", None, {"pid": 42, "qmp": None, "reason": "no file-backed RAM"}),
    ("vm_booting", "vm1", {"message": "kernel has not finished booting"}),
    ("profile_missing", "vm1", {"message": "no profile", "version": "Linux 6.1",
                                "hint": "kscan profile add"}),
    ("baseline_missing", "vm1", {"message": "no baseline", "hint": "kscan baseline"}),
    ("vm_identified", "vm1", {"build_id": "3b43fad5", "release": "6.1.0", "slide": "0x1e000000",
                              "boot_profile": "qemu64/ab", "per_vm_baseline_taken": True}),
    ("vm_clean", "vm1", {"per_vm_baseline_taken": True, "regions": {
        ".text": {"pages": 3586, "golden_checked": 3586, "per_boot_checked": 0,
                  "accepted": 0}}}),
    ("kernel_patched", "vm1", {"build_id": "3b43fad5", "slide": "0x1e000000", **PATCHED}),
    ("tamper", "vm1", {"action": "pause", "forensics": "/f/vm1/x", "build_id": "3b43fad5",
                       "slide": "0x1e000000", "seen_at": 1.0, "hint": None,
                       "mismatches": [MISMATCH], "mismatches_total": 1, "ranges_total": 1,
                       "findings": [FINDING], "findings_total": 1, "patched": None}),
    ("action", "vm1", {"action": "pause", "ok": True, "run_state": "paused"}),
    ("action", "vm1", {"action": "exec:/bin/false", "ok": False, "exit_code": 1,
                       "stderr": ""}),
    ("forensics_failed", "vm1", {"forensics": "/f/vm1/x", "message": "read-only", "hint": None}),
    ("tamper_cleared", "vm1", {"message": "VM matches its baselines again"}),
    ("vm_rebooted", "vm1", {"slide": "0x2e000000"}),
    ("vm_lost", "vm1", {"reason": "QMP closed"}),
    ("error", "vm1", {"source": "/run/vm1/qmp.sock", "message": "boom", "hint": "retried",
                      "retry_s": 2.0}),
    ("pruned", None, {"events": 10, "forensic_copies": 1}),
    ("stats", None, {"vms": 1, "watching": 1, "scans": 10, "keyed_scans": 1,
                     "keyed_every_s": 300.0, "cpu_percent": 9.9, "scan_cpu_percent": 8.5,
                     "period_s": 5.0, "period_factor": 1.0, "dropped": 0}),
    ("tamper_transient", "vm1", {"build_id": "3b43fad5", "slide": "0x1e000000", "seen_at": 1.0,
                                 "confirm_delay": 0.3, "second_look": "clean",
                                 "message": "gone on a second look",
                                 "mismatches": [MISMATCH], "mismatches_total": 1,
                                 "ranges_total": 1, "findings": [], "findings_total": 0,
                                 "patched": PATCHED}),
    ("kscan_stopped", None, {"scans": 10}),
    ("reloaded", None, {"version": "0.1.0", "policy": "interval auto", "on_tamper": "report",
                        "strict": False, "forensics_dir": "/f", "sources": SOURCES,
                        "changed": ["qmp"], "restart_needed": [], "dropped": [], "profiles": 1}),
    ("module_loaded", "vm1", {"name": "kscan_benign", "address": "0xffffffffc03d2000",
                              "state": "live", "sig_ok": False, "taints": 0x3000,
                              "taint": "OE", "initial": False,
                              "text": [{"kind": "text", "base": "0xffffffffc03d0000",
                                        "size": 0x1000}]}),
    ("module_unloaded", "vm1", {"name": "kscan_benign", "address": "0xffffffffc03d2000"}),
    ("module_list_broken", "vm1", {"problems": ["cycle: node 0xffffffffc0002008 seen twice"],
                                   "modules_read": 2, "reads": 3}),
    ("slow_paced", "vm1", {"wait_s": 12.5, "level_cpu_s": 1.06, "allowance_cpu_s": 0.75,
                           "share": 0.25, "pending": "the check of a change it made (.text)",
                           "message": "this VM's checks used more than their share"}),
]
#: Event types only the database's log holds (written by one-shot commands).
LOGGED_ONLY = {"baseline", "check", "accepted", "exported", "imported"}
#: Logged by `kscan baseline rm` / `profile rm` (tests/test_operator.py validates them).
REMOVALS = {"baseline_removed", "profile_removed"}


def emit_all(labels: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    out = io.BytesIO()

    async def go() -> None:
        sink = EventSink(out)
        sink.labels.update(labels or {})
        sink.start()
        for event, vm, fields in EXAMPLES:
            await sink.emit(event, vm, **fields)
        await sink.close()

    asyncio.run(go())
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_every_event_type_matches_the_schema_and_carries_host_and_severity() -> None:
    events = emit_all({"vm1": {"uuid": UUID}})
    assert len(events) == len(EXAMPLES)
    for ev in events:
        errors = [e.message for e in VALIDATOR.iter_errors(ev)]
        assert errors == [], (ev["event"], errors)
        assert ev["host"] == socket.gethostname()
        assert ev["severity"] in SEVERITIES
        assert ("uuid" in ev) == (ev["vm"] == "vm1"), ev
    by = {(e["event"], e.get("ok")): e["severity"] for e in events}
    assert by[("tamper", None)] == "critical"
    assert by[("tamper_transient", None)] == "critical"
    assert by[("action", False)] == "warning" and by[("action", True)] == "notice"
    assert by[("vm_lost", None)] == "warning" and by[("kernel_patched", None)] == "notice"
    assert by[("stats", None)] == "info"
    assert by[("module_loaded", None)] == "warning"        # unsigned
    assert by[("module_unloaded", None)] == "notice"
    assert severity("module_loaded", {"sig_ok": True}) == "notice"
    # Every type the schema knows is exercised here.
    assert {e["event"] for e in events} == set(SCHEMA["properties"]["event"]["enum"]) - REMOVALS - \
        LOGGED_ONLY


@pytest.mark.parametrize("broken", [
    {"event": "tamper", "mismatches": "all of them"},
    {"event": "tamper", "severity": "info"},
    {"event": "tamper_transient", "severity": "warning"},
    {"event": "tamper_transient", "second_look": "maybe"},
    {"event": "vm_found", "kind": "carrier-pigeon"},
    {"event": "no_such_event"},
    {"host": ""},
    {"uuid": "not-a-uuid"},
    {"ts": "yesterday"},
])
def test_the_schema_catches_malformed_events(broken: dict[str, Any]) -> None:
    base = dict(emit_all({"vm1": {"uuid": UUID}})[10])  # the tamper event
    assert not list(VALIDATOR.iter_errors(base))
    base.update(broken)
    assert list(VALIDATOR.iter_errors(base)), broken


def test_missing_required_field_is_caught() -> None:
    ev = dict(emit_all()[7])  # vm_identified
    del ev["slide"]
    assert any("slide" in e.message for e in VALIDATOR.iter_errors(ev))


def test_severity_of_unknown_types_is_info() -> None:
    assert severity("something_new", {}) == "info"


@pytest.mark.parametrize(("where", "extra"), [
    ([], {"surprise": 1}),                                   # an undocumented field
    (["mismatches", 0], {"surprise": 1}),                    # in an item
    (["mismatches", 0, "ranges", 0], {"surprise": 1}),
    (["findings", 0], {"surprise": 1}),
])
def test_the_schema_is_exact(where: list[Any], extra: dict[str, Any]) -> None:
    ev = json.loads(json.dumps(emit_all({"vm1": {"uuid": UUID}})[10]))  # tamper
    target = ev
    for key in where:
        target = target[key]
    target.update(extra)
    assert any("surprise" in e.message for e in VALIDATOR.iter_errors(ev)), where


def test_a_byte_range_without_its_code_is_caught() -> None:
    ev = json.loads(json.dumps(emit_all({"vm1": {"uuid": UUID}})[10]))
    del ev["mismatches"][0]["ranges"][0]["code"]
    assert list(VALIDATOR.iter_errors(ev))


def test_events_only_the_log_holds_match_the_schema(tmp_path: Path) -> None:
    """baseline, check, accepted, exported, imported — written by one-shot commands on
    replayed synthetic VMs (one tampered, so check reports mismatches) — as the log
    returns them."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from scanner.commands.bundles import export_bundle, import_bundle
    from scanner.commands.oneshot import accept_vm, check_vm
    from store import Store
    from tests.test_bundle import write_private, write_public
    from tests.test_ops import make_vm, tamper
    from tests.test_unit_watcher import golden_db

    db = golden_db(tmp_path)
    mem = make_vm(tmp_path / "vms" / "t1", "t1")
    tamper(mem)
    key = Ed25519PrivateKey.generate()
    priv = write_private(tmp_path / "k.pem", key)
    pub = write_public(tmp_path / "k.pub", key)

    async def go() -> list[dict[str, Any]]:
        src = f"replay:{tmp_path / 'vms' / 't1'}"
        report = await check_vm(src, str(db))
        assert report.tampered and report.mismatches
        await accept_vm(src, str(db), "ticket 42")
        await export_bundle(tmp_path / "b.kscan", priv, str(db))
        await import_bundle(tmp_path / "b.kscan", pub, str(tmp_path / "other.db"))
        rows = []
        for path in (db, tmp_path / "other.db"):
            async with Store.open(path) as st:
                rows += [{"ts": r.ts, "event": r.event, "vm": r.vm, **r.detail}
                         for r in await st.events()]
        return rows

    rows = asyncio.run(go())
    assert {r["event"] for r in rows} == LOGGED_ONLY
    for row in rows:
        errors = [f"{list(e.path)}: {e.message}" for e in VALIDATOR.iter_errors(row)]
        assert errors == [], (row["event"], errors)


def test_the_schema_knows_every_basis_and_finding_kind() -> None:
    """The enums of the item shapes are the product's own values (a live tamper on a
    per-boot page once carried a basis the schema spelled differently)."""
    import ast

    from scanner.check.verify import Basis

    defs = SCHEMA["$defs"]
    assert defs["mismatch"]["properties"]["basis"]["enum"] == [b.value for b in Basis]
    tree = ast.parse((Path(__file__).resolve().parent.parent / "scanner" / "check" /
                      "verify.py").read_text())
    kinds = {n.args[0].value for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "Finding" and n.args and isinstance(n.args[0], ast.Constant)}
    # The executable-memory findings: (kind, message, detail) tuples of exec_findings.
    exec_tree = ast.parse((Path(__file__).resolve().parent.parent / "scanner" / "check" /
                           "execmem.py").read_text())
    kinds |= {n.elts[0].value for n in ast.walk(exec_tree)
              if isinstance(n, ast.Tuple) and len(n.elts) == 3
              and isinstance(n.elts[0], ast.Constant) and isinstance(n.elts[0].value, str)
              and n.elts[0].value.startswith(("unowned_", "exec_"))}
    assert kinds == set(defs["finding"]["properties"]["kind"]["enum"])

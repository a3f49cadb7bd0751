"""Events for SIEMs: every event carries host, severity and (where the VM has one) uuid,
and matches the JSON Schema shipped in contrib/events.schema.json. (conftest.py also
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

from scanner.run.events import SEVERITIES, EventSink, severity

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "contrib" /
                     "events.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
UUID = "6a1f0e3c-2b7d-4c9e-8f00-0123456789ab"
MISMATCH = {"region": ".text", "page": 5, "va": 0xFFFFFFFF9A005000, "gpa": 0x1005000,
            "basis": "golden", "symbol": "vfs_read+0x10",
            "ranges": [{"start": 16, "end": 21, "before": "0f1f440000",
                        "after": "e911223344", "kind": "not a patch site"}]}
PATCHED = {"mechanisms": {"ftrace": 35053, "jump_label": 4}, "pages": 2363,
           "in_progress": 0, "more": 0,
           "sites": [{"mechanism": "jump_label", "symbol": "__schedule", "count": 1}]}

EXAMPLES: list[tuple[str, str | None, dict[str, Any]]] = [
    ("kscan_started", None, {"version": "0.1.0", "policy": "interval auto",
                             "on_tamper": "report", "strict": False, "forensics_dir": "/f",
                             "sources": {"qmp": []}}),
    ("vm_found", "vm1", {"source": "/run/vm1/qmp.sock", "kind": "qmp"}),
    ("vm_unreachable", None, {"source": "/run/x.sock", "message": "no such socket",
                              "retry_s": 30.0}),
    ("vm_skipped", None, {"pid": 42, "qmp": None, "reason": "no file-backed RAM"}),
    ("vm_booting", "vm1", {"message": "kernel has not finished booting"}),
    ("profile_missing", "vm1", {"message": "no profile", "version": "Linux 6.1",
                                "hint": "kscan profile add"}),
    ("baseline_missing", "vm1", {"message": "no baseline", "hint": "kscan baseline"}),
    ("vm_identified", "vm1", {"build_id": "3b43fad5", "release": "6.1.0", "slide": 0x1E000000,
                              "boot_profile": "qemu64/ab", "per_vm_baseline_taken": True}),
    ("vm_clean", "vm1", {"per_vm_baseline_taken": True, "regions": {}}),
    ("kernel_patched", "vm1", {"build_id": "3b43fad5", "slide": 0x1E000000, **PATCHED}),
    ("tamper", "vm1", {"action": "pause", "forensics": "/f/vm1/x", "build_id": "3b43fad5",
                       "slide": 0x1E000000, "seen_at": 1.0, "hint": None,
                       "mismatches": [MISMATCH], "mismatches_total": 1, "ranges_total": 1,
                       "findings": [], "findings_total": 0, "patched": None}),
    ("action", "vm1", {"action": "pause", "ok": True, "run_state": "paused"}),
    ("action", "vm1", {"action": "exec:/bin/false", "ok": False, "exit_code": 1,
                       "stderr": ""}),
    ("forensics_failed", "vm1", {"forensics": "/f/vm1/x", "message": "read-only", "hint": None}),
    ("tamper_cleared", "vm1", {"message": "VM matches its baselines again"}),
    ("vm_rebooted", "vm1", {"slide": 0x2E000000}),
    ("vm_lost", "vm1", {"reason": "QMP closed"}),
    ("error", "vm1", {"source": "/run/vm1/qmp.sock", "message": "boom", "hint": "retried",
                      "retry_s": 2.0}),
    ("pruned", None, {"events": 10, "forensic_copies": 1}),
    ("stats", None, {"vms": 1, "watching": 1, "scans": 10, "cpu_percent": 9.9,
                     "period_s": 5.0, "dropped": 0}),
    ("tamper_transient", "vm1", {"build_id": "3b43fad5", "slide": 0x1E000000, "seen_at": 1.0,
                                 "confirm_delay": 0.3, "second_look": "clean",
                                 "message": "gone on a second look",
                                 "mismatches": [MISMATCH], "mismatches_total": 1,
                                 "ranges_total": 1, "findings": [], "findings_total": 0,
                                 "patched": PATCHED}),
    ("kscan_stopped", None, {"scans": 10}),
    ("module_loaded", "vm1", {"name": "kscan_benign", "address": 0xFFFFFFFFC03D2000,
                              "state": "live", "sig_ok": False, "taints": 0x3000,
                              "taint": "OE", "initial": False,
                              "text": [{"kind": "text", "base": 0xFFFFFFFFC03D0000,
                                        "size": 0x1000}]}),
    ("module_unloaded", "vm1", {"name": "kscan_benign", "address": 0xFFFFFFFFC03D2000}),
    ("module_list_broken", "vm1", {"problems": ["cycle: node 0xffffffffc0002008 seen twice"],
                                   "modules_read": 2, "reads": 3}),
]


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
    assert {e["event"] for e in events} == set(SCHEMA["properties"]["event"]["enum"]) - {
        "reloaded"}


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

"""`--event-format ecs|ocsf`: every event kscan emits, mapped to ECS 8.x and OCSF 1.5,
has the published schemas' required fields and allowed values (vendored minimal
schemas in kscan/contrib/siem/, their source in each file's $comment); a tamper is an ECS
alert / an OCSF Detection Finding with the hypervisor host as observer and the guest as
host; and `kscan run --event-format` prints them (a replayed VM tampered with)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kscan.shipped import contrib_path
from scanner.run.formats import EVENT_FORMATS, format_event, formatter, to_ecs, to_ocsf
from tests.test_event_schema import EXAMPLES, UUID, emit_all
from tests.test_ops import fleet, tamper  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent
ECS = jsonschema.Draft202012Validator(json.loads(
    contrib_path("siem/ecs-8.17.required.schema.json").read_text()))
OCSF = jsonschema.Draft202012Validator(json.loads(
    contrib_path("siem/ocsf-1.5.0.required.schema.json").read_text()))

#: Events only the database's log holds, as stored (vm "", no severity, no host).
LOGGED = [
    {"ts": 1.5, "event": "baseline", "vm": "golden1", "build_id": "3b43", "boot_profile": "q/a",
     "boots": 1, "slide": "0x1e000000", "per_boot_pages": {}},
    {"ts": 1.5, "event": "check", "vm": "vm7", "result": "clean", "regions": []},
    {"ts": 1.5, "event": "accepted", "vm": "vm7", "pages": [], "note": "",
     "boot_profile": "q/a", "build_id": "3b43"},
    {"ts": 1.5, "event": "exported", "vm": "", "path": "/b", "profiles": 1, "goldens": 1},
    {"ts": 1.5, "event": "imported", "vm": "", "path": "/b", "profiles": 1, "goldens": 1},
]


def all_events() -> list[dict[str, Any]]:
    return emit_all({"vm1": {"uuid": UUID}}) + LOGGED


def errors(validator: jsonschema.Draft202012Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_every_event_as_ecs_has_the_required_fields_and_allowed_values() -> None:
    events = all_events()
    assert {e["event"] for e in events} >= {x[0] for x in EXAMPLES}
    for ev in events:
        doc = to_ecs(ev)
        assert not errors(ECS, doc), (ev["event"], errors(ECS, doc))
        assert doc["event"]["action"] == ev["event"]
        assert doc["observer"]["type"] == "hypervisor" and doc["observer"]["hostname"]
        assert ("host" in doc) == bool(ev["vm"])  # the guest, when there is one
        json.dumps(doc)  # plain JSON


def test_every_event_as_ocsf_has_the_required_attributes() -> None:
    for ev in all_events():
        doc = to_ocsf(ev)
        assert not errors(OCSF, doc), (ev["event"], errors(OCSF, doc))
        assert doc["type_uid"] == doc["class_uid"] * 100 + doc["activity_id"]
        assert doc["time"] == int(ev["ts"] * 1000)
        assert doc["unmapped"]["kscan"]["event"] == ev["event"]  # nothing lost
        json.dumps(doc)


def test_a_tamper_is_an_ecs_alert_on_the_guest_observed_by_the_hypervisor() -> None:
    ev = next(e for e in emit_all({"vm1": {"uuid": UUID}}) if e["event"] == "tamper")
    doc = to_ecs(ev)
    assert doc["event"]["kind"] == "alert"
    assert "intrusion_detection" in doc["event"]["category"]
    assert doc["host"] == {"name": "vm1", "type": "virtual_machine", "id": UUID}
    assert doc["observer"]["hostname"] == ev["host"]
    assert doc["log"]["level"] == "critical" and doc["event"]["severity"] == 2
    assert doc["kscan"]["mismatches"] == ev["mismatches"]
    assert doc["message"].startswith("vm1: TAMPERED")
    # Nothing else is an alert.
    assert all(to_ecs(e)["event"]["kind"] != "alert" for e in all_events()
               if e["event"] != "tamper")


def test_a_tamper_is_an_ocsf_detection_finding_closed_by_tamper_cleared() -> None:
    events = emit_all({"vm1": {"uuid": UUID}})
    found = to_ocsf(next(e for e in events if e["event"] == "tamper"))
    assert (found["class_uid"], found["category_uid"], found["activity_id"]) == (2004, 2, 1)
    assert found["severity_id"] == 5 and found["is_alert"] is True
    assert found["device"]["name"] == "vm1" and found["device"]["uid"] == UUID
    assert found["device"]["type_id"] == 6  # Virtual
    assert found["metadata"]["loggers"][0]["device"]["hostname"] == events[0]["host"]
    closed = to_ocsf(next(e for e in events if e["event"] == "tamper_cleared"))
    assert (closed["class_uid"], closed["activity_id"], closed["status_id"]) == (2004, 3, 4)
    assert closed["finding_info"]["uid"] == found["finding_info"]["uid"]
    started = to_ocsf(next(e for e in events if e["event"] == "kscan_started"))
    assert (started["class_uid"], started["activity_id"]) == (6002, 3)


def test_native_is_the_event_itself_and_unknown_formats_are_refused() -> None:
    ev = all_events()[0]
    assert format_event(ev, "native") == ev
    assert EVENT_FORMATS == ("native", "ecs", "ocsf")
    with pytest.raises(ValueError, match="unknown event format"):
        formatter("cef")


def test_a_malformed_logged_event_still_maps() -> None:
    """A row of the event log written by another version: odd types, missing fields."""
    for ev in ({"event": "tamper", "vm": 3, "ts": "x", "mismatches": "no"}, {}):
        assert not errors(ECS, to_ecs(ev))
        assert not errors(OCSF, to_ocsf(ev))


@pytest.mark.parametrize("fmt", ["ecs", "ocsf"])
def test_run_prints_the_format(fleet: dict[str, Any], fmt: str) -> None:  # noqa: F811
    proc = subprocess.Popen(
        [sys.executable, "-m", "scanner", "run", "--replay", str(fleet["tmp"] / "vms" / "*"),
         "--interval", "0.2", "--cpu-budget", "100", "--db", str(fleet["db"]),
         "--event-format", fmt], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    lines: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def wait(pred: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for doc in list(lines):
                if pred(doc):
                    return doc
            time.sleep(0.05)
        raise AssertionError(f"not seen in {len(lines)} lines")

    action = (lambda d: d["event"]["action"]) if fmt == "ecs" else (
        lambda d: d["metadata"]["event_code"])
    try:
        wait(lambda d: action(d) == "vm_clean")
        tamper(fleet["mems"]["ops1"])
        alert = wait(lambda d: action(d) == "tamper")
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(10)
    for doc in lines:
        assert not errors(ECS if fmt == "ecs" else OCSF, doc), doc
    if fmt == "ecs":
        assert alert["event"]["kind"] == "alert" and alert["host"]["name"] == "ops1"
    else:
        assert alert["class_uid"] == 2004 and alert["device"]["name"] == "ops1"


@pytest.mark.parametrize("fmt", ["ecs", "ocsf"])
def test_events_command_replays_the_log_in_a_siem_format(tmp_path: Path, fmt: str) -> None:
    """`kscan events --event-format ecs|ocsf`: every logged event (those `run` wrote and
    those only one-shot commands log) as one valid document per line, filters applied
    to the native event, the log id kept."""
    import asyncio

    from store import Store
    from tests.kscan_proc import kscan

    db = tmp_path / "k.db"
    logged = [ev for ev in all_events() if ev["event"] != "stats"]  # never logged

    async def fill() -> None:
        async with Store.open(db) as st:
            for ev in logged:
                await st.append_event({**ev, "vm": ev["vm"] or ""})

    asyncio.run(fill())
    res = kscan("events", "--db", str(db), "-n", "1000", "--event-format", fmt, timeout=60)
    assert res.returncode == 0, res.stderr
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(docs) == len(logged)
    validator = ECS if fmt == "ecs" else OCSF
    for doc in docs:
        assert not errors(validator, doc), errors(validator, doc)
    if fmt == "ecs":
        assert [d["event"]["action"] for d in docs] == [e["event"] for e in logged]
        assert all(isinstance(d["kscan"]["id"], int) for d in docs), docs[0]
    else:
        assert [d["unmapped"]["kscan"]["event"] for d in docs] == [e["event"] for e in logged]
        assert all(isinstance(d["unmapped"]["kscan"]["id"], int) for d in docs)
    res = kscan("events", "--db", str(db), "--severity", "critical", "--event-format", fmt,
                timeout=60)
    crit = [json.loads(line) for line in res.stdout.splitlines()]
    want = [e for e in logged if e.get("severity") == "critical"
            or (e["event"] == "check" and e.get("result") == "tampered")]
    assert want and len(crit) == len(want)

"""Event formats a SIEM ingests without a custom parser: `--event-format native|ecs|ocsf`.

Pure mappings of one native event (the dict `EventSink.emit` builds, or a row of the
database's event log) to another shape; nothing here does I/O. `native` is kscan's own
shape (kscan/contrib/events.schema.json, installed with the package: `kscan
--contrib-dir`). The others keep every native field, so nothing is lost in translation:

* `ecs` — Elastic Common Schema 8.x (`ecs.version` 8.17.0). `@timestamp` (ISO 8601,
  UTC), `message` (the one-line summary kscan logs), `event.{kind, category, type,
  action, severity, outcome, module, dataset}`, `log.level` (kscan's severity). The
  machine kscan runs on is the `observer` (type `hypervisor`); the guest VM is the
  `host` (`host.name` the VM's name, `host.id` its UUID). A `tamper` is
  `event.kind: alert`, `event.category: [intrusion_detection, host]`, with
  `rule.name` kernel-integrity. The native fields are under `kscan.*` (a custom
  field set, as ECS asks of fields it does not define).
* `ocsf` — Open Cybersecurity Schema Framework 1.5.0. A `tamper` is a Detection Finding
  (class_uid 2004, activity Create, severity Critical, `is_alert`), `tamper_cleared`
  the same finding closed (activity Close, status Resolved); one finding per VM
  (`finding_info.uid` = kscan:HOST:VM). kscan starting and stopping is Application
  Lifecycle (6002, Start/Stop); every other event a Base Event (class_uid 0, activity
  Other, `activity_name` the native event type). The guest is `device` (type Virtual,
  `hypervisor` QEMU) and the monitoring host is the one `metadata.loggers` entry; the
  native event is in `unmapped`.

Severity: kscan's critical/warning/notice/info are ECS `event.severity` 2/4/5/6
(syslog levels, the convention ECS suggests) and OCSF `severity_id` 5/3/2/1.
`kscan events` (reading the database's log) calls `format_event` with the same names.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from kscan import __version__
from scanner.run.events import HOST, human, severity

__all__ = ["ECS_VERSION", "EVENT_FORMATS", "OCSF_VERSION", "format_event", "formatter",
           "to_ecs", "to_ocsf"]

ECS_VERSION = "8.17.0"
OCSF_VERSION = "1.5.0"
EVENT_FORMATS = ("native", "ecs", "ocsf")

#: Fields every native event has; the rest is the event type's own.
_COMMON = ("ts", "event", "severity", "host", "vm", "uuid")

_ECS_SEVERITY = {"critical": 2, "warning": 4, "notice": 5, "info": 6}
_OCSF_SEVERITY = {"critical": 5, "warning": 3, "notice": 2, "info": 1}

#: ECS categorization of each event type: (kind, categories, types). Values from the
#: ECS allowed-values lists; anything not listed is a host info event.
_ECS_KIND: dict[str, tuple[str, list[str], list[str]]] = {
    "tamper": ("alert", ["intrusion_detection", "host"], ["info"]),
    "tamper_cleared": ("event", ["intrusion_detection", "host"], ["info"]),
    "kernel_patched": ("event", ["host"], ["change"]),
    "vm_found": ("event", ["host"], ["start"]),
    "vm_identified": ("event", ["host"], ["info"]),
    "vm_rebooted": ("event", ["host"], ["start"]),
    "vm_lost": ("event", ["host"], ["end"]),
    "action": ("event", ["host"], ["change"]),
    "kscan_started": ("event", ["process"], ["start"]),
    "kscan_stopped": ("event", ["process"], ["end"]),
    "reloaded": ("event", ["configuration"], ["change"]),
    "stats": ("metric", ["host"], ["info"]),
    "accepted": ("event", ["configuration"], ["change"]),
    "baseline": ("event", ["configuration"], ["creation"]),
    "imported": ("event", ["configuration"], ["creation"]),
    "exported": ("event", ["configuration"], ["info"]),
}


def _native(ev: dict[str, Any]) -> tuple[str, str, str, str | None, str | None, float]:
    """(event, severity, host, vm, uuid, ts) of a native event, filled in for the
    database-only events that carry no severity or host (and `vm: ""`)."""
    kind = str(ev.get("event", ""))
    fields = {k: v for k, v in ev.items() if k not in _COMMON}
    sev = str(ev.get("severity") or severity(kind, fields))
    vm = ev.get("vm") or None
    uuid = ev.get("uuid")
    ts = ev.get("ts")
    return (kind, sev, str(ev.get("host") or HOST), str(vm) if vm else None,
            str(uuid) if uuid else None, float(ts) if isinstance(ts, int | float) else 0.0)


def _own(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k not in _COMMON}


def _summary(ev: dict[str, Any], kind: str, vm: str | None) -> str:
    try:
        return human({**ev, "event": kind, "vm": vm})
    except (KeyError, TypeError, IndexError, ValueError, AttributeError):  # malformed
        return f"{vm or ''}: {kind}".lstrip(": ")


def _iso(ts: float) -> str:
    t = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def to_ecs(ev: dict[str, Any]) -> dict[str, Any]:
    """One native event as an ECS 8.x document."""
    kind, sev, host, vm, uuid, ts = _native(ev)
    ekind, categories, types = _ECS_KIND.get(kind, ("event", ["host"], ["info"]))
    event: dict[str, Any] = {"kind": ekind, "category": categories, "type": types,
                             "action": kind, "severity": _ECS_SEVERITY.get(sev, 6),
                             "module": "kscan", "dataset": "kscan.events",
                             "created": _iso(ts)}
    if kind == "action" and isinstance(ev.get("ok"), bool):
        event["outcome"] = "success" if ev["ok"] else "failure"
    elif kind in ("error", "vm_unreachable", "forensics_failed"):
        event["outcome"] = "failure"
    doc: dict[str, Any] = {
        "@timestamp": _iso(ts),
        "ecs": {"version": ECS_VERSION},
        "message": _summary(ev, kind, vm),
        "event": event,
        "log": {"level": sev},
        "observer": {"hostname": host, "name": host, "type": "hypervisor",
                     "vendor": "kscan", "product": "kscan", "version": __version__},
        "kscan": _own(ev),
    }
    if vm is not None:
        doc["host"] = {"name": vm, "type": "virtual_machine", **({"id": uuid} if uuid else {})}
    if kind == "tamper":
        doc["rule"] = {"name": "kernel-integrity", "category": "kernel tampering",
                       "description": "the guest kernel's protected memory (.text, "
                                      ".rodata, __ex_table, IDT) or control state differs "
                                      "from its verified baseline"}
        doc["tags"] = ["kernel-integrity"]
    return doc


def _product() -> dict[str, Any]:
    return {"name": "kscan", "vendor_name": "kscan", "version": __version__}


def _device(vm: str, uuid: str | None) -> dict[str, Any]:
    dev: dict[str, Any] = {"type_id": 6, "type": "Virtual", "name": vm, "hostname": vm,
                           "hypervisor": "QEMU"}
    if uuid:
        dev["uid"] = uuid
    return dev


def to_ocsf(ev: dict[str, Any]) -> dict[str, Any]:
    """One native event as an OCSF 1.5.0 event (see the module docstring for classes)."""
    kind, sev, host, vm, uuid, ts = _native(ev)
    sev_id = _OCSF_SEVERITY.get(sev, 1)
    if kind in ("tamper", "tamper_cleared"):
        class_uid, category_uid, class_name, category_name = 2004, 2, "Detection Finding", \
            "Findings"
        activity_id, activity = (1, "Create") if kind == "tamper" else (3, "Close")
    elif kind in ("kscan_started", "kscan_stopped"):
        class_uid, category_uid, class_name, category_name = 6002, 6, \
            "Application Lifecycle", "Application Activity"
        activity_id, activity = (3, "Start") if kind == "kscan_started" else (4, "Stop")
    else:
        class_uid, category_uid, class_name, category_name = 0, 0, "Base Event", \
            "Uncategorized"
        activity_id, activity = 99, kind
    out: dict[str, Any] = {
        "class_uid": class_uid, "class_name": class_name,
        "category_uid": category_uid, "category_name": category_name,
        "activity_id": activity_id, "activity_name": activity,
        "type_uid": class_uid * 100 + activity_id,
        "type_name": f"{class_name}: {activity}",
        "time": int(ts * 1000), "severity_id": sev_id,
        "severity": {5: "Critical", 3: "Medium", 2: "Low", 1: "Informational"}[sev_id],
        "message": _summary(ev, kind, vm),
        "metadata": {"version": OCSF_VERSION, "product": _product(), "event_code": kind,
                     "loggers": [{"name": "kscan", "product": _product(),
                                  "device": {"type_id": 1, "type": "Server",
                                             "hostname": host, "name": host}}]},
        "unmapped": {"kscan": {k: v for k, v in ev.items() if k != "ts"}},
    }
    if vm is not None:
        out["device"] = _device(vm, uuid)
    if class_uid == 2004:
        out["finding_info"] = {
            "uid": f"kscan:{host}:{uuid or vm or ''}",
            "title": ("Guest kernel tampered with" if kind == "tamper"
                      else "Guest kernel matches its baselines again"),
            "desc": out["message"],
            "types": ["kernel-integrity"],
        }
        out["status_id"], out["status"] = (1, "New") if kind == "tamper" else (4, "Resolved")
        out["is_alert"] = kind == "tamper"
        if kind == "tamper":
            seen = ev.get("seen_at")
            out["finding_info"]["first_seen_time"] = int(
                (seen if isinstance(seen, int | float) else ts) * 1000)
    if class_uid == 6002:
        out["app"] = _product()
    return out


def format_event(ev: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A native event in format `fmt` (one of `EVENT_FORMATS`)."""
    return formatter(fmt)(ev)


def formatter(fmt: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    if fmt == "native":
        return dict
    if fmt == "ecs":
        return to_ecs
    if fmt == "ocsf":
        return to_ocsf
    raise ValueError(f"unknown event format {fmt!r} (one of {', '.join(EVENT_FORMATS)})")

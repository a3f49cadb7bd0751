"""`kscan run --metrics HOST:PORT|unix:PATH`: the engine's state as Prometheus metrics.

Scrapes are answered in threads of their own (`scanner.run.metrics_http`: a cached
page rebuilt at most once a second, paced requests, the threads' CPU exempt from the
scan budget — scraping never delays a scan), rendered by prometheus-client from a
registry of kscan's own (not the library's global one: no process or GC collectors
mixed in, nothing registered twice in tests). Its one collector never touches the
engine from a thread: each rebuild asks the event loop for a `Snapshot` (built there,
between two tasks, in well under a millisecond for hundreds of VMs) and waits for it
at most `SNAPSHOT_TIMEOUT` seconds. A loop that does not answer in time (wedged, or
busy beyond reason) gets the previous snapshot served, and `kscan_metrics_stale` says
so — the scrape itself never waits long and never blocks the loop.

Metrics are listed in the README ("Metrics").
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kscan import __version__
from kscan.errors import KscanError
from scanner.run.events import EventSink
from scanner.run.scheduler import Scheduler
from scanner.run.watcher import VmWatcher, WatchState

if TYPE_CHECKING:
    import asyncio

    from prometheus_client.registry import Collector

__all__ = ["MetricsServer", "Observed", "Snapshot", "VmTotals", "parse_address", "snapshot"]

log = logging.getLogger("kscan.metrics")

SNAPSHOT_TIMEOUT = 2.0


class MetricsError(KscanError):
    """--metrics cannot be served."""


@dataclass
class VmTotals:
    """What earlier watchers of a VM (by name) counted, so that per-VM counters keep
    growing across a re-attach."""
    scans: int = 0
    verified_at: float | None = None


class Observed(Protocol):
    """What the metrics read of the engine (`scanner.run.engine.Engine`)."""

    @property
    def scheduler(self) -> Scheduler: ...
    @property
    def sink(self) -> EventSink: ...
    @property
    def watchers(self) -> Mapping[str, VmWatcher | None]: ...
    @property
    def vm_totals(self) -> Mapping[str, VmTotals]: ...
    @property
    def vm_events(self) -> Mapping[str, Mapping[str, int]]: ...
    @property
    def started_at(self) -> float: ...
    @property
    def scans(self) -> int: ...
    @property
    def keyed_scans(self) -> int: ...
    @property
    def reloads(self) -> int: ...
    @property
    def ready(self) -> bool: ...


@dataclass(frozen=True)
class VmRow:
    vm: str
    state: str
    scans: int
    tampers: int
    patches: int
    last_verified: float | None
    cost: float
    interval: float
    tampered: bool


@dataclass(frozen=True)
class Snapshot:
    taken: float  # Unix time
    start_time: float
    period: float
    period_factor: float
    cpu_rate: float
    cpu_budget: float | None
    cpu_seconds: float
    scans: int
    dropped: int
    reloads: int
    ready: bool
    states: dict[str, int]
    vms: list[VmRow] = field(default_factory=list)
    metrics_cpu: float = 0.0   # CPU seconds answering scrapes (exempt from the budget)
    period_target: float = 0.0  # the scheduler's target period (`period` is measured)
    keyed_scans: int = 0  # of `scans`, the keyed ones


def snapshot(engine: Observed) -> Snapshot:
    """The engine's state, read on the event loop (nothing changes while this runs)."""
    sched = engine.scheduler
    states = {s.value: 0 for s in WatchState}
    states["attaching"] = 0
    rows = []
    for w in list(engine.watchers.values()):
        if w is None:
            states["attaching"] += 1
            continue
        states[w.state.value] = states.get(w.state.value, 0) + 1
        base = engine.vm_totals.get(w.name)
        counts = engine.vm_events.get(w.name, {})
        rows.append(VmRow(
            vm=w.name, state=w.state.value,
            scans=w.scans + (base.scans if base else 0),
            tampers=counts.get("tamper", 0), patches=counts.get("kernel_patched", 0),
            last_verified=w.verified_at if w.verified_at is not None else (
                base.verified_at if base else None),
            cost=sched.cost(w.name), interval=sched.interval(w.name),
            tampered=bool(w.reported)))
    return Snapshot(
        taken=time.time(), start_time=engine.started_at, period=sched.measured_or_target(),
        period_target=sched.target(),
        period_factor=sched.overhead, cpu_rate=sched.rate, cpu_budget=sched.policy.budget,
        cpu_seconds=time.process_time(), scans=engine.scans, dropped=engine.sink.dropped,
        reloads=engine.reloads, ready=engine.ready, states=states, vms=rows,
        metrics_cpu=sched.exempted, keyed_scans=engine.keyed_scans)


class EngineCollector:
    """A prometheus-client collector reading `Snapshot`s taken on the loop."""

    def __init__(self, engine: Observed, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self._last: Snapshot | None = None
        self._lock = threading.Lock()
        self.scrapes = 0

    def _take(self) -> tuple[Snapshot | None, bool]:
        fut: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def on_loop() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(snapshot(self.engine))
            except BaseException as err:
                fut.set_exception(err)

        try:
            self.loop.call_soon_threadsafe(on_loop)
            snap = fut.result(SNAPSHOT_TIMEOUT)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            return self._last, True
        except Exception as err:  # the loop is closed (stopping), or a bug: say stale
            log.debug("metrics snapshot failed: %s", err)
            return self._last, True
        self._last = snap
        return snap, False

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        with self._lock:  # concurrent scrapes: one snapshot at a time
            snap, stale = self._take()
            self.scrapes += 1
        yield InfoMetricFamily("kscan", "kscan's version", value={"version": __version__})
        stale_m = GaugeMetricFamily(
            "kscan_metrics_stale", "1 when the event loop did not answer this scrape "
            "in time and the previous snapshot is served (a wedged or overloaded loop)")
        stale_m.add_metric([], 1.0 if stale else 0.0)
        yield stale_m
        if snap is None:
            return
        age = GaugeMetricFamily("kscan_metrics_snapshot_age_seconds",
                                "Age of the snapshot served")
        age.add_metric([], max(0.0, time.time() - snap.taken))
        yield age

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            return c

        yield gauge("kscan_start_time_seconds", "Unix time kscan run started",
                    snap.start_time)
        yield gauge("kscan_ready", "1 once every configured source was attached or "
                    "reported unreachable (systemd READY=1)", 1.0 if snap.ready else 0.0)
        yield gauge("kscan_period_seconds", "The period VMs are really scanned at: fleet "
                    "median of each VM's measured interval between fast passes",
                    snap.period)
        yield gauge("kscan_period_target_seconds", "The scheduler's target period P (each "
                    "VM is scanned every P, or P/2 while hot; --interval when fixed)",
                    snap.period_target)
        yield gauge("kscan_period_factor", "Feedback factor on the period steering CPU "
                    "use to the budget", snap.period_factor)
        yield gauge("kscan_cpu_used_ratio", "CPU the process uses, in cores (EWMA over "
                    "~10 s)", snap.cpu_rate)
        if snap.cpu_budget is not None:
            yield gauge("kscan_cpu_budget_ratio", "The CPU budget, in cores "
                        "(--cpu-budget / 100)", snap.cpu_budget)
        yield counter("kscan_cpu_seconds", "CPU time the process used, in seconds",
                      snap.cpu_seconds)
        yield counter("kscan_metrics_cpu_seconds", "CPU time answering metrics scrapes "
                      "(part of kscan_cpu_seconds, exempt from the scan budget)",
                      snap.metrics_cpu)
        yield counter("kscan_scans", "Fast scans done, all VMs", snap.scans)
        yield counter("kscan_keyed_scans", "Of the fast scans, those compared under the "
                      "keyed construction (one per VM every --keyed-every seconds, and "
                      "resume passes)", snap.keyed_scans)
        yield counter("kscan_events_dropped", "Events left out of stdout (stats first; "
                      "all but stats are in the database)", snap.dropped)
        yield counter("kscan_reloads", "Configuration reloads (SIGHUP) applied",
                      snap.reloads)
        vms = GaugeMetricFamily("kscan_vms", "VMs by watch state", labels=["state"])
        for state, n in sorted(snap.states.items()):
            vms.add_metric([state], n)
        yield vms

        last = GaugeMetricFamily("kscan_vm_last_verified_timestamp_seconds",
                                 "Unix time of the VM's last verdict (a fast scan that "
                                 "saw no change, or a full check)", labels=["vm"])
        scans = CounterMetricFamily("kscan_vm_scans", "Fast scans of the VM",
                                    labels=["vm"])
        tampers = CounterMetricFamily("kscan_vm_tamper", "tamper events of the VM (each "
                                      "a new set of changes)", labels=["vm"])
        patches = CounterMetricFamily("kscan_vm_kernel_patched", "kernel_patched events "
                                      "of the VM (verified self-patching)", labels=["vm"])
        cost = GaugeMetricFamily("kscan_vm_scan_cost_seconds", "CPU seconds one fast "
                                 "scan of the VM costs (EWMA)", labels=["vm"])
        interval = GaugeMetricFamily("kscan_vm_scan_interval_seconds", "Seconds between "
                                     "two scans of the VM now", labels=["vm"])
        tampered = GaugeMetricFamily("kscan_vm_tampered", "1 while the VM differs from "
                                     "its baselines (tamper reported, not cleared)",
                                     labels=["vm"])
        for r in snap.vms:
            if r.last_verified is not None:
                last.add_metric([r.vm], r.last_verified)
            scans.add_metric([r.vm], r.scans)
            tampers.add_metric([r.vm], r.tampers)
            patches.add_metric([r.vm], r.patches)
            cost.add_metric([r.vm], r.cost)
            interval.add_metric([r.vm], r.interval)
            tampered.add_metric([r.vm], 1.0 if r.tampered else 0.0)
        yield from (last, scans, tampers, patches, cost, interval, tampered)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise MetricsError(f"--metrics {text!r}: give HOST:PORT, e.g. 127.0.0.1:9464 "
                           "or [::1]:9464, or unix:PATH")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class MetricsServer:
    """The metrics page (`scanner.run.metrics_http`) on HOST:PORT or unix:PATH, with
    kscan's own registry. The handler threads' CPU is exempt from the scan budget."""

    def __init__(self, engine: Observed, loop: asyncio.AbstractEventLoop,
                 address: str) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        from scanner.run import metrics_http

        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = EngineCollector(engine, loop)
        c: Collector = self.collector
        self.registry.register(c)
        registry = self.registry
        self.page = metrics_http.CachedPage(lambda: generate_latest(registry))
        on_cpu = engine.scheduler.exempt
        self.unix_path: str | None = None
        self.host, self.port = "", 0
        if address.startswith("unix:"):
            path = address[5:]
            if not path:
                raise MetricsError("--metrics unix: needs a path, e.g. "
                                   "unix:/run/kscan/metrics.sock")
            try:
                self._httpd: metrics_http.Server
                self._httpd, self._thread = metrics_http.serve_unix(
                    path, self.page, CONTENT_TYPE_LATEST, on_cpu)
            except OSError as err:
                raise MetricsError(f"--metrics {address}: cannot listen: "
                                   f"{err.strerror or err}",
                                   hint="a directory kscan can write to, and no other "
                                   "kscan serving there") from None
            self.unix_path = path
            log.info("metrics on unix:%s", path)
            return
        host, port = parse_address(address)
        try:
            self._httpd, self._thread = metrics_http.serve_tcp(
                host, port, self.page, CONTENT_TYPE_LATEST, on_cpu)
        except OSError as err:
            raise MetricsError(f"--metrics {address}: cannot listen: {err.strerror or err}",
                               hint="choose a free port and an address of this host") \
                from None
        self.host, self.port = host, int(self._httpd.server_address[1])
        log.info("metrics on http://%s:%d/metrics",
                 f"[{host}]" if ":" in host else host, self.port)

    def close(self) -> None:
        from scanner.run import metrics_http

        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
        if self.unix_path is not None and isinstance(self._httpd, metrics_http._UnixServer):
            metrics_http.remove_socket(self._httpd, self.unix_path)

"""`kscan run`: the asyncio engine that watches many VMs at once.

One task per VM (`scanner.run.watcher.VmWatcher`), one discovery task that notices VMs
appearing and disappearing, a stats task and a budget task, all owned by a `TaskGroup`.
Fast passes run on the event loop (≈1-2 ms of hashing each; a thread hop cost more than
it saved under a budget below one core); slow paths — locate, normalize, verify, tens of
milliseconds — run in a small thread pool so the loop stays responsive. Profiles and
golden baselines are read from the database and cached for `CACHE_SECONDS`, so a
`kscan profile add` or `kscan baseline` made while `run` is going is picked up.

SIGTERM/SIGINT set the stop event; tasks are cancelled, VMs detached, the event stream
flushed, and `run` returns 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kscan import __version__
from kscan.errors import KscanError
from scanner.check.golden_bytes import GOLDEN_BYTES
from scanner.examine import Examined, GoldenSet, golden_for
from scanner.examine.keying import keyed_store
from scanner.image.kernel_profile import KernelProfile
from scanner.qemu.discover import expand_sockets, find_qemu_processes
from scanner.run import memtrace
from scanner.run.actions import Action, ActionKind, prune_forensics
from scanner.run.events import EventSink
from scanner.run.libvirt_fleet import LibvirtFleet
from scanner.run.metrics import MetricsServer, VmTotals
from scanner.run.scheduler import Policy, Scheduler
from scanner.run.service import Notifier, monotonic_usec
from scanner.run.watcher import VmWatcher, WatchState
from scanner.vm import SourceKind, VmHandle, VmSource, open_vm, state_key
from store import Store

__all__ = ["Engine", "RunConfig", "VmTotals"]

log = logging.getLogger("kscan.engine")
T = TypeVar("T")

CACHE_SECONDS = 30.0
UNREACHABLE_BACKOFF = 30.0
RELOST_BACKOFF = 2.0
#: A source that keeps failing is retried later and later, up to this.
MAX_BACKOFF = 300.0
PRUNE_EVERY = 3600.0
#: What kscan keeps of a VM that went away — its scan totals and event counts (for
#: --metrics, should it come back), its event labels, its source's retry and error
#: state — is forgotten once it has been gone this long: a host that churns through
#: VMs for months must not grow with every VM it ever saw.
FORGET_AFTER = 3600.0
#: With --stats-every 0, how often the stats task looks whether a reload turned them on.
NO_STATS_POLL = 60.0
#: Events counted per VM (for --metrics).
COUNTED_EVENTS = frozenset({"tamper", "kernel_patched"})
#: RunConfig fields a SIGHUP cannot change (the process must be restarted for them).
RESTART_FIELDS = ("workers", "libvirt", "db", "metrics")


@dataclass(frozen=True)
class RunConfig:
    qmp: tuple[str, ...] = ()
    discover: bool = False
    replay: tuple[str, ...] = ()
    policy: Policy = field(default_factory=Policy)
    action: Action = field(default_factory=lambda: Action(ActionKind.REPORT))
    forensics_dir: Path = Path(".")
    workers: int = 2
    discover_every: float = 2.0
    stats_every: float = 60.0
    strict: bool = False
    #: --trust-module: unsigned modules whose runtime patches are not tampering.
    trusted_modules: frozenset[str] = frozenset()
    libvirt: str | None = None  # watch every running domain of this libvirt URI
    #: --discover: the users (uids) whose QEMU processes are watched besides root's.
    discover_uids: frozenset[int] = frozenset()
    #: Pruning: events older than this many days (0: keep all), forensic copies beyond
    #: this many MiB (0: no cap); never the last tamper of a VM.
    keep_days: float = 0.0
    forensics_max_mb: float = 0.0
    #: The database and the metrics address: a reload reports a change of either in
    #: `restart_needed` (the engine keeps the ones it started with).
    db: str | None = None
    metrics: str | None = None


class Engine:
    """Runs the watchers; implements their `WatchContext`."""

    def __init__(self, cfg: RunConfig, store: Store, sink: EventSink) -> None:
        self.cfg = cfg
        self.store = store
        self.sink = sink
        self.scheduler = Scheduler(cfg.policy)
        self.action = cfg.action
        self.forensics_dir = cfg.forensics_dir
        self.strict = cfg.strict
        self.trusted_modules = cfg.trusted_modules
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.workers),
                                       thread_name_prefix="kscan-hash")
        self.watchers: dict[str, VmWatcher | None] = {}  # source → watcher (None: attaching)
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}  # consecutive failures of a source
        self._said: dict[str, str] = {}
        #: Literal --qmp/--replay paths that did not exist at their last try: retried
        #: as soon as they appear, not after the unreachable backoff.
        self._absent: set[str] = set()
        self._profiles: tuple[float, list[KernelProfile]] = (0.0, [])
        #: Decoded profiles by their stored row's build id and content digest.
        self._decoded: dict[tuple[str, bytes], KernelProfile] = {}
        self._golden: dict[tuple[str, str], tuple[float, GoldenSet]] = {}
        self._cache_lock = asyncio.Lock()  # single-flight refresh of the two caches
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop
        #: Slow paths in flight at once. Each holds ~19 MB of region copies from examine
        #: to the end of its check, so this bounds memory; more would not run faster
        #: than the worker threads anyway.
        self._slow_slots = asyncio.Semaphore(max(1, cfg.workers))
        self.scans = 0
        self.keyed_scans = 0  # of which keyed (the stats event's keyed_scans)
        #: CPU seconds inside the fast scans' checks (the stats event's scan_cpu_percent).
        self.scan_cpu = 0.0
        self._swept = False  # the first discovery pass has spawned its watchers
        self.fleet: LibvirtFleet | None = None
        if cfg.libvirt:
            self.fleet = LibvirtFleet(cfg.libvirt, sink, self.forget)
        # -- operations (metrics, systemd, reload) --
        self.started_at = time.time()
        self.vm_totals: dict[str, VmTotals] = {}
        self.vm_events: dict[str, dict[str, int]] = {}  # vm → event type → count
        self._gone_since: dict[str, float] = {}  # VM name → when its watcher ended
        self._absent_since: dict[str, float] = {}  # source key → when discovery lost it
        self._present: set[str] = set()  # source keys the last discovery pass saw
        self.first_pass = asyncio.Event()  # the first discovery pass is done
        self.first_sources: frozenset[str] = frozenset()
        self.ready = False
        self.reloads = 0
        #: SIGHUP: returns the configuration anew (re-reads the config file).
        self.reloader: Callable[[], RunConfig] | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self.notifier: Notifier | None = None  # systemd's, when run as a service

    # -- the watchers' context (scanner.run.context.WatchContext) -----------------------
    async def emit(self, event: str, vm: str | None, **fields: Any) -> dict[str, Any]:
        if vm is not None and event in COUNTED_EVENTS:
            counts = self.vm_events.setdefault(vm, {})
            counts[event] = counts.get(event, 0) + 1
        return await self.sink.emit(event, vm, **fields)

    async def profiles(self) -> list[KernelProfile]:
        # One refresh at a time: when the cache expires, hundreds of watchers ask at
        # once, and each would otherwise read and decode every profile itself.
        if self._stale(self._profiles[0]) or not self._profiles[1]:
            async with self._cache_lock:
                if self._stale(self._profiles[0]) or not self._profiles[1]:
                    self._profiles = (time.monotonic(), await self._load_profiles())
        return self._profiles[1]

    async def _load_profiles(self) -> list[KernelProfile]:
        """Every stored profile, each decoded once: an unchanged row keeps the object
        decoded before. Each watcher's located kernel holds the profile it was found
        with; decoding afresh at every cache refresh left one ~4 MB copy alive per
        refresh epoch among the watched VMs (the fleet's USS grew with its age)."""
        out, keep = [], {}
        for info in await self.store.list_profiles():
            row = await self.store.get_profile(info.build_id)
            if row is None:
                continue
            key = (info.build_id, hashlib.blake2b(row.data, digest_size=16).digest())
            prof = self._decoded.get(key)
            if prof is None:
                prof = KernelProfile.from_bytes(row.data)
            keep[key] = prof
            out.append(prof)
        self._decoded = keep
        return out

    async def golden(self, ex: Examined) -> GoldenSet:
        key = (ex.lk.profile.build_id, ex.boot.key)
        hit = self._golden.get(key)
        if hit is None or self._stale(hit[0]):
            async with self._cache_lock:
                hit = self._golden.get(key)
                if hit is None or self._stale(hit[0]):
                    hit = (time.monotonic(), await golden_for(self.store, ex))
                    self._golden[key] = hit
        return hit[1]

    @staticmethod
    def _stale(at: float) -> bool:
        return time.monotonic() - at > CACHE_SECONDS

    @contextlib.asynccontextmanager
    async def slow_slot(self) -> AsyncIterator[None]:
        async with self._slow_slots:
            yield

    def count_scan(self, keyed: bool = False, cpu_seconds: float = 0.0) -> None:
        self.scans += 1
        self.keyed_scans += keyed
        self.scan_cpu += cpu_seconds

    def charge(self, cpu_seconds: float) -> None:
        self.scheduler.settle(0.0, cpu_seconds)

    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def timed_in_worker(self, fn: Callable[[], T], vm: str | None = None) -> T:
        """Run CPU-bound work in the pool and charge its CPU time to the budget (and to
        `vm`'s share of slow-path CPU)."""
        def timed() -> tuple[T, float]:
            t0 = time.thread_time()
            return fn(), time.thread_time() - t0

        result, cpu = await self.in_worker(timed)
        self.charge(cpu)
        if vm is not None:
            self.scheduler.charge_vm(vm, cpu)
        return result

    # -- main ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        await self.sink.emit("kscan_started", None, version=__version__,
                             policy=self.cfg.policy.describe(),
                             on_tamper=self.action.describe(), strict=self.strict,
                             forensics_dir=str(self.forensics_dir),
                             sources={"qmp": list(self.cfg.qmp), "discover": self.cfg.discover,
                                      "replay": list(self.cfg.replay),
                                      "libvirt": self.cfg.libvirt})
        try:
            if self.fleet is not None:
                await self.fleet.start()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tasks = [tg.create_task(self._discovery(tg), name="discovery"),
                         tg.create_task(self._stats(), name="stats"),
                         tg.create_task(self._reconcile(), name="reconcile")]
                if self.fleet is not None:
                    tasks.append(tg.create_task(self.fleet.follow(), name="libvirt"))
                if self.cfg.keep_days or self.cfg.forensics_max_mb:
                    self._prune_task = tg.create_task(self._prune(), name="prune")
                    tasks.append(self._prune_task)
                await stop.wait()
                for t in [*tasks, *self._tasks, self._prune_task, self._reloading]:
                    if t is not None:
                        t.cancel()
        finally:
            if self.fleet is not None:
                await self.fleet.close()
            self.pool.shutdown(wait=True, cancel_futures=True)
            await self.sink.emit("kscan_stopped", None, scans=self.scans)

    async def _discovery(self, tg: asyncio.TaskGroup) -> None:
        while True:
            try:
                sources = await asyncio.to_thread(self._sources)
            except Exception as err:  # a surprise here must not end the run
                log.exception("discovery failed")
                await self._say_error("discovery", err)
                sources = []
            else:
                self._forget_gone(time.monotonic())
            for src in sources:
                if src.path in self.watchers:
                    continue
                if src.path in self._absent and os.path.exists(src.path):
                    self._absent.discard(src.path)
                    self._retry_at.pop(src.path, None)
                if self._retry_at.get(src.path, 0.0) > time.monotonic():
                    continue
                self.watchers[src.path] = None
                t = tg.create_task(self._watch(src), name=f"vm:{src.path}")
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
            if not self.first_pass.is_set():
                self.first_sources = frozenset(s.path for s in sources)
                self.first_pass.set()
            self._swept = True
            await asyncio.sleep(self.cfg.discover_every)

    async def _say_error(self, source: str, err: BaseException) -> None:
        message = f"{type(err).__name__}: {err}"
        if self._said.get(source) != message:
            self._said[source] = message
            await self.sink.emit("error", None, source=source, message=message,
                                 hint="kscan goes on; this is retried")

    def _sources(self) -> list[VmSource]:
        """The VMs to watch now (runs in a thread: globs and /proc reads block)."""
        out = [VmSource(SourceKind.QMP, s) for s in sorted(expand_sockets(self.cfg.qmp))]
        skipped: set[str] = set()
        if self.cfg.discover:
            for p in find_qemu_processes(uids=self.cfg.discover_uids):
                if p.qmp is None:
                    continue
                if not p.file_backed:
                    key = f"pid:{p.pid}"
                    skipped.add(key)
                    if key not in self._said:
                        self._said[key] = "skipped"
                        self._loop.call_soon_threadsafe(self._spawn_emit, dict(
                            event="vm_skipped", pid=p.pid, qmp=p.qmp,
                            reason="guest RAM is not in a memory-backend-file"))
                    continue
                out.append(VmSource(SourceKind.DISCOVER, os.path.abspath(p.qmp), owner=p.uid))
        out.extend(VmSource(SourceKind.REPLAY, d)
                   for d in sorted(expand_sockets(self.cfg.replay)))
        if self.fleet is not None:
            out.extend(self.fleet.sources())
        self._present = {s.path for s in out} | skipped  # read on the loop after the await
        return out

    def _forget_gone(self, now: float) -> None:
        """Forget what is kept of sources and VMs gone for FORGET_AFTER seconds."""
        kept = self._retry_at.keys() | self._failures.keys() | self._said.keys() | self._absent
        for key in kept - self._present - self.watchers.keys():
            since = self._absent_since.setdefault(key, now)
            if now - since >= FORGET_AFTER:
                self._retry_at.pop(key, None)
                self._failures.pop(key, None)
                self._said.pop(key, None)
                self._absent_since.pop(key, None)
                self._absent.discard(key)
        for key in self._absent_since.keys() & (self._present | self.watchers.keys()):
            del self._absent_since[key]
        watched = {w.name for w in self.watchers.values() if w is not None}
        for name, since in list(self._gone_since.items()):
            if name in watched:
                del self._gone_since[name]
            elif now - since >= FORGET_AFTER:
                del self._gone_since[name]
                self.vm_totals.pop(name, None)
                self.vm_events.pop(name, None)
                self.sink.labels.pop(name, None)

    def _spawn_emit(self, fields: dict[str, Any]) -> None:
        async def emit() -> None:
            await self.sink.emit(fields.pop("event"), None, **fields)

        t = self._loop.create_task(emit())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _open(self, src: VmSource) -> VmHandle:
        if src.kind is SourceKind.LIBVIRT and self.fleet is not None:
            return await self.fleet.open(src.path)  # on the fleet's connection
        return await open_vm(src)

    def forget(self, source: str) -> bool:
        """Stop watching a source at once (its VM is gone); True if it was watched."""
        for t in self._tasks:
            if t.get_name() == f"vm:{source}":
                t.cancel()
        w = self.watchers.pop(source, False)
        if isinstance(w, VmWatcher):
            self._retire(w)
        return w is not False

    def _retire(self, w: VmWatcher) -> None:
        """Keep what a watcher that ends counted (its VM may be attached again)."""
        totals = self.vm_totals.setdefault(w.name, VmTotals())
        self._gone_since[w.name] = time.monotonic()
        totals.scans += w.scans
        w.scans = 0  # counted once, whichever of forget() and _watch() comes last
        if w.verified_at is not None:
            totals.verified_at = w.verified_at

    def _backoff(self, source: str, base: float) -> float:
        """`base`, doubled for each failure of the source in a row, up to MAX_BACKOFF."""
        n = self._failures.get(source, 0)
        self._failures[source] = n + 1
        return float(min(MAX_BACKOFF, base * 2 ** min(n, 16)))

    async def _watch(self, src: VmSource) -> None:
        """One VM, isolated: whatever its inputs raise becomes an event of its own, and
        it is retried later; no other VM notices."""
        source = src.path
        backoff = RELOST_BACKOFF
        try:
            try:
                vm = await self._open(src)
            except (KscanError, Exception) as err:  # any reply of a hostile peer
                backoff = self._backoff(source, UNREACHABLE_BACKOFF)
                message = str(err) if isinstance(err, KscanError) else \
                    f"{type(err).__name__}: {err}"
                if src.kind in (SourceKind.QMP, SourceKind.REPLAY) and \
                        not os.path.exists(source):
                    self._absent.add(source)
                    message = f"{source} does not exist; watched for until it appears"
                if self._said.get(source) != message:
                    self._said[source] = message
                    await self.sink.emit("vm_unreachable", None, source=source,
                                         message=message, retry_s=backoff)
                return
            key = state_key(src, vm.uuid)
            clash = self._claimed_by(source, vm.name, key)
            if clash is not None:
                # A second VM claiming a watched VM's name (QEMU reports whatever -name
                # it was given) or identity: not watched under it, retried later.
                with contextlib.suppress(Exception):
                    await vm.close()
                backoff = self._backoff(source, UNREACHABLE_BACKOFF)
                message = (f"a VM reporting the name {vm.name!r} is already watched from "
                           f"{clash}; this one (state key {key}) is not watched under it")
                if self._said.get(source) != message:
                    self._said[source] = message
                    await self.sink.emit("error", None, source=source, name=vm.name,
                                         message=message, retry_s=backoff,
                                         hint="give each VM a name of its own (-name)")
                return
            self._said.pop(source, None)
            w = VmWatcher(self, vm, source, key)
            self.watchers[source] = w
            if vm.uuid:
                self.sink.labels[vm.name] = {"uuid": vm.uuid}
            else:  # not the uuid of a VM that was watched under this name before
                self.sink.labels.pop(vm.name, None)
            await self.sink.emit("vm_found", vm.name, source=source, kind=src.kind)
            try:
                await w.run()
            except Exception as err:  # a bug or a surprise must not stop the other VMs
                log.exception("%s: watcher failed", vm.name)
                backoff = self._backoff(source, RELOST_BACKOFF)
                await self.sink.emit("error", vm.name, source=source,
                                     message=f"{type(err).__name__}: {err}",
                                     hint="kscan stopped watching this VM; it is retried",
                                     retry_s=backoff)
            else:
                if w.state is WatchState.WATCHING:
                    self._failures.pop(source, None)
        finally:
            ended = self.watchers.pop(source, None)
            if ended is not None:
                self._retire(ended)
            self._retry_at[source] = time.monotonic() + backoff

    def _claimed_by(self, source: str, name: str, key: str) -> str | None:
        """The source of another watched VM with this name or state key, if any."""
        for other, w in self.watchers.items():
            if w is not None and other != source and (w.name == name or w.key == key):
                return other
        return None

    async def _reconcile(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.scheduler.reconcile()
            GOLDEN_BYTES.prune()   # golden bytes are kept only while checks use them
            sched = self.scheduler
            if (sched.starting and self._swept and not sched.pending()
                    and None not in self.watchers.values()):
                # The start-up burst is over: every VM found at start (none is still
                # attaching) has its first verdict, or none could be attached.
                sched.end_startup()

    async def _prune(self) -> None:
        """Keep the event log and the forensics dir bounded (never the last tamper of
        a VM, nor its newest forensic copy)."""
        while True:
            try:
                events = 0
                if self.cfg.keep_days:
                    events = await self.store.prune_events(
                        time.time() - self.cfg.keep_days * 86400, keep_last_of=("tamper",))
                copies = 0
                if self.cfg.forensics_max_mb:
                    copies = await asyncio.to_thread(
                        prune_forensics, self.forensics_dir,
                        int(self.cfg.forensics_max_mb * (1 << 20)))
                if events or copies:
                    await self.sink.emit("pruned", None, events=events,
                                         forensic_copies=copies)
            except Exception as err:
                log.exception("pruning failed")
                await self._say_error("prune", err)
            await asyncio.sleep(PRUNE_EVERY)

    # -- reload (SIGHUP) -------------------------------------------------------------
    def request_reload(self) -> None:
        """SIGHUP: re-read the configuration, profiles and baselines. One reload at a
        time; SIGHUPs during one make one more reload after it."""
        self._reload_again = True
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(
                self._reload_loop(), name="reload")

    async def _reload_loop(self) -> None:
        while self._reload_again:
            self._reload_again = False
            await self.reload()

    def settled(self, source: str) -> bool:
        """The source has been attached, or has failed (unreachable, lost) once."""
        if self.watchers.get(source) is not None:
            return True
        return source not in self.watchers and source in self._retry_at

    def status(self) -> str:
        """One line for systemd's STATUS=."""
        watching = [w for w in self.watchers.values() if w is not None]
        return (f"watching {len(watching)} VM(s), {self.scans} scans, "
                f"{self.reloads} reload(s)")

    async def reload(self) -> None:
        """Apply the configuration anew without touching the watchers: VMs keep their
        state and rhythm; the new policy, budget, action, strictness and sources apply
        from now on. Profiles and baselines are read again at once."""
        notifier = self.notifier
        if notifier is not None:
            notifier.send("RELOADING=1", monotonic_usec())
        try:
            new = await asyncio.to_thread(self.reloader) if self.reloader else self.cfg
        except Exception as err:  # a bad file: keep running as configured
            message = str(err) if isinstance(err, KscanError) else \
                f"{type(err).__name__}: {err}"
            await self.sink.emit("error", None, source="reload", message=message,
                                 hint="the configuration in force is kept; fix the "
                                      "file and reload again")
            if notifier is not None:
                notifier.send("READY=1", "STATUS=reload failed: configuration kept")
            return
        old = self.cfg
        changed = sorted(f.name for f in dataclasses.fields(RunConfig)
                         if getattr(old, f.name) != getattr(new, f.name))
        restart = [n for n in changed if n in RESTART_FIELDS]
        applied = dataclasses.replace(new, **{n: getattr(old, n) for n in RESTART_FIELDS})
        self.cfg = applied
        self.scheduler.policy = applied.policy
        self.scheduler._stale()
        self.action = applied.action
        self.strict = applied.strict
        self.trusted_modules = applied.trusted_modules
        self.forensics_dir = applied.forensics_dir
        self._profiles = (0.0, [])
        self._golden.clear()
        if ((applied.keep_days or applied.forensics_max_mb) and self._tg is not None
                and (self._prune_task is None or self._prune_task.done())):
            self._prune_task = self._tg.create_task(self._prune(), name="prune")
        dropped: list[str] = []
        if {"qmp", "replay", "discover", "discover_uids"} & set(changed):
            dropped = await self._drop_unconfigured()
        profiles = await self.profiles()
        self.reloads += 1
        await self.sink.emit("reloaded", None, version=__version__,
                             policy=applied.policy.describe(),
                             on_tamper=self.action.describe(), strict=self.strict,
                             forensics_dir=str(self.forensics_dir),
                             sources={"qmp": list(applied.qmp), "discover": applied.discover,
                                      "replay": list(applied.replay),
                                      "libvirt": applied.libvirt},
                             changed=changed, restart_needed=restart, dropped=dropped,
                             profiles=len(profiles))
        if notifier is not None:
            notifier.send("READY=1", f"STATUS={self.status()}")

    async def _drop_unconfigured(self) -> list[str]:
        """Stop watching sources the configuration no longer names."""
        try:
            now = {s.path for s in await asyncio.to_thread(self._sources)}
        except Exception as err:
            await self._say_error("discovery", err)
            return []
        gone = [src for src in list(self.watchers) if src not in now]
        for src in gone:
            w = self.watchers.get(src)
            self.forget(src)
            self._retry_at.pop(src, None)
            await self.sink.emit("vm_lost", w.name if w is not None else None, source=src,
                                 reason="no longer in the configuration (reload)")
        return gone

    async def _stats(self) -> None:
        last_cpu, last_t, last_scans = time.process_time(), time.monotonic(), self.scans
        last_keyed, last_scan_cpu = self.keyed_scans, self.scan_cpu
        while True:
            # --stats-every 0: no stats events (a reload may turn them on again).
            await asyncio.sleep(self.cfg.stats_every or NO_STATS_POLL)
            cpu, now = time.process_time(), time.monotonic()
            if not self.cfg.stats_every:
                last_cpu, last_t, last_scans = cpu, now, self.scans
                last_keyed, last_scan_cpu = self.keyed_scans, self.scan_cpu
                continue
            watching = [w for w in self.watchers.values() if w is not None]
            await self.sink.emit(
                "stats", None, vms=len(watching),
                watching=sum(1 for w in watching if w.state is WatchState.WATCHING),
                scans=self.scans - last_scans, keyed_scans=self.keyed_scans - last_keyed,
                keyed_every_s=round(self.scheduler.keyed_every(), 3),
                cpu_percent=round(100 * (cpu - last_cpu) / max(1e-9, now - last_t), 2),
                scan_cpu_percent=round(
                    100 * (self.scan_cpu - last_scan_cpu) / max(1e-9, now - last_t), 2),
                period_s=round(self.scheduler.measured_or_target(), 3),
                period_target_s=round(self.scheduler.target(), 3),
                period_factor=round(self.scheduler.overhead, 3), dropped=self.sink.dropped)
            last_cpu, last_t, last_scans = cpu, now, self.scans
            last_keyed, last_scan_cpu = self.keyed_scans, self.scan_cpu


async def run_engine(cfg: RunConfig, db: str | None, stop: asyncio.Event,
                     out: Any = None, *, reloader: Callable[[], RunConfig] | None = None,
                     metrics: str | None = None, notifier: Notifier | None = None,
                     event_format: str = "native") -> None:
    """Run the engine until `stop`. `metrics`: HOST:PORT or unix:PATH to serve
    Prometheus metrics on; `reloader`: what SIGHUP calls for the configuration anew;
    `notifier`: systemd's (from the environment by default; inert outside systemd);
    `event_format`: what stdout gets (`scanner.run.formats`; the database keeps native
    events)."""
    from scanner.run.formats import formatter

    shape = None if event_format == "native" else formatter(event_format)
    async with keyed_store(db) as st:
        async def persist(ev: dict[str, Any]) -> None:
            # The log keys events by VM name; kscan's own events have vm null → "".
            await st.append_event({**ev, "vm": ev["vm"] or ""})

        sink = EventSink(out, persist=persist, shape=shape)
        sink.start()
        try:
            engine = Engine(cfg, st, sink)
            await _serve(engine, stop, reloader, metrics, notifier or Notifier())
        finally:
            await sink.close()


async def _serve(engine: Engine, stop: asyncio.Event,
                 reloader: Callable[[], RunConfig] | None, metrics: str | None,
                 notifier: Notifier) -> None:
    """The engine with what operating it needs: metrics, sd_notify, SIGHUP."""
    import signal

    from scanner.run.service import run_service_tasks

    loop = asyncio.get_running_loop()
    engine.reloader = reloader
    engine.notifier = notifier
    server = MetricsServer(engine, loop, metrics) if metrics else None
    hup = False
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, engine.request_reload)
        hup = True
    service = loop.create_task(run_service_tasks(engine, notifier), name="service")
    trace = memtrace.start()  # None unless KSCAN_TRACEMALLOC is set
    try:
        await engine.run(stop)
    finally:
        notifier.send("STOPPING=1")
        if trace is not None:
            trace.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trace
        service.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await service
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        if server is not None:
            await asyncio.to_thread(server.close)
        notifier.close()


def tune_malloc() -> None:
    """Make glibc return big freed buffers to the system at once.

    Slow paths allocate ~19 MB of region copies and free them. glibc raises its mmap
    threshold dynamically after such frees, after which big buffers come from the
    heap and stay resident; a long-running watcher's memory would creep up. A fixed
    1 MiB threshold (and two arenas for our two worker threads) keeps it flat."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        m_mmap_threshold, m_arena_max = -3, -8
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_arena_max, 2)


def install_signal_handlers(stop: asyncio.Event) -> None:
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

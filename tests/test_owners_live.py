"""Who patched the kernel, on real guests (issue 16 §3, §6): each runtime patch attributed
to its owner, and the policy applied — tracers and tracefs kprobes are the kernel's own,
an unsigned module's hook is tampering unless trusted, a hidden module's hook is tampering
always.

One 6.1 guest takes, in order: the function tracer and tracefs kprobes (entry, int3,
optimized; then off), the
kprobe module (then unloaded), the ftrace hook module (check, --trust-module, `run`; then
unloaded), and last the module that hides itself (never unloads). One 6.12 guest checks
the ftrace hook there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GuestPool
from tests.kscan_proc import RunProc, kscan
from tests.test_modules_live import _build_all
from tools.guests import Guest, GuestSpec, ensure_kernel
from tools.testmodules import load

pytestmark = pytest.mark.guest
TRACING = "/sys/kernel/tracing"


def _db(g: Guest, kernel: str, tmp: Path) -> str:
    path = str(tmp / "kscan.db")
    r = kscan("profile", "add", str(ensure_kernel(kernel).vmlinuz), "--db", path)
    assert r.returncode == 0 and "struct layouts from BTF" in r.stdout, r
    r = kscan("baseline", "--qmp", str(g.qmp_aux), "--db", path)
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="module")
def og(guests: GuestPool) -> Guest:
    _build_all("6.1")
    (g,) = guests.boot(GuestSpec("own61"))
    return g


@pytest.fixture(scope="module")
def odb(og: Guest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _db(og, "6.1", tmp_path_factory.mktemp("owners"))


def check(g: Guest, db: str, *extra: str) -> tuple[int, dict[str, Any]]:
    out = kscan("check", "--qmp", str(g.qmp_aux), "--db", db, "--json", *extra)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def sh(g: Guest, command: str) -> str:
    rc, out = g.run(command, timeout=240)
    assert rc == 0, f"{command}: {out}"
    return out


def owner_findings(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in doc["findings"] if f["kind"] == "patch_owner"]


def rows(doc: dict[str, Any], symbol: str) -> list[dict[str, Any]]:
    return [r for r in doc["patched"]["sites"] if r["symbol"] == symbol]


def test_tracer_and_tracefs_kprobes_are_owned_by_the_kernel(og: Guest, odb: str) -> None:
    sh(og, f"echo function > {TRACING}/current_tracer")
    try:
        rc, doc = check(og, odb)
        assert rc == 0 and owner_findings(doc) == [], doc["findings"][:3]
        owners = doc["patched"]["owners"]
        assert owners and {o["kind"] for o in owners} == {"kernel"}, owners
        assert "function_trace_call" in {o["symbol"] for o in owners}, owners
    finally:
        sh(og, f"echo nop > {TRACING}/current_tracer")
    sh(og, "echo 0 > /proc/sys/debug/kprobes-optimization && "
           f"echo 'p:kscan_entry __x64_sys_sync' >> {TRACING}/kprobe_events && "
           f"echo 'p:kscan_mid vfs_read+0xf' >> {TRACING}/kprobe_events && "
           f"echo 1 > {TRACING}/events/kprobes/enable")
    try:
        rc, doc = check(og, odb)
        assert rc == 0 and owner_findings(doc) == [], doc["findings"][:3]
        assert {"ftrace", "kprobe"} <= set(doc["patched"]["mechanisms"])
        # (kallsyms names __x64_sys_sync's code __do_sys_sync; the int3 probe in
        # vfs_read is an aggregate one: aggr_pre_handler and its member's handler)
        for sym, mech in (("__do_sys_sync", "ftrace"), ("vfs_read", "kprobe")):
            got = {(r["owner"]["kind"], r["owner"]["symbol"]) for r in rows(doc, sym)
                   if r["mechanism"] == mech}
            assert ("kernel", "kprobe_dispatcher") in got, (sym, got)
            assert {k for k, _ in got} == {"kernel"}, (sym, got)
    finally:
        sh(og, f"echo 0 > {TRACING}/events/kprobes/enable && "
               f"echo > {TRACING}/kprobe_events && "
               "echo 1 > /proc/sys/debug/kprobes-optimization")
    # an optimized kprobe: the jmp's optimized_kprobe is the aggregate in kprobe_table
    sh(og, f"echo 'p:kscan_opt vfs_read+0xf' >> {TRACING}/kprobe_events && "
           f"echo 1 > {TRACING}/events/kprobes/kscan_opt/enable && sleep 2")
    try:
        rc, doc = check(og, odb)
        assert rc == 0 and owner_findings(doc) == [], doc["findings"][:3]
        got = {(r["owner"]["kind"], r["owner"]["symbol"]) for r in rows(doc, "vfs_read")
               if r["mechanism"] == "optprobe"}
        assert ("kernel", "kprobe_dispatcher") in got, doc["patched"]["sites"]
        assert {k for k, _ in got} == {"kernel"}, got
    finally:
        sh(og, f"echo 0 > {TRACING}/events/kprobes/kscan_opt/enable && "
               f"echo '-:kscan_opt' >> {TRACING}/kprobe_events")
    time.sleep(0.5)
    rc, doc = check(og, odb)
    assert rc == 0 and doc["patched"] is None, doc["patched"]


def test_a_module_kprobe_handler_is_named(og: Guest, odb: str) -> None:
    loaded = load(og, "kscan_kprobe")
    assert loaded.ok, loaded
    try:
        rc, doc = check(og, odb)
        (f,) = owner_findings(doc)
        assert rc == 1 and f["symbol"] == "__do_sys_sync", f
        assert f["owner"]["kind"] == "module" and f["owner"]["name"] == "kscan_kprobe"
        assert f["owner"]["symbol"] == "pre [kscan_kprobe]" and f["owner"]["signed"] is False
        rc, doc = check(og, odb, "--trust-module", "kscan_kprobe")
        assert rc == 0 and owner_findings(doc) == [], doc["findings"]
        (r,) = [r for r in rows(doc, "__do_sys_sync") if r["owner"]["kind"] == "module"]
        assert r["owner"]["name"] == "kscan_kprobe" and r["owner"]["trusted"] is True
    finally:
        sh(og, "rmmod kscan_kprobe")


def test_an_unsigned_ftrace_hook_is_tampering_unless_trusted(og: Guest, odb: str,
                                                             tmp_path: Path) -> None:
    loaded = load(og, "kscan_ftrace_hook")
    assert loaded.ok, loaded
    try:
        rc, doc = check(og, odb)
        assert rc == 1 and doc["result"] == "tampered"
        (f,) = owner_findings(doc)
        assert f["symbol"] == "__x64_sys_getdents64" and f["mechanism"] == "ftrace"
        assert f["owner"]["name"] == "kscan_ftrace_hook"
        assert f["owner"]["symbol"] == "kscan_hook_cb [kscan_ftrace_hook]"   # ops->func
        assert "IPMODIFY" in f["message"] and "not signed" in f["message"]
        out = kscan("check", "--qmp", str(og.qmp_aux), "--db", odb)
        assert out.returncode == 1 and "kscan_ftrace_hook" in out.stdout, out.stdout
        rc, doc = check(og, odb, "--trust-module", "kscan-ftrace-hook")   # - is _
        assert rc == 0 and doc["result"] == "clean", doc["findings"]
        (r,) = rows(doc, "__x64_sys_getdents64")
        assert r["owner"]["kind"] == "module" and r["owner"]["trusted"] is True
        # `run`, untrusted: a tamper event whose finding names module and function
        proc = RunProc(["--qmp", str(og.qmp), "--db", odb, "--interval", "1",
                        "--forensics-dir", str(tmp_path / "f0")], tmp_path / "run0.err")
        try:
            ev = proc.wait_for(lambda e: e["event"] in ("kernel_patched", "tamper"), 300)
            assert ev["event"] == "tamper", ev
            (f,) = [f for f in ev["findings"] if f["kind"] == "patch_owner"]
            assert f["owner"]["name"] == "kscan_ftrace_hook", f
            assert f["symbol"] == "__x64_sys_getdents64"
        finally:
            assert proc.stop() == 0
        # `run`, the module trusted in the config file: kernel_patched, a warning
        conf = tmp_path / "kscan.toml"
        conf.write_text('trust_module = ["kscan_ftrace_hook"]\n')
        proc = RunProc(["--config", str(conf), "--qmp", str(og.qmp), "--db", odb,
                        "--interval", "1", "--forensics-dir", str(tmp_path / "f")],
                       tmp_path / "run.err")
        try:
            ev = proc.wait_for(lambda e: e["event"] in ("kernel_patched", "tamper"), 300)
            assert ev["event"] == "kernel_patched" and ev["severity"] == "warning", ev
            assert any(o["name"] == "kscan_ftrace_hook" for o in ev["owners"]), ev
        finally:
            assert proc.stop() == 0
        assert not proc.of("tamper")
    finally:
        sh(og, "rmmod kscan_ftrace_hook")


def test_a_hidden_module_hook_is_unowned_tampering(og: Guest, odb: str) -> None:
    loaded = load(og, "kscan_hide")
    assert loaded.ok, loaded
    rc, doc = check(og, odb, "--trust-module", "kscan_hide")
    assert rc == 1
    (f,) = owner_findings(doc)
    assert f["symbol"] == "__x64_sys_newuname" and f["owner"]["kind"] == "unowned", f
    assert f["owner"]["trusted"] is False


@pytest.fixture(scope="module")
def og612(guests: GuestPool, tmp_path_factory: pytest.TempPathFactory) -> tuple[Guest, str]:
    _build_all("6.12")
    (g,) = guests.boot(GuestSpec("own612", kernel="6.12"))
    return g, _db(g, "6.12", tmp_path_factory.mktemp("owners612"))


def test_612_tracer_and_tracefs_kprobe_are_the_kernels(og612: tuple[Guest, str]) -> None:
    g, db = og612
    sh(g, f"echo function > {TRACING}/current_tracer && "
          f"echo 'p:kscan_entry vfs_read' >> {TRACING}/kprobe_events && "
          f"echo 1 > {TRACING}/events/kprobes/enable")
    try:
        rc, doc = check(g, db)
        assert rc == 0 and owner_findings(doc) == [], doc["findings"][:3]
        kinds = {o["kind"] for o in doc["patched"]["owners"]}
        symbols = {o["symbol"] for o in doc["patched"]["owners"]}
        assert kinds == {"kernel"} and "kprobe_dispatcher" in symbols, doc["patched"]["owners"]
    finally:
        sh(g, f"echo 0 > {TRACING}/events/kprobes/enable && echo > {TRACING}/kprobe_events"
              f" && echo nop > {TRACING}/current_tracer")


def test_612_ftrace_hook_attributed(og612: tuple[Guest, str]) -> None:
    g, db = og612
    loaded = load(g, "kscan_ftrace_hook")
    assert loaded.ok, loaded
    rc, doc = check(g, db)
    (f,) = owner_findings(doc)
    assert rc == 1 and f["symbol"] == "__x64_sys_getdents64", f
    assert f["owner"]["symbol"] == "kscan_hook_cb [kscan_ftrace_hook]"
    rc, doc = check(g, db, "--trust-module", "kscan_ftrace_hook")
    assert rc == 0, doc["findings"]

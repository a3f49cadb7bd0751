"""ftrace direct calls on real 6.1 and 6.12 guests (issue 16 §3): a BPF fentry program's
trampoline is the kernel patching itself, owned by the program; a module's direct
trampoline is owned by the module (unsigned: tampering unless trusted).

The fentry program is loaded by tests/guestprogs/kscan_fentry.c (raw bpf() syscalls,
static, no libc: the guest has only busybox) with the BTF id of the traced function,
which the test takes from the kernel image's BTF with kscan's own reader.
"""

from __future__ import annotations

import re

import pytest

from scanner.image.btf import Kind, parse_btf
from tests.conftest import GuestPool
from tests.realkernels import real_image
from tests.test_modules_live import _build_all
from tests.test_owners_live import TRACING, _db, check, owner_findings, sh
from tools.guests import Guest, GuestError, GuestSpec
from tools.testmodules import build_program, load, push

pytestmark = pytest.mark.guest
FENTRY_ON = "__x64_sys_umask"   # a FUNC in 6.1's BTF (getpgrp's wrapper is not)


@pytest.fixture(scope="module")
def dg(guests: GuestPool) -> Guest:
    _build_all("6.1")
    (g,) = guests.boot(GuestSpec("direct61"))
    return g


@pytest.fixture(scope="module")
def ddb(dg: Guest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _db(dg, "6.1", tmp_path_factory.mktemp("direct"))


def _site_rows(doc: dict[str, object], kind: str) -> list[dict[str, object]]:
    patched = doc["patched"]
    assert isinstance(patched, dict), doc
    return [r for r in patched["sites"] if r.get("owner", {}).get("kind") == kind]


@pytest.fixture(scope="module")
def dg612(guests: GuestPool, tmp_path_factory: pytest.TempPathFactory) -> tuple[Guest, str]:
    _build_all("6.12")
    (g,) = guests.boot(GuestSpec("direct612", kernel="6.12"))
    return g, _db(g, "6.12", tmp_path_factory.mktemp("direct612"))


def test_a_bpf_fentry_program_is_the_kernel_patching_itself(dg: Guest, ddb: str) -> None:
    _bpf_fentry(dg, ddb, "6.1")


def test_a_module_direct_call_is_tampering_unless_trusted(dg: Guest, ddb: str) -> None:
    _module_direct(dg, ddb)


def test_612_bpf_fentry_and_module_direct_call(dg612: tuple[Guest, str]) -> None:
    g, db = dg612
    _bpf_fentry(g, db, "6.12")
    _module_direct(g, db)


def _bpf_fentry(dg: Guest, ddb: str, kernel: str) -> None:
    btf = parse_btf(real_image(kernel).section_bytes(".BTF"))
    fid = btf.find(Kind.FUNC, FENTRY_ON)
    assert fid is not None, FENTRY_ON
    try:
        prog = build_program("kscan_fentry")
    except (GuestError, OSError) as err:
        pytest.skip(f"the BPF loader cannot be built: {err}")
    push(dg, prog, "/tmp/kscan_fentry")
    out = sh(dg, f"chmod +x /tmp/kscan_fentry && (/tmp/kscan_fentry {fid} > /tmp/fentry.out "
                 "2>&1 & echo $! > /tmp/fentry.pid) && sleep 3 && cat /tmp/fentry.out")
    assert "attached" in out, out
    try:
        rc, doc = check(dg, ddb)
        assert rc == 0 and owner_findings(doc) == [], doc["findings"][:3]
        rows = _site_rows(doc, "bpf")
        assert rows, doc["patched"]
        assert all(r["mechanism"] == "ftrace" for r in rows), rows
        names = {r["owner"]["name"] for r in rows}
        assert any(n.endswith("_kscan_fentry") for n in names), names
        assert all(re.fullmatch(r"prog id \d+", r["owner"]["symbol"]) for r in rows), rows
        assert {r["symbol"] for r in rows} <= {FENTRY_ON, "__do_sys_umask"}, rows
    finally:
        sh(dg, "kill $(cat /tmp/fentry.pid); sleep 2")


def _module_direct(dg: Guest, ddb: str) -> None:
    loaded = load(dg, "kscan_direct")
    assert loaded.ok, loaded
    sym = "__x64_sys_sync"
    try:
        rc, doc = check(dg, ddb)
        assert rc == 1 and doc["result"] == "tampered", doc["findings"][:3]
        (f,) = owner_findings(doc)
        assert f["symbol"] in ("__x64_sys_sync", "__do_sys_sync"), f
        assert f["mechanism"] == "ftrace" and f["owner"]["kind"] == "module", f
        assert f["owner"]["name"] == "kscan_direct", f
        assert f["owner"]["symbol"] == "kscan_direct_tramp [kscan_direct]", f
        assert "not signed" in f["message"], f
        rc, doc = check(dg, ddb, "--trust-module", "kscan_direct")
        assert rc == 0 and owner_findings(doc) == [], doc["findings"]
        (r,) = _site_rows(doc, "module")
        assert r["owner"]["name"] == "kscan_direct" and r["owner"]["trusted"] is True
        # The function tracer on the same function: the site now calls
        # ftrace_regs_caller and ftrace's call_direct_funcs (a kernel function) sends
        # execution on to the module: still the module's, not the kernel's.
        # (6.1's kallsyms names __x64_sys_sync's code __do_sys_sync)
        sh(dg, f"(echo __do_sys_sync > {TRACING}/set_ftrace_filter || "
               f"echo {sym} > {TRACING}/set_ftrace_filter) && "
               f"echo function > {TRACING}/current_tracer")
        try:
            rc, doc = check(dg, ddb)
            assert rc == 1, doc["findings"][:3]
            (f,) = owner_findings(doc)
            assert f["owner"]["name"] == "kscan_direct", f
            kernel = {o["symbol"] for o in doc["patched"]["owners"] if o["kind"] == "kernel"}
            assert "function_trace_call" in kernel, doc["patched"]["owners"]
        finally:
            sh(dg, f"echo nop > {TRACING}/current_tracer && "
                   f"echo > {TRACING}/set_ftrace_filter")
    finally:
        sh(dg, "rmmod kscan_direct")

"""A baseline shared through a signed bundle, on real guests: host A verifies guest a
and exports; host B (a fresh database) imports with the public key and checks guest b
with no baseline of its own — clean, then tampered, then clean again."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scanner.image.kernel_profile import KernelProfile
from tests.conftest import GuestPool, run
from tests.kscan_proc import flip_bytes, kscan, write_bytes
from tests.test_watch import quiet_offset
from tools.guests import ensure_kernel

pytestmark = pytest.mark.guest


def test_imported_baseline_checks_another_host(guests: GuestPool, tmp_path: Path,
                                               kernel_profile: KernelProfile) -> None:
    key = Ed25519PrivateKey.generate()
    key_pem, pub_pem = tmp_path / "sign.pem", tmp_path / "sign.pub.pem"
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pub_pem.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    db_a, db_b, bundle = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "deb.kbundle"

    # Host A: the verifying host.
    res = kscan("profile", "add", str(ensure_kernel().vmlinuz), "--db", str(db_a))
    assert res.returncode == 0, res.stderr
    res = kscan("baseline", "--qmp", str(guests["a"].qmp_aux), "--db", str(db_a))
    assert res.returncode == 0, res.stderr
    t0 = time.monotonic()
    res = kscan("export", "--db", str(db_a), "--out", str(bundle), "--key", str(key_pem))
    t_export = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert "1 profile(s), 1 golden baseline(s)" in res.stdout
    print(res.stdout.splitlines()[0])

    # Host B: a fresh database, only the bundle and the public key.
    t0 = time.monotonic()
    res = kscan("import", str(bundle), "--trust", str(pub_pem), "--db", str(db_b))
    t_import = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert "profiles 1 added" in res.stdout and "golden baselines 1 added" in res.stdout
    print(res.stdout.splitlines()[0])
    print(f"bundle {bundle.stat().st_size} B; export {t_export:.2f} s, import "
          f"{t_import:.2f} s (wall, whole process)")

    b = guests["b"]

    def check() -> tuple[int, dict]:
        out = kscan("check", "--qmp", str(b.qmp_aux), "--db", str(db_b), "--json")
        assert out.returncode in (0, 1), out.stderr
        return out.returncode, json.loads(out.stdout)

    rc, rep = check()
    assert rc == 0 and rep["result"] == "clean", rep
    offset = quiet_offset(kernel_profile, ".text", 0x400010)
    old = run(flip_bytes(b.qmp_aux, kernel_profile, ".text", offset, 1))
    try:
        rc, rep = check()
        assert rc == 1, rep
        got = [(x["region"], x["page"]) for r in rep["regions"] for x in r["mismatches"]]
        assert got == [(".text", offset // 4096)], got
    finally:
        run(write_bytes(b.qmp_aux, kernel_profile, ".text", offset, old))
    assert check()[0] == 0

    # The import is in B's event log with the signer's key id.
    con = sqlite3.connect(db_b)
    try:
        rows = con.execute("SELECT detail FROM event WHERE event = 'imported'").fetchall()
    finally:
        con.close()
    [detail] = [json.loads(r[0]) for r in rows]
    assert detail["key_id"] and detail["outcome"]["golden"]["added"]

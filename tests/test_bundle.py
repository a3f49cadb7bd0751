"""Signed baseline bundles without guests: `kscan export` / `kscan import` round trip,
and every way a bundle or a key can be wrong — another signer, any byte changed
(header, payload, signature), truncated, trailing bytes, a signed header that lies
about sizes, keys of other algorithms or formats — refused in one line, with the
database left exactly as it was.

The kernel profile is a small synthetic one (a real KernelProfile); golden baselines
are built with `GoldenRegion.build`, content as `kscan baseline` stores it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import random
import shutil
import sqlite3
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scanner.commands.cli import main
from scanner.hashing import page_hashes, region_hash
from scanner.image.kernel_profile import KernelProfile, SectionInfo
from scanner.image.relocs import RegionRelocs
from store import GoldenRegion, Store
from store.bundle import (
    PREFIX_SIZE,
    SIG_SIZE,
    Limits,
    decode_bundle,
    encode_bundle,
    key_id,
)
from store.errors import BundleError
from store.models import GoldenRecord, ProfileRow
from tests.kscan_proc import kscan

PAGE = 4096
LINK = {".text": 0xFFFF_FFFF_8100_0000, ".rodata": 0xFFFF_FFFF_8200_0000,
        "__ex_table": 0xFFFF_FFFF_8230_0010}
SIZES = {".text": 16 * PAGE, ".rodata": 12 * PAGE, "__ex_table": PAGE + 100, "idt": PAGE}
BOOT_KEY = "qemu64-x86_64-cpu/ab12/pti0"
_PREFIX = struct.Struct("<8sHHIQ")


def make_profile(build_id: str = "b1d", *, early_idt: tuple[int, int] | None = None,
                 ) -> KernelProfile:
    return KernelProfile(
        build_id=build_id, release="6.1.0-test", version="Linux version 6.1.0-test",
        sections={n: SectionInfo(n, LINK[n], SIZES[n]) for n in LINK},
        relocs={n: RegionRelocs.empty() for n in LINK}, text_head=b"\0" * PAGE,
        ex_table=b"", early_idt=early_idt)


def region_bytes(name: str, seed: int) -> bytes:
    return random.Random(f"{name}{seed}").randbytes(SIZES[name])


def golden(build_id: str = "b1d", seed: int = 1, boots: int = 1,
           key: str = BOOT_KEY) -> GoldenRecord:
    cctx = zstandard.ZstdCompressor(level=3)
    regions, contents = {}, {}
    for name in SIZES:
        data = region_bytes(name, seed)
        regions[name] = GoldenRegion.build(
            size=len(data), region_hash=region_hash(data), page_hashes=page_hashes(data),
            per_boot_pages=[9, 10] if name == ".rodata" else [], boots=boots,
            meta={"slide": 0x2E00_0000, "source_vm": "golden-a", "raw": b"\x00\x01"})
        contents[name] = cctx.compress(data)
    return GoldenRecord(build_id, key, "golden-a", 1_700_000_000.0, regions, contents)


async def fill(db: Path, profiles: list[KernelProfile], goldens: list[GoldenRecord]) -> None:
    async with Store.open(db) as st:
        for p in profiles:
            await st.add_profile(p.build_id, p.release, p.version, p.to_bytes())
        for g in goldens:
            await st.put_golden(g.build_id, g.boot_profile, g.regions, g.source_vm,
                                contents=g.contents)


def dump(db: Path) -> list[str]:
    """Every row of the database, as SQL."""
    con = sqlite3.connect(db)
    try:
        return list(con.iterdump())
    finally:
        con.close()


async def read_all(db: Path) -> tuple[dict[str, bytes], dict[tuple[str, str], GoldenRecord],
                                      list[dict[str, Any]]]:
    async with Store.open(db) as st:
        profiles = {}
        for info in await st.list_profiles():
            row = await st.get_profile(info.build_id)
            assert row is not None
            profiles[info.build_id] = row.data
        goldens = {}
        for g in await st.list_golden():
            rec = await st.get_golden_record(g.build_id, g.boot_profile)
            assert rec is not None
            goldens[(g.build_id, g.boot_profile)] = rec
        events = [e.as_dict() for e in await st.events()]
    return profiles, goldens, events


def write_private(path: Path, key: Any) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def write_public(path: Path, key: Any) -> Path:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def resign(blob: bytes, key: Ed25519PrivateKey,
           edit: Callable[[dict[str, Any], bytes], bytes | None]) -> bytes:
    """The bundle with its header edited by `edit(header, payload)` (which may return a
    new payload), signed again by `key`: a bundle from the trusted signer that lies."""
    _, version, flags, hlen, plen = _PREFIX.unpack_from(blob)
    header = orjson.loads(blob[PREFIX_SIZE:PREFIX_SIZE + hlen])
    payload = blob[PREFIX_SIZE + hlen:PREFIX_SIZE + hlen + plen]
    payload = edit(header, payload) or payload
    hb = orjson.dumps(header)
    signed = _PREFIX.pack(b"KSCANBDL", version, flags, len(hb), len(payload)) + hb + payload
    return signed + key.sign(signed)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    sign, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    return {"sign": sign, "other": other,
            "key": write_private(tmp_path / "sign.pem", sign),
            "pub": write_public(tmp_path / "sign.pub.pem", sign),
            "other_pub": write_public(tmp_path / "other.pub.pem", other)}


@pytest.fixture
def exported(tmp_path: Path, keys: dict[str, Any]) -> Path:
    """DB-A with a profile and a golden baseline, exported to a bundle."""
    db_a = tmp_path / "a.db"
    asyncio.run(fill(db_a, [make_profile()], [golden(boots=2)]))
    out = tmp_path / "fleet.kbundle"
    assert main(["export", "--db", str(db_a), "--out", str(out), "--key",
                 str(keys["key"])]) == 0
    return out


def import_args(bundle: Path, pub: Path, db: Path, *extra: str) -> list[str]:
    return ["import", str(bundle), "--trust", str(pub), "--db", str(db), *extra]


def refused(capsys: pytest.CaptureFixture[str], args: list[str], *words: str) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kscan: "), err
    for w in words:
        assert w in err, err
    return err


# ------------------------------------------------------------------------ round trip


def test_round_trip_into_a_fresh_database(tmp_path: Path, keys: dict[str, Any],
                                          exported: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    db_b = tmp_path / "b.db"
    assert main(import_args(exported, keys["pub"], db_b)) == 0
    out = capsys.readouterr().out
    assert "profiles 1 added" in out and "golden baselines 1 added" in out, out
    profiles, goldens, events = asyncio.run(read_all(db_b))
    want = golden(boots=2)    # hashed under b.db's key: the one the import installed
    assert profiles == {"b1d": make_profile().to_bytes()}
    got = goldens[("b1d", BOOT_KEY)]
    assert got.regions == want.regions and got.contents == want.contents
    a = asyncio.run(read_all(tmp_path / "a.db"))[1][("b1d", BOOT_KEY)]
    # Everything travels but the hashes: made again under this host's key, from content.
    def hashless(g: GoldenRecord) -> dict[str, tuple[Any, ...]]:
        return {n: (r.size, r.per_boot, r.boots, r.meta) for n, r in g.regions.items()}

    assert hashless(got) == hashless(a)
    assert all(r.region_hash != a.regions[n].region_hash
               and r.page_hashes != a.regions[n].page_hashes for n, r in got.regions.items())
    assert dataclasses.replace(got, regions={}) == dataclasses.replace(a, regions={})
    assert got.regions[".rodata"].per_boot_pages() == [9, 10]
    assert all(r.boots == 2 for r in got.regions.values())
    [ev] = events
    assert ev["event"] == "imported" and ev["key_id"] == key_id(keys["sign"])
    assert ev["outcome"]["golden"]["added"] == [["b1d", BOOT_KEY]]
    # Idempotent: a second import adds nothing (and says so in the log).
    def no_log(rows: list[str]) -> list[str]:
        return [r for r in rows if '"event"' not in r and "'event'" not in r]
    before = no_log(dump(db_b))
    assert main(import_args(exported, keys["pub"], db_b)) == 0
    assert "golden baselines 0 added, 0 replaced, 1 already stored" in capsys.readouterr().out
    assert no_log(dump(db_b)) == before
    ev2 = asyncio.run(read_all(db_b))[2][-1]
    assert ev2["outcome"]["profiles"]["kept"] == ["b1d"]
    assert ev2["outcome"]["golden"]["unchanged"] == [["b1d", BOOT_KEY]]


def test_export_selects_build_ids(tmp_path: Path, keys: dict[str, Any],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    db_a = tmp_path / "a.db"
    asyncio.run(fill(db_a, [make_profile("b1d"), make_profile("c2e")],
                     [golden("b1d"), golden("c2e", seed=2)]))
    out = tmp_path / "one.kbundle"
    assert main(["export", "--db", str(db_a), "--out", str(out), "--key", str(keys["key"]),
                 "--build-id", "c2e"]) == 0
    assert "1 profile(s), 1 golden baseline(s)" in capsys.readouterr().out
    b = decode_bundle(out.read_bytes(), keys["sign"].public_key())
    assert [p.build_id for p in b.profiles] == ["c2e"]
    assert [g.build_id for g in b.goldens] == ["c2e"]
    refused(capsys, ["export", "--db", str(db_a), "--out", str(out), "--key",
                     str(keys["key"]), "--build-id", "nope"], "no stored profile", "nope")
    refused(capsys, ["export", "--db", str(tmp_path / "none.db"), "--out", str(out),
                     "--key", str(keys["key"])], "does not exist")
    assert not (tmp_path / "none.db").exists()


def test_a_different_local_baseline_is_kept_unless_replace(
        tmp_path: Path, keys: dict[str, Any], exported: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    db_b = tmp_path / "b.db"
    local = golden(seed=7)
    asyncio.run(fill(db_b, [make_profile()], [local]))
    capsys.readouterr()
    assert main(import_args(exported, keys["pub"], db_b)) == 0
    cap = capsys.readouterr()
    assert "1 kept local" in cap.out and "kept the local golden baseline" in cap.err
    _, goldens, events = asyncio.run(read_all(db_b))
    # (b.db's own baseline was re-hashed under its key when kscan first opened it)
    assert goldens[("b1d", BOOT_KEY)].contents == local.contents
    assert goldens[("b1d", BOOT_KEY)].regions == golden(seed=7).regions
    assert events[-1]["outcome"]["golden"]["kept_local"] == [["b1d", BOOT_KEY]]
    assert main(import_args(exported, keys["pub"], db_b, "--replace")) == 0
    _, goldens, events = asyncio.run(read_all(db_b))
    assert goldens[("b1d", BOOT_KEY)].regions == golden(boots=2).regions
    assert events[-1]["outcome"]["golden"]["replaced"] == [["b1d", BOOT_KEY]]
    assert events[-1]["replace"] is True


def test_a_richer_profile_upgrades_a_stored_one_only_with_replace(
        tmp_path: Path, keys: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """What the stored profile says is where kscan looks in every VM of that kernel: a
    signed bundle changes it only when asked (--replace)."""
    db_a, db_b = tmp_path / "a.db", tmp_path / "b.db"
    richer = make_profile(early_idt=(0xFFFF_FFFF_8300_0000, 9))
    asyncio.run(fill(db_a, [richer], [golden()]))
    asyncio.run(fill(db_b, [make_profile()], []))
    out = tmp_path / "x.kbundle"
    assert main(["export", "--db", str(db_a), "--out", str(out), "--key",
                 str(keys["key"])]) == 0
    capsys.readouterr()
    assert main(import_args(out, keys["pub"], db_b)) == 0
    cap = capsys.readouterr()
    assert "0 upgraded, 1 already stored" in cap.out
    assert "kept the local profile of b1d" in cap.err and "--replace" in cap.err
    profiles, _, _ = asyncio.run(read_all(db_b))
    assert profiles["b1d"] == make_profile().to_bytes()
    assert main(import_args(out, keys["pub"], db_b, "--replace")) == 0
    assert "1 upgraded" in capsys.readouterr().out
    profiles, _, _ = asyncio.run(read_all(db_b))
    assert KernelProfile.from_bytes(profiles["b1d"]).early_idt == richer.early_idt
    # The other way round, a stored richer profile is kept.
    assert main(["export", "--db", str(tmp_path / "b.db"), "--out", str(out), "--key",
                 str(keys["key"])]) == 0


# ------------------------------------------------------------------ refused bundles


def test_another_signer_is_refused_and_nothing_changes(
        tmp_path: Path, keys: dict[str, Any], exported: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    fresh = tmp_path / "fresh.db"
    refused(capsys, import_args(exported, keys["other_pub"], fresh), str(exported),
            "signed by another key", key_id(keys["sign"])[:16])
    assert not fresh.exists()   # not even created
    db_b = tmp_path / "b.db"
    asyncio.run(fill(db_b, [make_profile("zzz")], []))
    before = dump(db_b)
    refused(capsys, import_args(exported, keys["other_pub"], db_b), "signed by another key")
    assert dump(db_b) == before


def test_every_sampled_byte_flip_is_refused(tmp_path: Path, keys: dict[str, Any],
                                            exported: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    blob = exported.read_bytes()
    pub = keys["sign"].public_key()
    _, _, _, hlen, plen = _PREFIX.unpack_from(blob)
    header_end, payload_end = PREFIX_SIZE + hlen, PREFIX_SIZE + hlen + plen
    rng = random.Random(12)
    positions = sorted(set(
        list(range(PREFIX_SIZE))                                   # every prefix byte
        + rng.sample(range(PREFIX_SIZE, header_end), 150)          # header
        + rng.sample(range(header_end, payload_end), 250)          # payload
        + list(range(payload_end, len(blob)))))                    # every signature byte
    assert len(blob) == payload_end + SIG_SIZE
    for pos in positions:
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[pos] ^= mask
            with pytest.raises(BundleError):
                decode_bundle(bytes(bad), pub, name="x")
    # Through the command line, with the database compared before and after.
    db_b = tmp_path / "b.db"
    asyncio.run(fill(db_b, [make_profile("zzz")], []))
    before = dump(db_b)
    flipped = tmp_path / "flipped.kbundle"
    for pos, what in ((3, "not a kscan baseline bundle"), (PREFIX_SIZE + 5, "signature"),
                      (header_end + plen // 2, "signature"), (len(blob) - 1, "signature")):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        flipped.write_bytes(bad)
        refused(capsys, import_args(flipped, keys["pub"], db_b), str(flipped), what)
        assert dump(db_b) == before
    print(f"{len(positions) * 3} flips at {len(positions)} of {len(blob)} positions refused")


def test_truncated_or_extended_bundles_are_refused(
        tmp_path: Path, keys: dict[str, Any], exported: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    blob = exported.read_bytes()
    pub = keys["sign"].public_key()
    for n in (0, 1, 7, 8, PREFIX_SIZE, PREFIX_SIZE + SIG_SIZE - 1, PREFIX_SIZE + 100,
              len(blob) // 2, len(blob) - SIG_SIZE, len(blob) - 1):
        with pytest.raises(BundleError):
            decode_bundle(blob[:n], pub)
    for extra in (b"\0", b"x" * 1000, blob[-SIG_SIZE:]):
        with pytest.raises(BundleError, match="after the signature"):
            decode_bundle(blob + extra, pub)
    db_b = tmp_path / "b.db"
    asyncio.run(fill(db_b, [make_profile("zzz")], []))
    before = dump(db_b)
    cut = tmp_path / "cut.kbundle"
    cut.write_bytes(blob[:-1])
    refused(capsys, import_args(cut, keys["pub"], db_b), str(cut), "truncated")
    cut.write_bytes(blob + b"\n")
    refused(capsys, import_args(cut, keys["pub"], db_b), "1 unexpected bytes")
    cut.write_bytes(b"")
    refused(capsys, import_args(cut, keys["pub"], db_b), "not a kscan baseline bundle")
    refused(capsys, import_args(tmp_path / "missing", keys["pub"], db_b), "cannot read")
    assert dump(db_b) == before


def _set(path: str, value: Any) -> Callable[[dict[str, Any], bytes], None]:
    def edit(header: dict[str, Any], payload: bytes) -> None:
        obj: Any = header
        keys = path.split(".")
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        obj[keys[-1]] = value(obj[keys[-1]]) if callable(value) else value
    return edit


@pytest.mark.parametrize("edit, words", [
    (_set("payload.raw_size", lambda v: v + 1), "decompresses to"),
    (_set("payload.raw_size", lambda v: v - 1), "decompresses to"),
    (_set("payload.raw_size", 1 << 40), "over the"),
    (_set("payload.size", lambda v: v + 1), "prefix"),
    (_set("payload.sha256", "00" * 32), "payload sha256"),
    (_set("items.0.data.size", lambda v: v + 1), "sha256"),
    (_set("items.0.data.size", 1 << 40), "of the payload are left"),
    (_set("items.1.regions.0.page_hashes.size", lambda v: v - 8), "sha256"),
    (_set("items.1.regions.0.size", -1), "not an integer"),
    (_set("items.1.regions.0.size", "big"), "not an integer"),
    (_set("items.1.regions.0.boots", 0), "boots"),
    (_set("items.1.regions.0.region_hash", "zz"), "region"),
    (_set("items.1.regions", [{}] * 17), "over the limit"),
    (_set("items", lambda v: v + v), "are left"),    # the parts no longer line up
    (_set("items", lambda v: v[1:]), "sha256"),
    (lambda h, p: _drop_first_item(h, p), "without its profile"),
    (_set("items.0.kind", "script"), "unknown kind"),
    (_set("items.0.build_id", "x" * 5000), "longer than"),
    (_set("format", 1), "format"),
    (_set("format", 3), "format"),
    (_set("sequence", -1), "not an integer"),
    (_set("sequence", "9"), "not an integer"),
    (_set("sequence", 1 << 63), "over the limit"),
    (lambda h, p: h.pop("sequence") and None, "no 'sequence'"),
    (_set("key_id", "ab" * 32), "header names key"),
])
def test_a_signed_header_that_lies_is_refused(keys: dict[str, Any], exported: Path,
                                              edit: Callable[[dict[str, Any], bytes], None],
                                              words: str) -> None:
    blob = resign(exported.read_bytes(), keys["sign"], edit)
    with pytest.raises(BundleError, match=words):
        decode_bundle(blob, keys["sign"].public_key())


def _drop_first_item(header: dict[str, Any], payload: bytes) -> bytes:
    """Drop the profile, and its part of the payload, consistently."""
    raw = zstandard.decompress(payload)[header["items"][0]["data"]["size"]:]
    header["items"] = header["items"][1:]
    new = zstandard.ZstdCompressor().compress(raw)
    header["payload"].update(size=len(new), sha256=hashlib.sha256(new).hexdigest(),
                             raw_size=len(raw))
    return new


def test_duplicate_records_are_refused(keys: dict[str, Any]) -> None:
    p = ProfileRow("b1d", "r", "v", make_profile().to_bytes(), 1.0)
    pub = keys["sign"].public_key()
    with pytest.raises(BundleError, match="profile b1d twice"):
        decode_bundle(encode_bundle([p, p], [], keys["sign"]), pub)
    with pytest.raises(BundleError, match=r"golden baseline b1d .* twice"):
        decode_bundle(encode_bundle([p], [golden(), golden(seed=3)], keys["sign"]), pub)


def test_sizes_over_the_limits_are_refused_before_the_signature(
        keys: dict[str, Any], exported: Path) -> None:
    blob = exported.read_bytes()
    pub = keys["sign"].public_key()
    with pytest.raises(BundleError, match="larger than"):
        decode_bundle(blob, pub, limits=Limits(file=len(blob) - 1))
    with pytest.raises(BundleError, match="header length"):
        decode_bundle(blob, pub, limits=Limits(header=100))
    with pytest.raises(BundleError, match="decompresses to"):
        decode_bundle(blob, pub, limits=Limits(raw=1000))
    with pytest.raises(BundleError, match="over the limit of 1"):
        decode_bundle(blob, pub, limits=Limits(items=1))
    # Lengths in the prefix beyond the file: refused as truncated, nothing allocated.
    bad = bytearray(blob)
    struct.pack_into("<Q", bad, 16, (1 << 64) - 1)
    with pytest.raises(BundleError, match="payload length"):
        decode_bundle(bytes(bad), pub)
    struct.pack_into("<IQ", bad, 12, 10, 10)
    with pytest.raises(BundleError, match="unexpected bytes"):
        decode_bundle(bytes(bad), pub)


def test_a_zip_bomb_payload_is_capped(keys: dict[str, Any]) -> None:
    """A signed payload whose frame hides its size decompresses no further than the
    header's raw_size."""
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (64 << 20))

    def edit(header: dict[str, Any], payload: bytes) -> bytes:
        header["payload"].update(size=len(bomb), sha256=hashlib.sha256(bomb).hexdigest())
        return bomb
    blob = encode_bundle([ProfileRow("b1d", "r", "v", b"p", 1.0)], [], keys["sign"])
    with pytest.raises(BundleError, match=r"its zstd frame -1$"):
        decode_bundle(resign(blob, keys["sign"], edit), keys["sign"].public_key())


def test_unusable_records_in_a_verified_bundle_are_refused(
        tmp_path: Path, keys: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    db_b = tmp_path / "b.db"
    out = tmp_path / "x.kbundle"
    prof = make_profile()
    for profiles, goldens, words in (
        ([ProfileRow("b1d", "r", "v", b"not a profile", 1.0)], [], "cannot be read"),
        ([ProfileRow("c2e", "r", "v", prof.to_bytes(), 1.0)], [], "is the profile of b1d"),
        ([ProfileRow("b1d", "r", "v", prof.to_bytes(), 1.0)],
         [_with_content(golden(), ".text", zstandard.compress(b"x"))], "not a zstd frame"),
        ([ProfileRow("b1d", "r", "v", prof.to_bytes(), 1.0)],
         [_renamed(golden(), ".text", ".data")], "unknown regions .data"),
    ):
        out.write_bytes(encode_bundle(profiles, goldens, keys["sign"]))
        refused(capsys, import_args(out, keys["pub"], db_b), str(out), words)
        assert not db_b.exists()


def _with_content(g: GoldenRecord, name: str, data: bytes) -> GoldenRecord:
    return GoldenRecord(g.build_id, g.boot_profile, g.source_vm, g.created_at, g.regions,
                        {**g.contents, name: data})


def _renamed(g: GoldenRecord, old: str, new: str) -> GoldenRecord:
    def ren(d: dict[str, Any]) -> dict[str, Any]:
        return {(new if k == old else k): v for k, v in d.items()}
    return GoldenRecord(g.build_id, g.boot_profile, g.source_vm, g.created_at,
                        ren(g.regions), ren(g.contents))


# ----------------------------------------------------------------------------- keys


def test_keys_of_other_kinds_give_one_line(tmp_path: Path, keys: dict[str, Any],
                                           exported: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_priv = write_private(tmp_path / "rsa.pem", rsa_key)
    rsa_pub = write_public(tmp_path / "rsa.pub.pem", rsa_key)
    ec_pub = write_public(tmp_path / "ec.pub.pem", ec_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all!\n"
                        b"-----END PRIVATE KEY-----\n")
    notpem = tmp_path / "random.bin"
    notpem.write_bytes(random.Random(1).randbytes(300))
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(keys["sign"].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    db_a = tmp_path / "a.db"
    asyncio.run(fill(db_a, [make_profile()], [golden()]))
    out = tmp_path / "k.kbundle"

    def export(key: Path) -> list[str]:
        return ["export", "--db", str(db_a), "--out", str(out), "--key", str(key)]

    refused(capsys, export(rsa_priv), str(rsa_priv), "is an RSA key", "Ed25519")
    refused(capsys, export(garbage), str(garbage), "not a readable PEM private key")
    refused(capsys, export(notpem), str(notpem), "not a PEM file")
    refused(capsys, export(encrypted), "encrypted")
    refused(capsys, export(keys["pub"]), "is a public key")
    refused(capsys, export(tmp_path / "nokey.pem"), "No such file")
    assert not out.exists()
    db_b = tmp_path / "b.db"
    refused(capsys, import_args(exported, rsa_pub, db_b), str(rsa_pub), "is an RSA key")
    refused(capsys, import_args(exported, ec_pub, db_b), "is an EC key")
    refused(capsys, import_args(exported, garbage, db_b), "is a private key")
    refused(capsys, import_args(exported, keys["key"], db_b), "is a private key")
    refused(capsys, import_args(exported, notpem, db_b), "not a PEM file")
    assert not db_b.exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_openssl_made_keys_work(tmp_path: Path) -> None:
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)
    db_a, db_b = tmp_path / "a.db", tmp_path / "b.db"
    asyncio.run(fill(db_a, [make_profile()], [golden()]))
    out = tmp_path / "o.kbundle"
    # The real command line, in its own process: exit codes and one-line errors.
    res = kscan("export", "--db", str(db_a), "--out", str(out), "--key", str(key))
    assert res.returncode == 0, res.stderr
    res = kscan("import", str(out), "--trust", str(pub), "--db", str(db_b))
    assert res.returncode == 0, res.stderr
    assert "golden baselines 1 added" in res.stdout
    other = tmp_path / "o2.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(other)],
                   check=True, capture_output=True)
    res = kscan("export", "--db", str(db_a), "--out", str(out), "--key", str(other))
    assert res.returncode == 0, res.stderr
    before = dump(db_b)
    res = kscan("import", str(out), "--trust", str(pub), "--db", str(db_b))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert f"bundle {out}: signed by another key" in res.stderr
    assert dump(db_b) == before


# ------------------------------------------------------------------------ rollback


def _export(db: Path, out: Path, keys: dict[str, Any]) -> int:
    """Export `db` to `out`; the bundle's sequence number."""
    assert main(["export", "--db", str(db), "--out", str(out), "--key", str(keys["key"])]) == 0
    seq = decode_bundle(out.read_bytes(), keys["sign"].public_key()).sequence
    assert seq is not None
    return seq


def _delete_golden(db: Path, build_id: str, boot_profile: str) -> None:
    """What an operator does to drop a baseline found bad (no kscan command for it)."""
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("DELETE FROM golden WHERE build_id = ? AND boot_profile = ?",
                    (build_id, boot_profile))
        con.commit()
    finally:
        con.close()


def test_every_export_has_a_newer_sequence(tmp_path: Path, keys: dict[str, Any],
                                           exported: Path) -> None:
    seqs = [decode_bundle(exported.read_bytes(), keys["sign"].public_key()).sequence]
    for i in range(3):   # within the same second: still strictly increasing
        seqs.append(_export(tmp_path / "a.db", tmp_path / f"n{i}.kbundle", keys))
    assert all(a is not None and b is not None and b > a
               for a, b in itertools.pairwise(seqs))
    _, _, events = asyncio.run(read_all(tmp_path / "a.db"))
    assert [e["sequence"] for e in events if e["event"] == "exported"] == seqs


def test_an_old_bundle_replayed_is_refused_and_restores_nothing(
        tmp_path: Path, keys: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """The attack: the signer's old bundle still carries a baseline deleted since (say,
    taken from a VM found compromised). Replayed, it must not bring it back."""
    db_a, db_b = tmp_path / "a.db", tmp_path / "b.db"
    bad_key = ("b1d", "other/boot")
    asyncio.run(fill(db_a, [make_profile()], [golden(), golden(key=bad_key[1], seed=5)]))
    old = tmp_path / "old.kbundle"
    old_seq = _export(db_a, old, keys)
    _delete_golden(db_a, *bad_key)               # the signer drops it ...
    new = tmp_path / "new.kbundle"
    assert _export(db_a, new, keys) > old_seq
    assert main(import_args(old, keys["pub"], db_b)) == 0
    _delete_golden(db_b, *bad_key)               # ... and so does this host
    assert main(import_args(new, keys["pub"], db_b)) == 0
    before = dump(db_b)
    err = refused(capsys, import_args(old, keys["pub"], db_b), str(old), "older than the "
                  "newest", str(old_seq), "--allow-older")
    assert "sequence" in err
    assert dump(db_b) == before                  # not even an event
    # --allow-older lets it in, but what is missing stays missing without --replace.
    capsys.readouterr()
    assert main(import_args(old, keys["pub"], db_b, "--allow-older")) == 0
    assert "did not restore the golden baseline of b1d boot profile other/boot" in \
        capsys.readouterr().err
    _, goldens, events = asyncio.run(read_all(db_b))
    assert bad_key not in goldens
    assert events[-1]["outcome"]["golden"]["not_restored"] == [list(bad_key)]
    assert events[-1]["allow_older"] is True and events[-1]["sequence"] == old_seq
    assert main(import_args(old, keys["pub"], db_b, "--allow-older", "--replace")) == 0
    assert bad_key in asyncio.run(read_all(db_b))[1]
    # Taking an older bundle in never lowers the newest sequence known for the key.
    _delete_golden(db_b, *bad_key)
    refused(capsys, import_args(old, keys["pub"], db_b), "older than the newest")


def test_the_same_bundle_again_does_not_restore_a_deleted_baseline(
        tmp_path: Path, keys: dict[str, Any], exported: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    db_b = tmp_path / "b.db"
    assert main(import_args(exported, keys["pub"], db_b)) == 0
    _delete_golden(db_b, "b1d", BOOT_KEY)
    assert main(import_args(exported, keys["pub"], db_b)) == 0
    assert ("b1d", BOOT_KEY) not in asyncio.run(read_all(db_b))[1]
    assert main(import_args(exported, keys["pub"], db_b, "--replace")) == 0
    assert ("b1d", BOOT_KEY) in asyncio.run(read_all(db_b))[1]
    # Another signer's sequence numbers are its own: its bundle is not "older".
    other = tmp_path / "other.pem"
    write_private(other, keys["other"])
    db_c = tmp_path / "c.db"
    asyncio.run(fill(db_c, [make_profile("c2e")], [golden("c2e", seed=3)]))
    out = tmp_path / "c.kbundle"
    assert main(["export", "--db", str(db_c), "--out", str(out), "--key", str(other)]) == 0
    assert main(import_args(out, keys["other_pub"], db_b)) == 0
    assert ("c2e", BOOT_KEY) in asyncio.run(read_all(db_b))[1]


def _as_format_1(blob: bytes, key: Ed25519PrivateKey) -> bytes:
    """The bundle as kscan wrote it before sequence numbers: version 1, no sequence."""
    def edit(header: dict[str, Any], payload: bytes) -> None:
        header["format"] = 1
        del header["sequence"]
    v2 = resign(blob, key, edit)
    signed = bytearray(v2[:-SIG_SIZE])
    struct.pack_into("<H", signed, 8, 1)
    return bytes(signed) + key.sign(bytes(signed))


def test_a_format_1_bundle_needs_allow_older(tmp_path: Path, keys: dict[str, Any],
                                             exported: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    v1 = tmp_path / "v1.kbundle"
    v1.write_bytes(_as_format_1(exported.read_bytes(), keys["sign"]))
    assert decode_bundle(v1.read_bytes(), keys["sign"].public_key()).sequence is None
    fresh = tmp_path / "fresh.db"
    refused(capsys, import_args(v1, keys["pub"], fresh), "format-1", "--allow-older")
    assert not fresh.exists()
    assert main(import_args(v1, keys["pub"], fresh, "--allow-older", "--replace")) == 0
    assert ("b1d", BOOT_KEY) in asyncio.run(read_all(fresh))[1]


# ------------------------------------------------------------------ writing safely


def test_export_never_writes_through_a_planted_temporary_name(
        tmp_path: Path, keys: dict[str, Any], exported: Path) -> None:
    """In a directory others can write to, the temporary name kscan used to pick
    (`.NAME.PID.tmp`) could be planted as a symlink to a file kscan may write."""
    import os

    out_dir = tmp_path / "shared"
    out_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = out_dir / "fleet.kbundle"
    (out_dir / f".{out.name}.{os.getpid()}.tmp").symlink_to(victim)
    assert main(["export", "--db", str(tmp_path / "a.db"), "--out", str(out), "--key",
                 str(keys["key"])]) == 0
    assert victim.read_bytes() == b"precious"
    assert decode_bundle(out.read_bytes(), keys["sign"].public_key()).profiles
    assert out.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [out.name, f".{out.name}.{os.getpid()}.tmp"])   # no temporary file left behind

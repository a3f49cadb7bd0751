"""Signed baseline bundles: kernel profiles and golden baselines in one file, signed
with an Ed25519 key, so that a baseline verified on one host is trusted on many.

    key = load_private_key("signing.pem")        # openssl genpkey -algorithm ed25519
    blob = encode_bundle(profiles, goldens, key)
    write_bundle_file("fleet.kbundle", blob)
    ...
    bundle = read_bundle_file("fleet.kbundle", load_public_key("signing.pub.pem"))

Format, version 2 (integers little-endian):

    offset     size  field
    0          8     magic b"KSCANBDL"
    8          2     format version (2; 1 is still read, see below)
    10         2     flags (0; anything else is refused)
    12         4     H: header length
    16         8     P: payload length
    24         H     header: a UTF-8 JSON object (below)
    24+H       P     payload: one zstd frame (with its content size)
    24+H+P     64    Ed25519 signature of bytes [0, 24+H+P) — everything before it
                     (end of file: nothing may follow)

The header:

    {"format": 2, "producer": "kscan 0.1.0", "created": <Unix time>,
     "key_id": "<sha256 hex of the signer's raw 32-byte public key>",
     "sequence": <integer >= 0, grows with every bundle signed with that key>,
     "payload": {"compression": "zstd", "size": P, "sha256": "<of the P bytes>",
                 "raw_size": <decompressed size>},
     "items": [
       {"kind": "profile", "build_id": ..., "release": ..., "version": ...,
        "added_at": ..., "data": PART},
       {"kind": "golden", "build_id": ..., "boot_profile": ..., "source_vm": ...,
        "created_at": ..., "regions": [
           {"name": ".text", "size": ..., "region_hash": "<32 hex>", "boots": ...,
            "meta": {...}, "page_hashes": PART, "per_boot": PART,
            "content": PART or null}, ...]}, ...]}

where PART is {"size": n, "sha256": "<hex>"}: the manifest of the payload. The
decompressed payload is exactly the concatenation of every PART in header order (no
offsets to lie about: the sizes must add up to `raw_size`). Profile data and golden
content are opaque bytes, as `Store` keeps them; `meta` is the region's metadata in
`store.codec`'s JSON form. Every golden baseline's profile is in the same bundle.

The sequence number is what rollback protection rests on: `kscan import` refuses a
bundle whose sequence is older than the newest it imported from the same key (unless
`--allow-older`), so that an old signed bundle replayed cannot bring back baselines
deleted or replaced since. `kscan export` takes the larger of the Unix time and one more
than the last sequence its database exported with the key. Version 1 bundles (no
sequence) are still decoded (`Bundle.sequence` None); import takes them only with
`--allow-older`.

Reading checks, in this order, before anything is believed: size (at most
`Limits.file`), magic, version, flags, the two lengths against their limits and the
file size (truncation, trailing bytes), then the signature with the one trusted key —
and only then parses the header, checks it against the payload (size, sha256, the zstd
frame's content size, `raw_size` against `Limits.raw`), decompresses with the output
capped at `raw_size`, checks every part's sha256, and validates every record (counts,
string lengths, region layout as `GoldenRegion` enforces it). Any failure raises
`BundleError` with one line saying what is wrong.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import zstandard
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kscan import __version__
from store import codec
from store.errors import BundleError, KeyFileError
from store.models import GoldenRecord, GoldenRegion, ProfileRow

__all__ = ["FORMAT_VERSION", "MAGIC", "MAX_SEQUENCE", "Bundle", "Limits", "decode_bundle",
           "encode_bundle", "key_id", "load_private_key", "load_public_key", "read_bundle_file",
           "write_bundle_file"]

MAGIC = b"KSCANBDL"
FORMAT_VERSION = 2
#: Versions `decode_bundle` reads: 1 had no sequence number.
READ_VERSIONS = (1, 2)
#: Sequence numbers fit SQLite's signed 64-bit integers, with room to grow.
MAX_SEQUENCE = 1 << 62
_PREFIX = struct.Struct("<8sHHIQ")       # magic, version, flags, H, P
PREFIX_SIZE = _PREFIX.size               # 24
SIG_SIZE = 64
_KEY_FILE_MAX = 64 * 1024
_ZSTD_LEVEL = 10


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds on everything read from a bundle (verified or not)."""

    file: int = 512 << 20            # whole file
    header: int = 16 << 20           # header JSON
    raw: int = 1 << 30               # decompressed payload
    items: int = 10_000              # profiles + golden baselines
    regions: int = 16                # regions per golden baseline
    text: int = 4096                 # any string (build id, release, boot profile key...)


DEFAULT_LIMITS = Limits()

#: Builds the BundleError naming the bundle: bad(message, hint="").
_Bad = Callable[..., BundleError]


@dataclass(frozen=True, slots=True)
class Bundle:
    """A verified, decoded bundle."""

    key_id: str                      # sha256 hex of the signer's raw public key
    created: float
    producer: str
    profiles: tuple[ProfileRow, ...]
    goldens: tuple[GoldenRecord, ...]
    size: int = 0                    # bytes of the file
    raw_size: int = 0                # bytes of the decompressed payload
    #: The signer's sequence number (rollback protection); None in a version 1 bundle.
    sequence: int | None = None


# ------------------------------------------------------------------------------ keys


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The key's fingerprint: sha256 (hex) of its raw 32-byte public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _read_key_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_KEY_FILE_MAX + 1)
    except OSError as err:
        raise KeyFileError(err.strerror or str(err), path=str(path)) from err
    if len(data) > _KEY_FILE_MAX:
        raise KeyFileError(f"larger than {_KEY_FILE_MAX} bytes: not a key file",
                           path=str(path))
    if b"-----BEGIN" not in data:
        raise KeyFileError("not a PEM file", path=str(path),
                           hint="make one with: openssl genpkey -algorithm ed25519 -out KEY.pem")
    return data


def _kind(key: object) -> str:
    """'an RSA', 'an EC', ... for a key of another algorithm."""
    name = type(key).__name__.lstrip("_").upper()
    for tag, said in (("RSA", "an RSA"), ("ELLIPTICCURVE", "an EC"), ("EC", "an EC"),
                      ("DSA", "a DSA"), ("ED448", "an Ed448"), ("X25519", "an X25519"),
                      ("X448", "an X448"), ("DH", "a DH")):
        if name.startswith(tag):
            return said
    return f"a {type(key).__name__}"


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (PKCS#8, as `openssl genpkey -algorithm
    ed25519` writes it). Unencrypted only. KeyFileError otherwise."""
    data = _read_key_file(path)
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise KeyFileError("is a public key; signing needs the private key", path=str(path))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:   # encrypted
        raise KeyFileError("the private key is encrypted", path=str(path),
                           hint="decrypt a copy: openssl pkey -in KEY.pem -out PLAIN.pem") \
            from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"not a readable PEM private key ({_first_line(err)})",
                           path=str(path)) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"is {_kind(key)} key; bundles are signed with Ed25519",
                           path=str(path),
                           hint="make one with: openssl genpkey -algorithm ed25519 -out KEY.pem")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo, as `openssl pkey
    -pubout` writes it). KeyFileError otherwise."""
    data = _read_key_file(path)
    if b"PRIVATE KEY-----" in data:
        raise KeyFileError("is a private key; trust the public key (keep the private key on "
                           "the signing host)", path=str(path),
                           hint="openssl pkey -in KEY.pem -pubout -out PUB.pem")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"not a readable PEM public key ({_first_line(err)})",
                           path=str(path)) from err
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"is {_kind(key)} key; bundles are signed with Ed25519",
                           path=str(path))
    return key


def _first_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:120]


# ---------------------------------------------------------------------------- writing


def encode_bundle(profiles: Sequence[ProfileRow], goldens: Sequence[GoldenRecord],
                  key: Ed25519PrivateKey, *, created: float | None = None,
                  sequence: int | None = None) -> bytes:
    """The signed bundle of these records, with `sequence` (default: the Unix time in
    whole seconds). Every golden's profile must be among `profiles` (ValueError
    otherwise)."""
    if sequence is None:
        sequence = int(time.time())
    if isinstance(sequence, bool) or not isinstance(sequence, int) or \
            not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError(f"sequence must be an integer >= 0, got {sequence!r}")
    have = {p.build_id for p in profiles}
    missing = sorted({g.build_id for g in goldens} - have)
    if missing:
        raise ValueError(f"golden baselines without their profile: {', '.join(missing)}")
    parts: list[bytes] = []

    def part(data: bytes) -> dict[str, Any]:
        parts.append(data)
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    items: list[dict[str, Any]] = []
    for p in profiles:
        items.append({"kind": "profile", "build_id": p.build_id, "release": p.release,
                      "version": p.version, "added_at": p.added_at, "data": part(p.data)})
    for g in goldens:
        regions = []
        for name, r in g.regions.items():
            content = g.contents.get(name)
            regions.append({
                "name": name, "size": r.size, "region_hash": r.region_hash.hex(),
                "boots": r.boots, "meta": orjson.loads(codec.encode(r.meta, "meta")),
                "page_hashes": part(r.page_hashes), "per_boot": part(r.per_boot),
                "content": None if content is None else part(content)})
        items.append({"kind": "golden", "build_id": g.build_id,
                      "boot_profile": g.boot_profile, "source_vm": g.source_vm,
                      "created_at": g.created_at, "regions": regions})
    raw = b"".join(parts)
    payload = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True,
                                       threads=-1).compress(raw)
    header = orjson.dumps({
        "format": FORMAT_VERSION, "producer": f"kscan {__version__}",
        "created": time.time() if created is None else created, "key_id": key_id(key),
        "sequence": sequence,
        "payload": {"compression": "zstd", "size": len(payload),
                    "sha256": hashlib.sha256(payload).hexdigest(), "raw_size": len(raw)},
        "items": items}, option=orjson.OPT_SORT_KEYS)
    signed = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header), len(payload)) \
        + header + payload
    return signed + key.sign(signed)


def write_bundle_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file beside it, then rename.

    The temporary file has an unpredictable name and is created 0600 with
    O_CREAT|O_EXCL|O_NOFOLLOW: in a directory others can write to (/tmp), a symlink or
    file planted under the name kscan would use is never followed nor written into."""
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    tmp: Path | None = None
    try:
        for _ in range(16):
            candidate = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
            try:
                fd = os.open(candidate, flags, 0o600)
            except FileExistsError:
                continue
            tmp = candidate
            break
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name beside it")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write: {err.strerror or err}", path=str(path)) from err


# ---------------------------------------------------------------------------- reading


def read_bundle_file(path: str | os.PathLike[str], trusted: Ed25519PublicKey, *,
                     limits: Limits = DEFAULT_LIMITS) -> Bundle:
    """Read, verify and decode the bundle at `path` (reading at most `limits.file` + 1
    bytes). BundleError if anything is wrong."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limits.file + 1)
    except OSError as err:
        raise BundleError(f"cannot read: {err.strerror or err}", path=where) from err
    return decode_bundle(data, trusted, name=where, limits=limits)


def decode_bundle(data: bytes, trusted: Ed25519PublicKey, *, name: str = "<bytes>",
                  limits: Limits = DEFAULT_LIMITS) -> Bundle:
    """Verify `data` against the `trusted` key, then decode it (see the module doc)."""
    def bad(message: str, hint: str = "") -> BundleError:
        return BundleError(message, path=name, hint=hint)

    if len(data) > limits.file:
        raise bad(f"larger than the {limits.file}-byte limit")
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise bad("not a kscan baseline bundle (no KSCANBDL magic)")
    if len(data) < PREFIX_SIZE + SIG_SIZE:
        raise bad(f"truncated: {len(data)} bytes, shorter than any bundle "
                  f"({PREFIX_SIZE + SIG_SIZE})")
    _, version, flags, hlen, plen = _PREFIX.unpack_from(data)
    if version not in READ_VERSIONS:
        raise bad(f"format version {version}; this kscan reads versions "
                  f"{', '.join(map(str, READ_VERSIONS))}",
                  hint="upgrade kscan, or export with the kscan version here")
    if flags:
        raise bad(f"unknown flags {flags:#x}")
    if hlen > limits.header:
        raise bad(f"header length {hlen} exceeds the {limits.header}-byte limit")
    if plen > limits.file:
        raise bad(f"payload length {plen} exceeds the {limits.file}-byte limit")
    end = PREFIX_SIZE + hlen + plen
    if len(data) < end + SIG_SIZE:
        raise bad(f"truncated: {len(data)} bytes, its lengths say {end + SIG_SIZE}",
                  hint="copy the bundle again")
    if len(data) > end + SIG_SIZE:
        raise bad(f"{len(data) - end - SIG_SIZE} unexpected bytes after the signature",
                  hint="copy the bundle again")
    trusted_id = key_id(trusted)
    try:
        trusted.verify(data[end:], data[:end])
    except InvalidSignature:
        claimed = _claimed_key_id(data[PREFIX_SIZE:PREFIX_SIZE + hlen])
        if claimed is not None and claimed != trusted_id:
            raise bad(f"signed by another key (key id {claimed[:16]}), not the trusted key "
                      f"({trusted_id[:16]})", hint="import with the signer's public key, "
                      "if you trust it") from None
        raise bad("signature does not verify with the trusted key "
                  f"({trusted_id[:16]}): the bundle was modified or damaged",
                  hint="get an intact copy from the signing host") from None
    # From here on the bytes are the trusted signer's; still checked, and bounded.
    try:
        header = orjson.loads(data[PREFIX_SIZE:PREFIX_SIZE + hlen])
    except orjson.JSONDecodeError as err:
        raise bad(f"header is not JSON ({_first_line(err)})") from err
    h = _Fields(header, "header", bad, limits)
    if h.integer("format") != version:
        raise bad(f"header says format {header['format']}, the prefix {version}")
    sequence = h.integer("sequence") if version >= 2 else None
    if sequence is not None and sequence > MAX_SEQUENCE:
        raise bad(f"sequence {sequence} is over the limit of {MAX_SEQUENCE}")
    if h.string("key_id") != trusted_id:
        raise bad(f"header names key {header['key_id'][:16]} but the trusted key "
                  f"({trusted_id[:16]}) signed it")
    created, producer = h.number("created"), h.string("producer")
    pl = h.obj("payload")
    if pl.string("compression") != "zstd":
        raise bad(f"payload compression {header['payload']['compression']!r} is not zstd")
    if pl.integer("size") != plen:
        raise bad(f"header says the payload is {pl.integer('size')} bytes, the prefix {plen}")
    payload = data[PREFIX_SIZE + hlen:end]
    if hashlib.sha256(payload).hexdigest() != pl.string("sha256"):
        raise bad("payload sha256 differs from the header's")
    raw_size = pl.integer("raw_size")
    if raw_size > limits.raw:
        raise bad(f"payload decompresses to {raw_size} bytes, over the {limits.raw}-byte "
                  "limit")
    try:
        framed = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as err:
        raise bad(f"payload is not a zstd frame ({_first_line(err)})") from err
    if framed != raw_size:
        raise bad(f"header says the payload decompresses to {raw_size} bytes, its zstd "
                  f"frame {framed}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_size)
    except zstandard.ZstdError as err:
        raise bad(f"payload does not decompress ({_first_line(err)})") from err
    if len(raw) != raw_size:
        raise bad(f"payload decompressed to {len(raw)} bytes, the header says {raw_size}")
    items = h.array("items", limits.items)
    parts = _Parts(raw, bad)
    profiles: list[ProfileRow] = []
    goldens: list[GoldenRecord] = []
    for i, item in enumerate(items):
        it = _Fields(item, f"items[{i}]", bad, limits)
        kind = it.string("kind")
        if kind == "profile":
            profiles.append(ProfileRow(
                build_id=it.string("build_id", empty_ok=False), release=it.string("release"),
                version=it.string("version"), data=parts.take(it.obj("data")),
                added_at=it.number("added_at")))
        elif kind == "golden":
            goldens.append(_golden(it, parts, bad, limits))
        else:
            raise bad(f"items[{i}]: unknown kind {kind!r}")
    parts.finish()
    _check_keys(profiles, goldens, bad)
    return Bundle(key_id=trusted_id, created=created, producer=producer,
                  profiles=tuple(profiles), goldens=tuple(goldens), size=len(data),
                  raw_size=raw_size, sequence=sequence)


def _claimed_key_id(header: bytes) -> str | None:
    """The key id an unverified header claims, for the error message only."""
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError:
        return None
    kid = doc.get("key_id") if isinstance(doc, dict) else None
    if isinstance(kid, str) and len(kid) == 64 and all(c in "0123456789abcdef" for c in kid):
        return kid
    return None


def _golden(it: _Fields, parts: _Parts, bad: _Bad, limits: Limits) -> GoldenRecord:
    regions: dict[str, GoldenRegion] = {}
    contents: dict[str, bytes] = {}
    for j, region in enumerate(it.array("regions", limits.regions)):
        r = _Fields(region, f"{it.where}.regions[{j}]", bad, limits)
        name = r.string("name", empty_ok=False)
        if name in regions:
            raise bad(f"{r.where}: region {name!r} twice")
        try:
            region_hash = bytes.fromhex(r.string("region_hash"))
            meta = codec.decode(orjson.dumps(r.raw("meta")))
            if not isinstance(meta, dict):
                raise ValueError("meta is not an object")
            page_hashes, per_boot = parts.take(r.obj("page_hashes")), parts.take(
                r.obj("per_boot"))
            regions[name] = GoldenRegion(size=r.integer("size"), region_hash=region_hash,
                                         page_hashes=page_hashes, per_boot=per_boot,
                                         boots=r.integer("boots"), meta=meta)
        except (ValueError, TypeError) as err:
            raise bad(f"{r.where}: {_first_line(err)}") from err
        content = r.raw("content")
        if content is not None:
            contents[name] = parts.take(r.obj("content"))
    if not regions:
        raise bad(f"{it.where}: a golden baseline without regions")
    return GoldenRecord(build_id=it.string("build_id", empty_ok=False),
                        boot_profile=it.string("boot_profile"), source_vm=it.string("source_vm"),
                        created_at=it.number("created_at"), regions=regions, contents=contents)


def _check_keys(profiles: list[ProfileRow], goldens: list[GoldenRecord], bad: _Bad) -> None:
    seen: set[str] = set()
    for p in profiles:
        if p.build_id in seen:
            raise bad(f"profile {p.build_id} twice")
        seen.add(p.build_id)
    keys: set[tuple[str, str]] = set()
    for g in goldens:
        if g.build_id not in seen:
            raise bad(f"golden baseline of {g.build_id} without its profile")
        if (g.build_id, g.boot_profile) in keys:
            raise bad(f"golden baseline {g.build_id} {g.boot_profile!r} twice")
        keys.add((g.build_id, g.boot_profile))


class _Parts:
    """The decompressed payload, handed out part by part in header order."""

    def __init__(self, raw: bytes, bad: _Bad) -> None:
        self._raw = memoryview(raw)
        self._at = 0
        self._bad = bad

    def take(self, ref: _Fields) -> bytes:
        size, digest = ref.integer("size"), ref.string("sha256")
        if size > len(self._raw) - self._at:
            raise self._bad(f"{ref.where}: {size} bytes, but only "
                            f"{len(self._raw) - self._at} of the payload are left")
        data = bytes(self._raw[self._at:self._at + size])
        if hashlib.sha256(data).hexdigest() != digest:
            raise self._bad(f"{ref.where}: sha256 differs from the header's")
        self._at += size
        return data

    def finish(self) -> None:
        if self._at != len(self._raw):
            raise self._bad(f"{len(self._raw) - self._at} payload bytes belong to no item")


class _Fields:
    """Typed, bounded access to one JSON object of the header; errors name the field."""

    def __init__(self, obj: Any, where: str, bad: _Bad, limits: Limits) -> None:
        if not isinstance(obj, dict):
            raise bad(f"{where}: not a JSON object")
        self._obj: dict[str, Any] = obj
        self.where = where
        self._bad = bad
        self._limits = limits

    def raw(self, key: str) -> Any:
        if key not in self._obj:
            raise self._bad(f"{self.where}: no {key!r}")
        return self._obj[key]

    def string(self, key: str, *, empty_ok: bool = True) -> str:
        v = self.raw(key)
        if not isinstance(v, str) or (not empty_ok and not v):
            raise self._bad(f"{self.where}.{key}: not a{'' if empty_ok else ' non-empty'} "
                            "string")
        if len(v) > self._limits.text:
            raise self._bad(f"{self.where}.{key}: longer than {self._limits.text} characters")
        return v

    def integer(self, key: str) -> int:
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise self._bad(f"{self.where}.{key}: not an integer >= 0")
        return v

    def number(self, key: str) -> float:
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            raise self._bad(f"{self.where}.{key}: not a number")
        return float(v)

    def obj(self, key: str) -> _Fields:
        return _Fields(self.raw(key), f"{self.where}.{key}", self._bad, self._limits)

    def array(self, key: str, limit: int) -> list[Any]:
        v = self.raw(key)
        if not isinstance(v, list):
            raise self._bad(f"{self.where}.{key}: not a list")
        if len(v) > limit:
            raise self._bad(f"{self.where}.{key}: {len(v)} entries, over the limit of {limit}")
        return v

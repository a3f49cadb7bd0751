"""Compact, bounded (de)serialization of kallsyms and patch sites for stored profiles.

Format of both blobs: an 8-byte magic, then zstd of [u32 header length, orjson header,
raw little-endian arrays]. The header names each array as [offset, length, dtype].
Reading checks every reference against the body, caps the decompressed size, and turns
any problem into `scanner.errors.KernelImageError` (a stored profile is input too).

`kallsyms_to_bytes` keeps, by default, only the symbols inside `.text` (what
symbolization of `.text` and the verifiers need: ~45k symbols, ~0.5 MB compressed on
Debian 6.1); `full=True` keeps them all.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import zstandard

from scanner.errors import KernelImageError
from scanner.image.kallsyms import Kallsyms
from scanner.image.patchsites import PatchSites, RuntimeConst

__all__ = ["kallsyms_from_bytes", "kallsyms_to_bytes", "patch_sites_from_bytes",
           "patch_sites_to_bytes"]

_KS_MAGIC = b"KSCNSYM1"
_PS_MAGIC = b"KSCNPS01"
_MAX_RAW = 256 << 20
_DTYPES = {"<u8", "<u4", "<i8", "u1", "|b1", "|u1"}


def _pack(magic: bytes, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    body: list[bytes] = []
    pos = 0
    refs: dict[str, list[Any]] = {}
    for name, arr in arrays.items():
        raw = np.ascontiguousarray(arr).tobytes()
        refs[name] = [pos, len(raw), arr.dtype.str]
        body.append(raw)
        pos += len(raw)
    header = {**header, "arrays": refs}
    head = orjson.dumps(header)
    raw = struct.pack("<I", len(head)) + head + b"".join(body)
    return magic + zstandard.ZstdCompressor(level=9).compress(raw)


def _unpack(magic: bytes, blob: bytes, what: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not isinstance(blob, (bytes, bytearray, memoryview)) or bytes(blob[:8]) != magic:
        raise KernelImageError(f"stored {what} is not in kscan's format", path="<db>")
    try:
        raw = zstandard.ZstdDecompressor().decompress(bytes(blob[8:]), max_output_size=_MAX_RAW)
        (n,) = struct.unpack_from("<I", raw)
        if 4 + n > len(raw):
            raise ValueError("header past the end")
        header = orjson.loads(raw[4:4 + n])
        body = memoryview(raw)[4 + n:]
        arrays: dict[str, np.ndarray] = {}
        for name, (off, size, dtype) in header["arrays"].items():
            if dtype not in _DTYPES or not (off >= 0 and size >= 0 and off + size <= len(body)):
                raise ValueError(f"bad array reference {name}")
            dt = np.dtype(dtype)
            if size % dt.itemsize:
                raise ValueError(f"array {name} is not a whole number of items")
            arrays[name] = np.frombuffer(body[off:off + size], dtype=dt).copy()
        return header, arrays
    except (zstandard.ZstdError, orjson.JSONDecodeError, struct.error, KeyError, TypeError,
            ValueError) as err:
        raise KernelImageError(f"stored {what} is corrupt: {err}", path="<db>") from err


# --------------------------------------------------------------------------- kallsyms


def kallsyms_to_bytes(ks: Kallsyms, *, full: bool = False,
                      also: tuple[int, int] | None = None) -> bytes:
    """Serialize `ks` (only symbols inside `.text`, and inside [also) — `.rodata`, to
    name pointer tables — unless `full`)."""
    lo, hi = ks.text
    a = ks.addresses
    keep = np.ones(a.size, dtype=bool) if full else (a >= np.uint64(lo)) & (a <= np.uint64(hi))
    if also is not None and not full:
        keep |= (a >= np.uint64(also[0])) & (a < np.uint64(also[1]))
    idx = np.flatnonzero(keep)
    addrs = a[idx]
    names = "\n".join(ks.names[i] for i in idx.tolist())
    types = "".join(ks.types[i] for i in idx.tolist())
    # Sorted addresses: deltas are small and compress well.
    deltas = np.diff(addrs, prepend=np.uint64(0)).astype("<u8")
    return _pack(_KS_MAGIC, {"format": 1, "text": list(ks.text), "full": full,
                             "types": types, "count": int(idx.size)},
                 {"deltas": deltas, "names": np.frombuffer(names.encode(), dtype="|u1")})


def kallsyms_from_bytes(blob: bytes) -> Kallsyms:
    h, arr = _unpack(_KS_MAGIC, blob, "kallsyms")
    try:
        addrs = np.cumsum(arr["deltas"].astype(np.uint64), dtype=np.uint64)
        names = tuple(arr["names"].tobytes().decode().split("\n")) if h["count"] else ()
        types = h["types"]
        if not (len(names) == len(types) == addrs.size == h["count"]):
            raise ValueError("counts disagree")
        if addrs.size > 1 and bool((addrs[1:] < addrs[:-1]).any()):
            raise ValueError("addresses not sorted")
        addrs.flags.writeable = False
        return Kallsyms(addresses=addrs, names=names, types=types,
                        text=(int(h["text"][0]), int(h["text"][1])))
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, IndexError) as err:
        raise KernelImageError(f"stored kallsyms is corrupt: {err}", path="<db>") from err


# --------------------------------------------------------------------------- patch sites

_U64_FIELDS = ("ftrace", "jump_code", "jump_target", "jump_key", "static_call_addr",
               "static_call_key", "smp_locks", "function_starts")


#: Added after the format was first used: optional when read.
_LATER_U64 = ("boot_jump_keys", "boot_jump_tramps", "bpf_lsm_hooks", "boot_static_keys")


def patch_sites_to_bytes(ps: PatchSites) -> bytes:
    arrays: dict[str, np.ndarray] = {f: np.asarray(getattr(ps, f)).astype("<u8")
                                     for f in _U64_FIELDS}
    arrays["static_call_tail"] = np.asarray(ps.static_call_tail).astype("|u1")
    arrays["sct_addr"] = np.array(list(ps.static_call_trampolines), dtype="<u8")
    arrays["sct_key"] = np.array(list(ps.static_call_trampolines.values()), dtype="<u8")
    arrays["rc_addr"] = np.array([c.addr for c in ps.runtime_const], dtype="<u8")
    arrays["kprobe_blacklist"] = np.array(ps.kprobe_blacklist, dtype="<u8").reshape(-1)
    arrays["jump_branch"] = np.asarray(ps.jump_branch).astype("|u1")
    arrays["call_targets"] = np.asarray(ps.call_targets).astype("<u8")
    for name in _LATER_U64:
        arrays[name] = np.asarray(getattr(ps, name)).astype("<u8")
    rc_names = sorted({c.name for c in ps.runtime_const})
    header = {
        "format": 1,
        "rc_size": [c.size for c in ps.runtime_const],
        "rc_name": [rc_names.index(c.name) for c in ps.runtime_const],
        "rc_names": rc_names,
        "ftrace_trampolines": {k: list(v) for k, v in ps.ftrace_trampolines.items()},
        "optprobe_template": list(ps.optprobe_template) if ps.optprobe_template else None,
        "readonly": [list(r) for r in ps.readonly],
        "symbols": dict(ps.symbols),
    }
    return _pack(_PS_MAGIC, header, arrays)


def patch_sites_from_bytes(blob: bytes) -> PatchSites:
    h, arr = _unpack(_PS_MAGIC, blob, "patch sites")
    try:
        u64 = {f: arr[f].astype(np.uint64) for f in _U64_FIELDS}
        if not (u64["jump_code"].size == u64["jump_target"].size == u64["jump_key"].size):
            raise ValueError("jump table arrays differ in length")
        if not (u64["static_call_addr"].size == u64["static_call_key"].size
                == arr["static_call_tail"].size):
            raise ValueError("static call arrays differ in length")
        if arr["sct_addr"].size != arr["sct_key"].size:
            raise ValueError("trampoline arrays differ in length")
        rc_addr = arr["rc_addr"].tolist()
        if not len(rc_addr) == len(h["rc_size"]) == len(h["rc_name"]):
            raise ValueError("runtime-constant lists differ in length")
        rc = tuple(RuntimeConst(int(a), int(s), str(h["rc_names"][i]))
                   for a, s, i in zip(rc_addr, h["rc_size"], h["rc_name"], strict=True))
        kb = arr["kprobe_blacklist"].tolist()
        if len(kb) % 2:
            raise ValueError("odd kprobe blacklist")
        opt = h["optprobe_template"]
        # Added later: a profile stored before has none (verifiers then know less).
        branch = arr["jump_branch"].astype(bool) if "jump_branch" in arr else np.zeros(0, bool)
        if branch.size not in (0, u64["jump_code"].size):
            raise ValueError("jump branch flags differ in length from the jump table")
        if ("boot_jump_keys" in arr) != ("boot_jump_tramps" in arr) or (
                "boot_jump_keys" in arr
                and arr["boot_jump_keys"].size != arr["boot_jump_tramps"].size):
            raise ValueError("boot key arrays differ in length")
        return PatchSites(
            **u64,
            static_call_tail=arr["static_call_tail"].astype(bool),
            static_call_trampolines=dict(zip(arr["sct_addr"].tolist(), arr["sct_key"].tolist(),
                                             strict=True)),
            runtime_const=rc,
            kprobe_blacklist=tuple((kb[i], kb[i + 1]) for i in range(0, len(kb), 2)),
            ftrace_trampolines={str(k): (int(v[0]), int(v[1]))
                                for k, v in h["ftrace_trampolines"].items()},
            optprobe_template=(int(opt[0]), int(opt[1])) if opt else None,
            jump_branch=branch,
            readonly=tuple((int(a), int(b)) for a, b in h.get("readonly", [])),
            call_targets=(arr["call_targets"].astype(np.uint64) if "call_targets" in arr
                          else np.zeros(0, dtype=np.uint64)),
            **{n: arr[n].astype(np.uint64) if n in arr else np.zeros(0, dtype=np.uint64)
               for n in _LATER_U64},
            symbols={str(k): int(v) for k, v in h.get("symbols", {}).items()},
        )
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise KernelImageError(f"stored patch sites are corrupt: {err}", path="<db>") from err

"""JSON (orjson) encoding of plain data that may contain bytes.

orjson cannot serialize bytes, and VM state holds raw hashes, so values are walked
before `orjson.dumps` and after `orjson.loads`:

- bytes, bytearray and memoryview become `{"$b": "<base64>"}` and come back as bytes;
- a dict key that starts with `$` gets one more `$` on the way in and loses it on the
  way out, so no user dict can be mistaken for an encoded bytes value;
- tuples come back as lists; dict keys must be str; floats must be finite (JSON has no
  NaN/inf and orjson would silently write null); ints must fit in 64 bits (orjson).

What round-trips exactly: dict[str, ...], list, str, int, finite float, bool, None, bytes.
Anything else is a caller's mistake and raises TypeError/ValueError before any write.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import orjson

__all__ = ["decode", "encode"]

_BYTES_TAG = "$b"
_MAX_DEPTH = 200   # orjson itself refuses deeper than 255


def _to_plain(obj: Any, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where}: float {obj!r} cannot be stored (not finite)")
        return obj
    if isinstance(obj, bytes | bytearray | memoryview):
        return {_BYTES_TAG: base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict key {key!r} is {type(key).__name__}, not str")
            out["$" + key if key.startswith("$") else key] = _to_plain(
                value, f"{where}.{key}", depth + 1)
        return out
    if isinstance(obj, list | tuple):
        return [_to_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored "
                    "(use dict, list, str, int, float, bool, None or bytes)")


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _BYTES_TAG in obj:
            try:
                return base64.b64decode(obj[_BYTES_TAG], validate=True)
            except (binascii.Error, TypeError) as err:
                raise ValueError(f"bad encoded bytes value {obj!r}") from err
        return {(k[1:] if k.startswith("$") else k): _from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_plain(v) for v in obj]
    return obj


def encode(obj: Any, what: str = "value") -> str:
    """Encode plain data (see module doc) as JSON text; `what` names it in errors."""
    try:
        return orjson.dumps(_to_plain(obj, what, 0)).decode("utf-8")
    except orjson.JSONEncodeError as err:   # e.g. an int beyond 64 bits
        raise TypeError(f"{what}: {err}") from err


def decode(text: str | bytes) -> Any:
    """Inverse of `encode`."""
    return _from_plain(orjson.loads(text))

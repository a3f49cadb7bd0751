"""The hashes kscan compares: one definition for baselines, checks, fast passes, resumes.

Everything kscan compares is a keyed function of the content under the host's secret key
(`store.keyfile`: 32 random bytes beside the database, never printed or exported). The
guest's own `.text` is the baseline content, so an unkeyed hash (xxh3 with its public
secret) lets root in the guest solve for a change that keeps every hash: see
`tests/test_collision.py`. With `Keys` derived from the host key:

* **Page and region hashes** (golden and per-VM baselines, the slow path, resume records,
  the keyed fast pass): AES-256-GMAC with a fixed nonce, its 128-bit tag then encrypted
  with a second, independent AES-256 key (one ECB block, batched over a region's pages):
  `H(x) = AES_K2(GHASH_H(x) xor AES_K1(J0))`. For two different inputs of at most l
  16-byte blocks, GHASH collides with probability at most (l+1)/2^128 (it is
  epsilon-almost-XOR-universal; the fixed mask cancels); when it does not, the outputs are
  a random permutation's values at two distinct points. A page hash keeps 64 bits:
  Pr[equal] <= 1/(2^64+1) + 257/2^128 < 2^-64 * (1 + 2^-55) per attempt; a region hash
  keeps all 128: <= (l+1)/2^128 + 2^-128, about 2^-108 for a 15 MB `.text`. The outer
  permutation also hides GHASH's key: unlike a bare fixed-nonce GMAC tag, hashes that did
  leak would not let anyone solve for H and forge.
* **Fast digests** (the fast path's passes but the keyed ones, `scanner.check.fastpath`):
  xxh3_128 seeded with 64 secret bits derived from the key — the same cost as unseeded,
  and not open to the published attack (the secret words are unknown), but not claimed
  to be a cryptographic bound: the keyed pass that follows within `--keyed-every`
  seconds (default 300) plus one period is (docs/design.md "Keyed comparison").
* **Identifiers** a collision would be exploited through (the distinct patch-set
  fingerprint): keyed BLAKE2b-64, a PRF.

A 4 KiB page's GMAC tag costs ~3 µs (~330 k pages/s on one core); AES-NI does the work
and `cryptography` accepts a memoryview, so nothing is copied. xxh3 (python-xxhash ≥ 4)
releases the GIL on buffers over 64 KiB; `cryptography` does not.

`install(key)` sets the process's keys (`scanner.examine.keying.keyed_store` does it when
it opens the database); before that, a random key made for this process is used, so an
unkeyed comparison never happens by accident.

`file_page_fingerprints` is the one unkeyed function: xxh3_64 of the kernel image file's
`.rodata` pages, compared only with a *verified* VM's pages to find data written at boot
(`scanner.check.baseline`); neither side is guest-controlled at that time, and a collision
would only leave a page on the stricter golden basis.

"Page" means a 4 KiB chunk counted from a region's start (a region need not start on a
page boundary: `__ex_table` does not); the last chunk may be shorter.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

import numpy as np
import xxhash
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from translate.x86 import PAGE

__all__ = ["DIGEST_SIZE", "Keys", "current", "fast_digest", "file_page_fingerprints",
           "install", "keyed_digest", "keyed_id", "page_hash", "page_hashes", "raw_digests",
           "region_hash"]

Buffer = bytes | bytearray | memoryview

#: Bytes of a raw-region digest pair: the fast (seeded xxh3_128) digest, then the keyed one.
DIGEST_SIZE = 32
_NONCE_PAGE = b"kscan-page\0\0"     # 12 bytes: GCM's 96-bit nonce, fixed per use
_NONCE_REGION = b"kscan-region"


def _derive(master: bytes, label: str, n: int) -> bytes:
    return hmac.new(master, b"kscan/" + label.encode(), hashlib.sha256).digest()[:n]


class Keys:
    """The keyed functions' keys, derived from the host key (HMAC-SHA256, one label each)."""

    __slots__ = ("_gmac", "_gmac_key", "_id_key", "_outer", "_seed", "key_id", "master")

    def __init__(self, master: bytes) -> None:
        if len(master) < 32:
            raise ValueError("the host key must be at least 32 bytes")
        self.master = master
        self._gmac_key = _derive(master, "gmac", 32)
        self._gmac = AESGCM(self._gmac_key)
        self._outer = _derive(master, "prp", 32)
        self._seed = int.from_bytes(_derive(master, "xxh3-seed", 8), "little")
        self._id_key = _derive(master, "id", 32)
        #: A short name of the key (a keyed hash of a constant: says nothing about it),
        #: stored with the hashes made under it so stale rows are told apart.
        self.key_id = _derive(master, "key-id", 8).hex()

    def __repr__(self) -> str:
        return f"Keys(key_id={self.key_id})"

    def _permute(self, tags: bytes) -> bytes:
        enc = Cipher(algorithms.AES(self._outer), modes.ECB()).encryptor()
        return enc.update(tags) + enc.finalize()

    def page_hashes(self, buf: Buffer) -> list[int]:
        mv = memoryview(buf)
        if not len(mv):
            return []
        tag = self._gmac.encrypt
        tags = b"".join([tag(_NONCE_PAGE, b"", mv[i:i + PAGE]) for i in range(0, len(mv), PAGE)])
        out = np.frombuffer(self._permute(tags), dtype="<u8")[::2]
        hashes: list[int] = out.tolist()
        return hashes

    def region_hash(self, buf: Buffer) -> bytes:
        return self._permute(self._gmac.encrypt(_NONCE_REGION, b"", buf))

    def keyed_digest(self, views: Sequence[Buffer]) -> bytes:
        if len(views) == 1:
            return self.region_hash(views[0])
        enc = Cipher(algorithms.AES(self._gmac_key),
                     modes.GCM(_NONCE_REGION)).encryptor()
        for v in views:
            enc.authenticate_additional_data(v)
        enc.finalize()
        return self._permute(enc.tag)

    def fast_digest(self, views: Sequence[Buffer]) -> bytes:
        seed: int = self._seed
        if len(views) == 1:
            return xxhash.xxh3_128_digest(views[0], seed)
        h = xxhash.xxh3_128(seed=seed)
        for v in views:
            h.update(v)
        return h.digest()

    def keyed_id(self, *parts: bytes) -> int:
        h = hashlib.blake2b(digest_size=8, key=self._id_key)
        for p in parts:
            h.update(len(p).to_bytes(8, "little"))
            h.update(p)
        return int.from_bytes(h.digest(), "little")


_current = Keys(os.urandom(32))


def install(key: bytes) -> Keys:
    """Use `key` (the host key) for every hash this process makes from now on."""
    global _current
    if _current.master != key:
        _current = Keys(key)
    return _current


def current() -> Keys:
    return _current


def page_hash(page: Buffer) -> int:
    """The keyed 64-bit hash of one page (or last, shorter chunk)."""
    return _current.page_hashes(page[:PAGE])[0]


def page_hashes(buf: Buffer) -> list[int]:
    """`page_hash` of each 4 KiB chunk of a region (the last may be shorter)."""
    return _current.page_hashes(buf)


def region_hash(buf: Buffer) -> bytes:
    """The keyed 128-bit hash of a whole region."""
    return _current.region_hash(buf)


def keyed_digest(views: Sequence[Buffer]) -> bytes:
    """`region_hash` of a region's physically contiguous runs joined, without copying."""
    return _current.keyed_digest(views)


def fast_digest(views: Sequence[Buffer]) -> bytes:
    """The seeded xxh3_128 of a region's runs joined, without copying."""
    return _current.fast_digest(views)


def raw_digests(views: Sequence[Buffer]) -> bytes:
    """The digest pair the fast path keeps of a region's raw bytes (`DIGEST_SIZE` bytes):
    `fast_digest` then `keyed_digest`."""
    return _current.fast_digest(views) + _current.keyed_digest(views)


def keyed_id(*parts: bytes) -> int:
    """A keyed 64-bit identifier of length-prefixed `parts` (keyed BLAKE2b)."""
    return _current.keyed_id(*parts)


def file_page_fingerprints(buf: Buffer) -> list[int]:
    """Unkeyed xxh3_64 of each 4 KiB chunk: only for the image file's `.rodata` vs a
    verified VM's (see the module doc)."""
    mv = memoryview(buf)
    h = xxhash.xxh3_64_intdigest
    return [h(mv[i:i + PAGE]) for i in range(0, len(mv), PAGE)]

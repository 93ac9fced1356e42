"""Digests of large out-of-band buffers: how a buffer Redis already holds is named instead of sent.

A payload's out-of-band buffer of at least ``DIGEST_MIN`` bytes (an array, a DataFrame's
column, model weights) is not carried in its envelope: the envelope names it by a digest of
its bytes, and the bytes are stored once per queue namespace under a key of that name
(:mod:`rtq.backend.blobs`), where any later payload naming the same digest finds them.

Two digest functions, chosen by whether payloads are signed:

* **Unsigned** (no secret): XXH3-128 (``xxhash``), about 20 GiB/s on one core. Without a
  secret anyone who can write to the Redis can run code on the workers anyway (payloads are
  pickles), so the digest only has to tell buffers apart and catch corruption, never resist
  someone crafting a collision.
* **Signed** (a secret): BLAKE3-256 (``blake3``), a cryptographic hash at about 3 GiB/s on
  one core (more than twice as fast as the HMAC-SHA256 that signed every byte before). The
  envelope's HMAC covers the digests it names, and the bytes read back are checked against them
  before anything is built from them: a buffer planted under a digest key would need a second
  preimage of BLAKE3 to pass.

hashlib's fastest (BLAKE2b, SHA-256 with SHA-NI) measured 0.6 to 0.9 GiB/s here: hashing a 1 GiB
array would cost a good part of a second, against the tenth of that the first send may spend.

A digest's *name* (``x3-<hex>`` or ``b3-<hex>``) is what its keys are spelled from, so the two
functions never share a key.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from .errors import SerializationError

DIGEST_MIN = 1 << 20
"""Out-of-band buffers of at least this many bytes travel by digest (stored once per namespace)."""

XXH3_128 = 1
BLAKE3_256 = 2
_SIZES = {XXH3_128: 16, BLAKE3_256: 32}
_TAGS = {XXH3_128: "x3", BLAKE3_256: "b3"}

_COUNT = struct.Struct(">BI")
_INDEX = struct.Struct(">I")


@dataclass(frozen=True)
class Ref:
    """One buffer a payload names by digest: its place among the payload's buffers, size and digest."""

    index: int
    size: int
    algo: int
    digest: bytes
    as_bytes: bool = False
    """The buffer was a ``bytes`` object: read it into one (the envelope's kinds say so)."""

    @property
    def name(self) -> str:
        """What the buffer's keys are spelled from: ``x3-<hex>`` or ``b3-<hex>``."""
        return f"{_TAGS[self.algo]}-{self.digest.hex()}"


def algorithm(signed: bool) -> int:
    """The digest function payloads use: BLAKE3 when they are signed, XXH3-128 when not."""
    return BLAKE3_256 if signed else XXH3_128


def digest(algo: int, buffer: Any) -> bytes:
    """The digest of ``buffer``'s bytes (a contiguous buffer: bytes, bytearray, memoryview, mmap)."""
    if algo == XXH3_128:
        import xxhash

        return bytes(xxhash.xxh3_128(buffer).digest())
    if algo == BLAKE3_256:
        import blake3

        # Past a few MiB BLAKE3 splits the work over the cores (its tree hash allows it).
        return bytes(blake3.blake3(buffer, max_threads=blake3.blake3.AUTO).digest())
    raise SerializationError(f"unknown digest function {algo}")


def check(ref: Ref, buffer: Any, where: str, *, signed: bool) -> None:
    """Raise unless ``buffer`` holds exactly the bytes ``ref`` names.

    Raises:
        SignatureError: ``signed``: the bytes stored for a signed digest are not the ones signed
            (planted or tampered with).
        SerializationError: unsigned: they are corrupted (or of the wrong size).
    """
    from .errors import SignatureError

    size = memoryview(buffer).nbytes
    if size == ref.size and digest(ref.algo, buffer) == ref.digest:
        return
    what = f"buffer {ref.index} of the payload{where} (digest {ref.name[:19]}…)"
    if signed:
        raise SignatureError(f"{what} does not match the digest its signed payload names: planted or tampered with")
    raise SerializationError(f"{what} is corrupted in Redis: its bytes do not match their digest")


def pack_refs(refs: list[Ref]) -> bytes:
    """The envelope's list of buffers named by digest: ``algo:u8 | n:u32 | n x index:u32 | n x digest``."""
    if not refs:
        return b""
    algo = refs[0].algo
    return (
        _COUNT.pack(algo, len(refs)) + b"".join(_INDEX.pack(r.index) for r in refs) + b"".join(r.digest for r in refs)
    )


def unpack_refs(data: Any, at: int, sizes: list[int], where: str) -> tuple[list[Ref], int]:
    """The refs packed at ``data[at:]`` (by :func:`pack_refs`) and the offset after them.

    Every number comes from Redis, unverified: each is bounded before it is used.

    Raises:
        SerializationError: the list is truncated, names an unknown function, a buffer twice,
            a buffer the envelope does not announce, or one too small to travel by digest.
    """
    if len(data) < at + _COUNT.size:
        raise SerializationError(f"payload{where} is not an rtq envelope (truncated digest list)")
    algo, count = _COUNT.unpack_from(data, at)
    if algo not in _SIZES:
        raise SerializationError(f"payload{where} names buffers by an unknown digest function ({algo})")
    if count > len(sizes):
        raise SerializationError(f"payload{where} names {count} buffers by digest, more than its {len(sizes)}")
    at += _COUNT.size
    width = _SIZES[algo]
    end = at + count * (_INDEX.size + width)
    if len(data) < end:
        raise SerializationError(f"payload{where} is not an rtq envelope (truncated digest list)")
    indices = list(struct.unpack_from(f">{count}I", data, at))
    at += count * _INDEX.size
    if len(set(indices)) != count or any(i >= len(sizes) or sizes[i] < DIGEST_MIN for i in indices):
        raise SerializationError(f"payload{where} has a malformed digest list")
    refs = [Ref(i, sizes[i], algo, bytes(data[at + n * width : at + (n + 1) * width])) for n, i in enumerate(indices)]
    return refs, end

"""The envelope every payload rtq stores in Redis travels in.

A payload is a Python object pickled with cloudpickle (protocol 5), so closures and classes
defined in a notebook ship by value (keeping their file names, with a notebook cell's lines:
see :mod:`rtq.sources`). Large buffers (anything that supports pickle protocol 5 out-of-band
data: numpy arrays, ``pickle.PickleBuffer``; and ``bytes``, ``bytearray``, ``memoryview`` of
1 MiB or more, see :mod:`rtq.outofband`) go *out of band*: they are stored as raw frames
next to the pickle stream instead of being copied into it, and frames over ``CHUNK`` bytes are
split so no single Redis value comes near its 512 MB limit. The pickle stream itself is one
value, so it may not exceed ``MAX_VALUE``.

Layout of the first frame (all integers big-endian)::

    b"RTQ" | version:u8 | flags:u8 | n_buffers:u32 | n_buffers x size:u64 | [n_buffers x kind:u8]
        | [digests] | [mac:32] | pickle

The kinds (flag ``FLAG_BYTES``, envelope version 2; version 1 has none) say which buffers were
``bytes`` objects (1) and which any other buffer (0): a reader reads a ``bytes`` one straight
into a new ``bytes`` object (:func:`rtq.outofband.read_target`), the others into memory the
object built over it may write to.

Buffers of at least ``DIGEST_MIN`` bytes are not among the frames: the ``digests`` list (flag
``FLAG_DIGESTS``, see :mod:`rtq.digests`) names each by a digest of its bytes, which the store
keeps once per namespace (:mod:`rtq.backend.blobs`); the other buffers follow as frames, in order.

With a secret, ``mac`` is an HMAC-SHA256 over the Redis key and field the payload is stored
under and every byte that follows it, so a payload copied to another task is rejected, and it is
checked in constant time *before* anything is unpickled. It covers the digests the head names,
not the bytes stored for them: those are checked against their (BLAKE3) digests when read back,
before anything is built from them. Every configured secret is tried, so a
worker given ``"new,old"`` accepts payloads signed with either and signs its own with ``new``.
Signing does not stop a payload from being stored again at its *own* key and field (a replay).
Since the MAC covers the frames, the head can only be verified once they are read: a reader
bounds what it announces first (at most ``MAX_FRAMES`` frames, ``max_payload`` bytes in all, and
:mod:`rtq.backend.store` checks each big frame against what Redis holds), so a forged head costs
nothing. Buffers named by digest are fetched only once the head verified (and are sized against
what Redis holds before anything is allocated for them).

``max_payload`` counts what a payload sends: its pickle stream, its frames, and the buffers named
by digest that Redis does not hold yet; a buffer already there costs its digest.

What this is NOT for: storage. A payload is meant to be read back by the same code, on the same
Python major.minor and cloudpickle version, within a task's lifetime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import pickle
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from . import digests, sources
from .culprits import describe_unpicklable
from .digests import DIGEST_MIN, Ref
from .errors import ConfigurationError, SerializationError, SignatureError

MAGIC = b"RTQ"
VERSION = 1
"""The envelope version of a payload without ``bytes`` buffers; one with them is ``VERSION_BYTES``."""
VERSION_BYTES = 2
FLAG_SIGNED = 0x01
FLAG_DIGESTS = 0x02
FLAG_BYTES = 0x04
MAC_SIZE = hashlib.sha256().digest_size
CHUNK = 64 * 1024 * 1024
"""Largest single frame written to Redis; bigger buffers are split into several fields."""
DEFAULT_MAX_PAYLOAD = 400 * 1024 * 1024
"""Refuse to ship more than this many bytes in one payload unless configured otherwise."""
MAX_VALUE = 500 * 1024 * 1024
"""Largest pickle stream (the first frame): Redis refuses values over 512 MB by default."""
MAX_FRAMES = 65536
"""Most frames a payload may span; more is refused before anything is fetched or allocated."""

_HEAD = struct.Struct(">3sBBI")
_SIZE = struct.Struct(">Q")

Frames = list[bytes | memoryview]


class UnreadablePayload(SerializationError):
    """Raised when a payload is a sound envelope (verified, when signed) but fails to unpickle."""


@dataclass
class Packed:
    """A payload as :meth:`Serializer.pack` made it: frames to store with it, buffers to store by digest.

    Attributes:
        frames: The first frame (envelope and pickle stream), then the other buffers' chunks.
        blobs: ``(ref, buffer)`` of each buffer named by digest: stored under its digest's keys
            unless Redis holds it already.
    """

    frames: Frames
    blobs: list[tuple[Ref, memoryview]] = field(default_factory=list)

    @property
    def inline_size(self) -> int:
        """Bytes of the frames (what is sent whatever Redis holds)."""
        return sum(memoryview(f).nbytes for f in self.frames)


class BlobSource(Protocol):
    """Where a reader gets the buffers a payload names by digest (:class:`rtq.backend.blobs.Blobs`)."""

    def fetch(self, refs: list[Ref], where: str) -> list[Any]:
        """The buffer of each ref, in order, each checked against its digest (:func:`rtq.digests.check`).

        It is asked only for the refs of a verified envelope (under a secret), and raises
        ``SignatureError`` (signed) or ``SerializationError`` for bytes that do not match.
        """
        ...


def normalize_secrets(secret: str | bytes | Sequence[str | bytes] | None) -> tuple[bytes, ...]:
    """Turn ``secret`` into the tuple of accepted keys; the first one signs.

    A comma-separated string (as in ``RTQ_SECRET=new,old``) lists several secrets for rotation.
    None means unsigned payloads; a secret that holds nothing (``""``, only whitespace or
    commas, an empty list) is refused rather than taken for None.

    Raises:
        TypeError: ``secret`` is not a str, bytes, or a sequence of them.
        ConfigurationError: it holds no secret.
    """
    if secret is None:
        return ()
    items: Iterable[str | bytes]
    if isinstance(secret, str):
        items = secret.split(",")
    elif isinstance(secret, (bytes, bytearray)):
        items = [bytes(secret)]
    elif isinstance(secret, Sequence) and all(isinstance(s, (str, bytes, bytearray)) for s in secret):
        items = cast("Sequence[str | bytes]", secret)
    else:  # never echo what might be a secret: its type says enough
        raise TypeError(f"secret must be a str, bytes or a list of them (or None), not {type(secret).__name__}")
    keys = tuple(s.encode() if isinstance(s, str) else bytes(s) for s in items)
    keys = tuple(k for k in (k.strip() for k in keys) if k)
    if not keys:
        raise ConfigurationError(
            "secret is empty (nothing but whitespace or commas): pass the secret shared by clients and "
            "workers, or None for unsigned payloads"
        )
    return keys


def env_secret() -> str | None:
    """The ``RTQ_SECRET`` environment variable: None when unset or set to ``""``.

    Raises:
        ConfigurationError: it is set but holds no secret (only whitespace or commas).
    """
    value = os.environ.get("RTQ_SECRET")
    if not value:
        return None
    try:
        normalize_secrets(value)
    except ConfigurationError:
        raise ConfigurationError(
            "RTQ_SECRET holds no secret (nothing but whitespace or commas): set it to the secret shared "
            "by clients and workers, or unset it for unsigned payloads"
        ) from None
    return value


class Serializer:
    """Pickles values into signed (or unsigned) envelopes and back.

    Args:
        secret: One secret, several (rotation: the first signs, all verify), or None for
            unsigned payloads.
        max_payload: Largest payload in bytes ``dumps`` accepts.
    """

    def __init__(
        self,
        secret: str | bytes | Sequence[str | bytes] | None = None,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        if not isinstance(max_payload, int) or isinstance(max_payload, bool) or max_payload < 1:
            raise ValueError(f"max_payload must be a positive number of bytes, not {max_payload!r}")
        self.secrets = normalize_secrets(secret)
        self.max_payload = max_payload
        self._none: bytes | None = None  # the envelope of None, unsigned: what a task without a result sends

    @property
    def signed(self) -> bool:
        return bool(self.secrets)

    # -- writing ---------------------------------------------------------------------------
    def dumps(self, obj: Any, *, key: str, field: str, what: str = "value") -> Frames:
        """Envelope ``obj`` for storing at ``key``/``field``, every buffer among its frames.

        Raises:
            SerializationError: as :meth:`pack`.
        """
        return self.pack(obj, key=key, field=field, what=what, by_digest=False).frames

    def pack(self, obj: Any, *, key: str, field: str, what: str = "value", by_digest: bool = True) -> Packed:
        """Envelope ``obj`` for storing at ``key``/``field``.

        With ``by_digest``, buffers of at least ``DIGEST_MIN`` bytes are named by digest (the
        caller stores them, or finds them held already); the rest are frames.

        Raises:
            SerializationError: ``obj`` cannot be pickled (the message names the culprit and
                where it sits inside ``obj``), or what it sends besides the buffers named by
                digest is larger than ``max_payload``.
        """
        if obj is None and not self.secrets:  # the same bytes every time (a signed one names its key)
            none = self._none
            if none is None:
                none = self._none = bytes(self._pack(None, key, field, what, by_digest).frames[0])
            return Packed([none])
        return self._pack(obj, key, field, what, by_digest)

    def _pack(self, obj: Any, key: str, field: str, what: str, by_digest: bool) -> Packed:
        buffers: list[pickle.PickleBuffer] = []
        try:
            # Code shipped by value keeps its file name, and a notebook cell's lines go with it.
            body = sources.dumps(obj, buffer_callback=buffers.append)
        except Exception as exc:
            raise SerializationError(describe_unpicklable(obj, what, exc)) from exc
        raws = [b.raw() for b in buffers]
        named = [i for i, r in enumerate(raws) if by_digest and r.nbytes >= DIGEST_MIN]
        inline = [r for i, r in enumerate(raws) if i not in set(named)]
        self.check_size(len(body) + sum(r.nbytes for r in inline), what)
        if len(body) > MAX_VALUE:
            raise SerializationError(
                f"{what} pickles to a {size_text(len(body))} stream, over the {size_text(MAX_VALUE)} a single "
                "Redis value can hold; only out-of-band buffers (numpy arrays, big bytes-like objects) are split"
            )
        algo = digests.algorithm(self.signed)
        blobs = [(Ref(i, raws[i].nbytes, algo, digests.digest(algo, raws[i])), raws[i]) for i in named]
        kinds = bytes(type(r.obj) is bytes for r in raws)  # a bytes object's own buffer (rtq.outofband)
        flags = (FLAG_SIGNED if self.secrets else 0) | (FLAG_DIGESTS if blobs else 0)
        flags |= FLAG_BYTES if any(kinds) else 0
        version = VERSION_BYTES if flags & FLAG_BYTES else VERSION
        head = _HEAD.pack(MAGIC, version, flags, len(raws)) + b"".join(_SIZE.pack(r.nbytes) for r in raws)
        if flags & FLAG_BYTES:
            head += kinds
        head += digests.pack_refs([ref for ref, _ in blobs])
        frames: Frames = []
        for raw in inline:
            frames.extend(raw[i : i + CHUNK] for i in range(0, max(raw.nbytes, 1), CHUNK))
        if self.secrets:
            mac = _mac(self.secrets[0], key, field, head, body, frames)
            return Packed([head + mac + body, *frames], blobs)
        return Packed([head + body, *frames], blobs)

    def check_size(self, sent: int, what: str) -> None:
        """Refuse a payload that sends ``sent`` bytes, over ``max_payload``.

        Raises:
            SerializationError: it is over.
        """
        if sent > self.max_payload:
            raise SerializationError(
                f"{what} is {size_text(sent)} pickled, over the {size_text(self.max_payload)} payload limit "
                "(raise it with max_payload=... on both sides, or ship less)"
            )

    # -- reading ---------------------------------------------------------------------------
    @staticmethod
    def frame_count(first: bytes, where: str = "") -> int:
        """How many frames follow ``first`` (read it first, then fetch that many more).

        Raises:
            SerializationError: ``first`` is not an envelope, or claims more than ``MAX_FRAMES``.
        """
        return _frame_count(_parse_head(first, where).inline, where)

    @staticmethod
    def buffer_sizes(first: bytes, where: str = "") -> list[int]:
        """Sizes of the out-of-band buffers the envelope ``first`` carries as frames (not by digest)."""
        return _parse_head(first, where).inline

    @staticmethod
    def inline_bytes(first: bytes, where: str = "") -> list[bool]:
        """For each buffer ``first`` carries as frames, whether it was a ``bytes`` object."""
        head = _parse_head(first, where)
        named = {r.index for r in head.refs}
        return [i in head.as_bytes for i in range(len(head.sizes)) if i not in named]

    def frame_sizes(self, first: bytes, where: str = "") -> list[int]:
        """The size of each frame stored after ``first``, as its envelope announces them.

        The envelope comes from Redis and is not verified yet (its MAC covers the frames): this
        is what a reader checks before it fetches or allocates anything for the frames.

        Raises:
            SerializationError: ``first`` is not an envelope, claims more than ``MAX_FRAMES``
                frames, or more bytes than ``max_payload``.
        """
        sizes = self._head(first, where).inline
        _frame_count(sizes, where)
        chunks = []
        for size in sizes:
            chunks += [CHUNK] * (size // CHUNK) + ([size % CHUNK] if size % CHUNK or not size else [])
        return chunks

    def _head(self, first: bytes, where: str) -> _Head:
        """The parsed head of ``first``, refused when what it carries inline claims over ``max_payload``."""
        head = _parse_head(first, where)
        body = len(first) - head.offset - (MAC_SIZE if head.flags & FLAG_SIGNED else 0)
        total = max(body, 0) + sum(head.inline)
        if total > self.max_payload:
            raise SerializationError(
                f"payload{where} claims {size_text(total)}, over the {size_text(self.max_payload)} payload limit of "
                "this side (raise it with max_payload=... on both sides, or ship less)"
            )
        return head

    def loads(
        self,
        frames: Sequence[Any],
        *,
        key: str,
        field: str,
        joined: bool = False,
        blobs: BlobSource | None = None,
    ) -> Any:
        """Verify and unpickle the frames stored at ``key``/``field``.

        With ``joined``, the frames after the first are the whole buffers (each already read
        into one piece), not their stored chunks; the signature covers the same bytes. Buffers
        the envelope names by digest come from ``blobs``, asked only once the envelope verified,
        and are checked against their digests before unpickling begins.

        Raises:
            SignatureError: a secret is configured and the payload is unsigned or its MAC does
                not verify, or a buffer it names by digest is not the one signed (nothing was
                unpickled).
            SerializationError: the bytes are not an rtq envelope, have an unknown version, a
                buffer named by digest is missing or corrupted, or they fail to unpickle.
        """
        if not frames or frames[0] is None:
            raise SerializationError(f"no payload stored at {key} [{field}]")
        first = frames[0]
        where = f" at {key} [{field}]"
        head = self._head(first, where)
        flags, offset, sizes = head.flags, head.offset, head.inline
        rest = list(frames[1:])
        if any(f is None for f in rest):
            raise SerializationError(f"payload{where} is missing a frame")
        if self.secrets:
            if not flags & FLAG_SIGNED:
                raise SignatureError(
                    f"payload{where} is not signed, and this side requires signatures "
                    "(a secret is set): was it written without RTQ_SECRET, or forged?"
                )
            mac = bytes(first[offset : offset + MAC_SIZE])
            signed, body = first[:offset], first[offset + MAC_SIZE :]
            if len(mac) != MAC_SIZE or not any(
                hmac.compare_digest(mac, _mac(s, key, field, signed, body, rest)) for s in self.secrets
            ):
                raise SignatureError(
                    f"payload{where} has a bad signature: signed with another secret, "
                    "tampered with, or copied from another key"
                )
        else:
            body = first[offset + MAC_SIZE :] if flags & FLAG_SIGNED else first[offset:]
        if joined:
            if [len(b) for b in rest] != sizes:
                raise SerializationError(f"payload{where} has a frame of the wrong size")
            buffers = rest
        else:
            buffers = _join(rest, sizes, key, field)
        if head.refs:
            buffers = self._with_blobs(head, buffers, blobs, where)
        try:
            return pickle.loads(body, buffers=buffers)
        except Exception as exc:
            raise UnreadablePayload(f"payload{where} cannot be unpickled here: {type(exc).__name__}: {exc}") from exc

    def _with_blobs(self, head: _Head, inline: list[Any], blobs: BlobSource | None, where: str) -> list[Any]:
        """All the payload's buffers in order: ``inline`` ones and those named by digest, each checked."""
        if blobs is None:
            raise SerializationError(f"payload{where} names buffers by digest, and this reader has no store for them")
        if self.signed != (head.refs[0].algo == digests.algorithm(True)):
            # A signed payload's digests must be BLAKE3's: an XXH3 digest can be forged to match.
            raise (SignatureError if self.signed else SerializationError)(
                f"payload{where} names buffers by a digest function this side does not accept"
            )
        fetched = blobs.fetch(head.refs, where)
        if [memoryview(b).nbytes for b in fetched] != [ref.size for ref in head.refs]:
            raise SerializationError(f"payload{where} got a buffer of the wrong size from its store")
        named = {ref.index: buffer for ref, buffer in zip(head.refs, fetched, strict=True)}
        rest = iter(inline)
        return [named[i] if i in named else next(rest) for i in range(len(head.sizes))]


def size_text(n: int) -> str:
    """``n`` bytes, for people: ``"1.5 MiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


@dataclass
class _Head:
    """An envelope's head as parsed (unverified): its flags, where the MAC or pickle starts, its buffers."""

    flags: int
    offset: int
    sizes: list[int]
    refs: list[Ref]
    as_bytes: frozenset[int] = frozenset()
    """The buffers that were ``bytes`` objects (their indices)."""

    @property
    def inline(self) -> list[int]:
        """Sizes of the buffers carried as frames, in order."""
        named = {r.index for r in self.refs}
        return [s for i, s in enumerate(self.sizes) if i not in named]


def _parse_head(first: bytes, where: str = "") -> _Head:
    if not isinstance(first, (bytes, bytearray, memoryview)) or len(first) < _HEAD.size:
        raise SerializationError(f"payload{where} is not an rtq envelope (too short)")
    magic, version, flags, count = _HEAD.unpack_from(first)
    if magic != MAGIC:
        raise SerializationError(f"payload{where} is not an rtq envelope (bad magic)")
    if version not in (VERSION, VERSION_BYTES):
        raise SerializationError(
            f"payload{where} has envelope version {version}; this rtq reads versions {VERSION} and {VERSION_BYTES} "
            "(are client and worker running the same rtq?)"
        )
    if (version == VERSION_BYTES) != bool(flags & FLAG_BYTES):
        raise SerializationError(
            f"payload{where} is not an rtq envelope (version {version} "
            f"{'without' if version == VERSION_BYTES else 'with'} buffer kinds)"
        )
    # The count comes from Redis: bound it before parsing (a payload has fewer buffers than frames).
    if count > MAX_FRAMES:
        raise SerializationError(f"payload{where} claims {count} buffers, more than the {MAX_FRAMES} frames rtq writes")
    offset = _HEAD.size + count * _SIZE.size
    if len(first) < offset:
        raise SerializationError(f"payload{where} is not an rtq envelope (truncated header)")
    sizes = list(struct.unpack_from(f">{count}Q", first, _HEAD.size))
    as_bytes: frozenset[int] = frozenset()
    if flags & FLAG_BYTES:
        kinds = bytes(first[offset : offset + count])
        if len(kinds) != count or kinds.strip(b"\x00\x01"):
            raise SerializationError(f"payload{where} is not an rtq envelope (bad buffer kinds)")
        as_bytes = frozenset(i for i, kind in enumerate(kinds) if kind)
        offset += count
    refs: list[Ref] = []
    if flags & FLAG_DIGESTS:
        refs, offset = digests.unpack_refs(first, offset, sizes, where)
        refs = [dataclasses.replace(r, as_bytes=True) if r.index in as_bytes else r for r in refs]
    return _Head(flags, offset, sizes, refs, as_bytes)


def _frame_count(sizes: list[int], where: str) -> int:
    count = sum(max(1, -(-s // CHUNK)) for s in sizes)
    if count > MAX_FRAMES:
        raise SerializationError(f"payload{where} claims {count} frames, more than the {MAX_FRAMES} rtq writes")
    return count


def _mac(secret: bytes, key: str, field: str, head: bytes, body: bytes, frames: Sequence[Any]) -> bytes:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    mac.update(key.encode() + b"\0" + field.encode() + b"\0")
    mac.update(head)
    mac.update(body)
    for frame in frames:
        mac.update(frame)
    return mac.digest()


def _join(chunks: list[bytes], sizes: list[int], key: str, field: str) -> list[bytes | bytearray]:
    """Reassemble out-of-band buffers from their stored chunks."""
    out: list[bytes | bytearray] = []
    pos = 0
    for size in sizes:
        n = max(1, -(-size // CHUNK))
        parts = chunks[pos : pos + n]
        pos += n
        if len(parts) != n:
            raise SerializationError(f"payload at {key} [{field}] is missing a frame")
        if sum(len(part) for part in parts) != size:  # before allocating what the unverified head says
            raise SerializationError(f"payload at {key} [{field}] has a frame of the wrong size")
        if n == 1:
            buf: bytes | bytearray = parts[0]
        else:
            buf = bytearray(size)
            at = 0
            for part in parts:
                buf[at : at + len(part)] = part
                at += len(part)
        out.append(buf)
    if pos != len(chunks):
        raise SerializationError(f"payload at {key} [{field}] has extra frames")
    return out

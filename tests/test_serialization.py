"""The envelope on its own: signing, verification before unpickling, limits, culprit paths, fuzz.

No Redis here: these tests drive :class:`rtq.serialization.Serializer` directly. A "marker"
pickle (one whose unpickling calls ``os.mkdir``) stands for forged code: a test first proves it
runs when loaded unverified, then that a verifying serializer never gets that far.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtq.calls import Call
from rtq.errors import SerializationError, SignatureError
from rtq.outofband import MIN_SIZE
from rtq.serialization import (
    DEFAULT_MAX_PAYLOAD,
    FLAG_BYTES,
    FLAG_SIGNED,
    MAC_SIZE,
    MAGIC,
    VERSION,
    VERSION_BYTES,
    Serializer,
    normalize_secrets,
)

KEY, FIELD = "p|s|task-result:t1", "params"


class MakesDir:
    """Unpickling this calls ``os.mkdir(path)``: the stand-in for code smuggled into a payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def envelope(
    body: bytes,
    *,
    flags: int = 0,
    version: int = VERSION,
    mac: bytes = b"",
    sizes: tuple[int, ...] = (),
    kinds: bytes = b"",
) -> bytes:
    """An envelope built by hand, as an attacker with write access to Redis would."""
    head = MAGIC + struct.pack(">BBI", version, flags, len(sizes)) + b"".join(struct.pack(">Q", s) for s in sizes)
    return head + kinds + mac + body


def load(serializer: Serializer, frames: list[Any], key: str = KEY, field: str = FIELD) -> Any:
    return serializer.loads(frames, key=key, field=field)


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("secret", [None, "s3cret", ["new", "old"]])
def test_round_trip_with_out_of_band_buffers(secret):
    s = Serializer(secret)
    value = {"n": 1, "blob": numpy.arange(5000), "f": lambda x: x + 1}
    frames = s.dumps(value, key=KEY, field=FIELD)
    assert len(frames) == 2  # the bytearray travelled out of band
    out = load(s, frames)
    assert (out["blob"] == value["blob"]).all() and out["f"](1) == 2


def blob(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ from one position to the next (a shifted copy would show)."""
    return (bytes(range(seed % 251, 251)) + bytes(range(seed % 251))) * (size // 251) + b"\x07" * (size % 251)


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_big_bytes_like_objects_travel_out_of_band_as_their_own_type(secret):
    s = Serializer(secret)
    data = blob(2 * MIN_SIZE)
    grid = memoryview(bytearray(blob(MIN_SIZE, 1))).cast("d", [MIN_SIZE // 64, 8])
    value = {
        "bytes": data,
        "again": data,  # the same object twice: one frame, and one object back
        "bytearray": bytearray(blob(MIN_SIZE + 3, 2)),
        "grid": grid,
        "readonly": memoryview(blob(MIN_SIZE, 3)),
        "strided": memoryview(bytearray(blob(3 * MIN_SIZE, 4)))[::3],  # not contiguous: copied once
        "small": b"s" * 1000,
        "text": "t" * MIN_SIZE,  # a str is not bytes-like: it stays in the stream
    }
    frames = s.dumps(value, key=KEY, field=FIELD)
    sizes = [memoryview(f).nbytes for f in frames[1:]]
    assert sorted(sizes) == sorted([2 * MIN_SIZE, MIN_SIZE + 3, MIN_SIZE, MIN_SIZE, MIN_SIZE])
    assert len(frames[0]) < 1.1 * MIN_SIZE  # the pickle stream holds the str, no buffer
    out = load(s, [bytes(f) for f in frames])
    assert type(out["bytes"]) is bytes and out["bytes"] == data and out["again"] is out["bytes"]
    assert type(out["bytearray"]) is bytearray and out["bytearray"] == value["bytearray"]
    out["bytearray"][0] ^= 1  # still mutable
    assert (out["grid"].format, out["grid"].shape, out["grid"].readonly) == ("d", grid.shape, False)
    assert out["grid"].tolist() == grid.tolist()
    assert out["readonly"].readonly and out["readonly"] == value["readonly"]
    assert out["strided"].tobytes() == value["strided"].tobytes() and not out["strided"].readonly
    assert out["small"] == value["small"] and out["text"] == value["text"]


def test_an_envelope_says_which_buffers_were_bytes_objects_and_stays_version_1_without_them():
    s = Serializer()
    data, array = blob(MIN_SIZE), numpy.arange(MIN_SIZE // 8)
    first, *rest = s.dumps([array, data, bytearray(data)], key=KEY, field=FIELD)
    assert first[3] == VERSION_BYTES and first[4] & FLAG_BYTES
    assert s.inline_bytes(first) == [False, True, False]  # the array's and the bytearray's may be written to
    back = load(s, [first, *rest])
    assert type(back[1]) is bytes and back[1] == data and (back[0] == array).all()
    back[0][0] = 7  # an array's memory is still its own to write
    plain = s.dumps([array, bytearray(data), b"small"], key=KEY, field=FIELD)
    assert plain[0][3] == VERSION and not plain[0][4] & FLAG_BYTES  # what a version-1 reader reads


def test_small_memoryviews_pickle_in_band_and_odd_formats_come_back_as_bytes():
    s = Serializer()
    little = memoryview(bytearray(b"abcdefgh")).cast("i", [2])
    odd = memoryview(numpy.arange(4, dtype=">i4"))  # a non-native format memoryview.cast cannot make
    frames = s.dumps([little, odd, memoryview(b"")], key=KEY, field=FIELD)
    assert len(frames) == 1
    back, flat, empty = load(s, frames)
    assert (back.format, back.tolist(), back.readonly) == ("i", little.tolist(), False)
    assert (flat.format, flat.tobytes()) == ("B", odd.tobytes())
    assert empty.tobytes() == b""


def test_a_dataframes_numeric_columns_travel_out_of_band():
    pandas = pytest.importorskip("pandas")
    n = 200_000
    frame = pandas.DataFrame({"x": numpy.arange(n, dtype="f8"), "n": numpy.arange(n), "flag": numpy.arange(n) % 3 == 0})
    s = Serializer("k")
    frames = s.dumps(frame, key=KEY, field=FIELD)
    assert len(frames[0]) < 64 * 1024  # the columns are frames, not in the pickle stream
    assert sum(memoryview(f).nbytes for f in frames[1:]) >= frame.memory_usage(index=False).sum()
    back = load(s, [bytes(f) for f in frames])
    assert back.equals(frame) and list(back.dtypes) == list(frame.dtypes)


def test_unsigned_reader_accepts_a_signed_payload():
    frames = Serializer("k").dumps([1, 2], key=KEY, field=FIELD)
    assert load(Serializer(), frames) == [1, 2]


# -- signatures --------------------------------------------------------------------------------
def test_signature_binds_key_and_field():
    s = Serializer("k")
    frames = s.dumps("payload", key=KEY, field=FIELD)
    assert load(s, frames) == "payload"
    with pytest.raises(SignatureError, match="bad signature"):
        load(s, frames, key="p|s|task-result:t2")  # copied to another task
    with pytest.raises(SignatureError, match="bad signature"):
        load(s, frames, field="result")  # moved to another field


@pytest.mark.parametrize("value", ["array", "bytes", "bytearray", "memoryview"])
@pytest.mark.parametrize("where", ["head", "body", "frame", "mac"])
def test_any_tampered_byte_is_refused(where, value):
    s = Serializer("k")
    shipped = {
        "array": numpy.arange(100),
        "bytes": blob(MIN_SIZE),
        "bytearray": bytearray(blob(MIN_SIZE)),
        "memoryview": memoryview(blob(MIN_SIZE)),
    }[value]
    frames = [bytes(f) for f in s.dumps(shipped, key=KEY, field=FIELD)]
    assert len(frames) == 2
    first = bytearray(frames[0])
    if where == "head":
        first[4] &= ~FLAG_SIGNED & 0xFF  # drop the signed flag
    elif where == "body":
        first[-1] ^= 1
    elif where == "mac":
        first[len(MAGIC) + 6 + 8] ^= 1
    else:
        frames[1] = b"z" + frames[1][1:]
    frames[0] = bytes(first)
    with pytest.raises(SignatureError):
        load(s, frames)


def test_forged_pickle_is_never_unpickled_with_a_secret(tmp_path):
    marker = tmp_path / "ran"
    body = pickle.dumps(MakesDir(marker), protocol=5)
    # Control: loaded without verification, this payload does run code.
    load(Serializer(), [envelope(body)])
    assert marker.exists()
    marker.rmdir()

    s = Serializer("hunter2-sekrit")
    forgeries = {
        "unsigned": envelope(body),
        "random mac": envelope(body, flags=FLAG_SIGNED, mac=os.urandom(MAC_SIZE)),
        "short mac": envelope(b"", flags=FLAG_SIGNED, mac=b"x"),
        "other secret": bytes(Serializer("guess").dumps(MakesDir(marker), key=KEY, field=FIELD)[0]),
    }
    for name, first in forgeries.items():
        with pytest.raises(SignatureError) as info:
            load(s, [first])
        assert "hunter2" not in str(info.value), name
        assert not marker.exists(), f"{name}: forged code ran"


def test_rotation_accepts_every_secret_and_signs_with_the_first():
    old_signed = Serializer("old").dumps("from old", key=KEY, field=FIELD)
    rotating = Serializer("new,old")
    assert rotating.secrets == (b"new", b"old")
    assert load(rotating, old_signed) == "from old"
    assert load(Serializer(["new", "old"]), old_signed) == "from old"
    frames = rotating.dumps("from rotating", key=KEY, field=FIELD)
    assert load(Serializer("new"), frames) == "from rotating"
    with pytest.raises(SignatureError):
        load(Serializer("old"), frames)


def test_secret_lists():
    assert normalize_secrets(None) == ()
    assert normalize_secrets(" a , b ,") == (b"a", b"b")
    assert normalize_secrets(b"raw,bytes") == (b"raw,bytes",)  # bytes are one key, commas and all
    with pytest.raises(ValueError, match="empty"):
        normalize_secrets(" , ")


# -- malformed input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "no payload stored"),
        ([None], "no payload stored"),
        ([b"garbage bytes"], "not an rtq envelope \\(bad magic\\)"),
        ([b"RT"], "not an rtq envelope \\(too short\\)"),
        ([envelope(b"", version=9)], "envelope version 9; this rtq reads versions 1 and 2"),
        ([envelope(b"", sizes=(10,))[:-8]], "truncated header"),
        ([envelope(pickle.dumps(1), sizes=(10,))], "missing a frame"),
        ([envelope(pickle.dumps(1), sizes=(10,)), b"short"], "wrong size"),
        ([envelope(pickle.dumps(1)), b"extra"], "extra frames"),
        ([envelope(b"\x80\x05not a pickle")], "cannot be unpickled here"),
        ([envelope(b"\x80\x05\x8c\x0bno_such_mod\x94\x8c\x01x\x94\x93\x94.")], "cannot be unpickled here"),
        # Buffer kinds: version 2 has them (FLAG_BYTES), version 1 never; each is 0 or 1, one per buffer.
        ([envelope(pickle.dumps(1), version=VERSION_BYTES)], "not an rtq envelope \\(version 2 without buffer kinds"),
        ([envelope(pickle.dumps(1), flags=FLAG_BYTES, kinds=b"\x01", sizes=(3,))], "version 1 with buffer kinds"),
        ([envelope(b"", version=VERSION_BYTES, flags=FLAG_BYTES, sizes=(3, 4), kinds=b"\x01")], "bad buffer kinds"),
        ([envelope(b"", version=VERSION_BYTES, flags=FLAG_BYTES, sizes=(3,), kinds=b"\x02")], "bad buffer kinds"),
    ],
)
def test_malformed_payloads_name_the_problem(frames, message):
    with pytest.raises(SerializationError, match=message) as info:
        load(Serializer(), frames)
    assert not isinstance(info.value, SignatureError)


def test_frame_count_refuses_absurd_sizes_before_anything_is_fetched():
    assert Serializer.frame_count(envelope(b"", sizes=(0, 5))) == 2
    with pytest.raises(SerializationError, match=r"claims .* frames"):
        Serializer.frame_count(envelope(b"", sizes=(2**62,)), " at k [params]")


# -- limits and culprits -----------------------------------------------------------------------
def test_payload_limit_counts_out_of_band_buffers_and_says_how_to_raise_it():
    assert DEFAULT_MAX_PAYLOAD < 512 * 10**6  # well under what one Redis value may hold
    s = Serializer(max_payload=4096)
    s.dumps(b"x" * 3000, key=KEY, field=FIELD)
    for big in (b"x" * 5000, numpy.zeros(5000, dtype="u1")):
        with pytest.raises(SerializationError, match=r"params is \d\.\d KiB pickled, over the 4\.0 KiB payload limit"):
            s.dumps(big, key=KEY, field=FIELD, what="params")
    s = Serializer(max_payload=MIN_SIZE + 4096)
    for big in (b"x" * (2 * MIN_SIZE), bytearray(2 * MIN_SIZE), memoryview(bytearray(2 * MIN_SIZE))):
        with pytest.raises(SerializationError, match=r"params is 2\.0 MiB pickled, over the 1\.0 MiB payload limit"):
            s.dumps([big], key=KEY, field=FIELD, what="params")
    with pytest.raises(ValueError, match="max_payload"):
        Serializer(max_payload=0)


def test_a_reader_refuses_out_of_band_bytes_over_its_limit_before_joining_them():
    frames = Serializer().dumps(b"x" * (3 * MIN_SIZE), key=KEY, field=FIELD)
    small = Serializer(max_payload=2 * MIN_SIZE)
    with pytest.raises(SerializationError, match=r"claims 3\.0 MiB, over the 2\.0 MiB payload limit"):
        small.frame_sizes(frames[0])  # what a reader checks before it fetches or allocates a frame
    with pytest.raises(SerializationError, match=r"over the 2\.0 MiB payload limit"):
        load(small, frames)


def test_culprit_paths_read_like_the_call():
    lock = threading.Lock()
    s = Serializer()

    def uses_global() -> Any:
        return _GLOBAL_LOCK

    def captures() -> Any:
        return lock

    class Holder:
        def __init__(self) -> None:
            self.inner = {"k": [1, lock]}

    cases = [
        (Call(print, (1, lock)), re.escape("cannot ship args[1]: _thread.lock cannot be pickled")),
        (Call(print, (), {"opt": [lock]}), re.escape("kwargs['opt'][0]: _thread.lock cannot be pickled")),
        (Call(captures), "function .*captures \\(captured 'lock'\\): _thread.lock"),
        (Call(uses_global), "function .*uses_global \\(global '_GLOBAL_LOCK'\\): _thread.lock"),
        (Holder(), "params.inner\\['k'\\]\\[1\\]: _thread.lock"),
        (lock, "cannot ship params: _thread.lock"),
    ]
    for value, message in cases:
        with pytest.raises(SerializationError, match=message):
            s.dumps(value, key=KEY, field=FIELD, what="params")


_GLOBAL_LOCK = threading.Lock()


# -- fuzz --------------------------------------------------------------------------------------
# Unpickling anything that names a global (a function to call, a class to build) looks it up
# through ``pickle.find_class``, which raises an audit event: recording those events shows
# whether the decoder ever started to unpickle a payload.
_found: list[tuple[str, str]] = []
_recording = threading.local()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "pickle.find_class" and getattr(_recording, "on", False):
        _found.append((str(args[0]), str(args[1])))


sys.addaudithook(_audit)  # hooks cannot be removed; this one only records inside _unpickled()


def _unpickled(serializer: Serializer, frames: list[Any], key: str = KEY) -> list[tuple[str, str]]:
    """Feed ``frames`` to ``serializer``; returns the globals unpickling looked up.

    Fails the test when the decoder raises anything but ``SerializationError`` (which
    ``SignatureError`` is not a subclass of, so both are listed).
    """
    _found.clear()
    _recording.on = True
    try:
        serializer.loads(frames, key=key, field=FIELD)
    except (SerializationError, SignatureError):
        pass
    finally:
        _recording.on = False
    return list(_found)


EVIL = pickle.dumps(MakesDir(Path("/nonexistent/rtq-fuzz/marker")), protocol=5)
FORGERIES = [
    envelope(EVIL),
    envelope(EVIL, flags=FLAG_SIGNED, mac=bytes(MAC_SIZE)),
    envelope(EVIL, flags=0xFF, mac=os.urandom(MAC_SIZE)),
    envelope(EVIL, flags=FLAG_SIGNED),
]


def _body_of(first: bytes) -> bytes:
    """The pickle stream of an unsigned envelope (what follows its head)."""
    count = struct.unpack_from(">I", first, 5)[0]
    return first[len(MAGIC) + 6 + 8 * count + (count if first[4] & FLAG_BYTES else 0) :]


# A genuine stream that loads big bytes, a bytearray and a memoryview from out-of-band buffers:
# fed frames of any size and content, or cut short, it must fail cleanly (or verify first).
_BYTES_LIKE = [b"b" * MIN_SIZE, bytearray(MIN_SIZE), memoryview(b"m" * MIN_SIZE)]
OUT_OF_BAND = _body_of(bytes(Serializer().dumps(_BYTES_LIKE, key=KEY, field=FIELD)[0]))
_bodies = (
    st.binary(max_size=200)
    | st.just(EVIL)
    | st.builds(lambda b: EVIL + b, st.binary(max_size=8))
    | st.just(OUT_OF_BAND)
    | st.builds(lambda cut: OUT_OF_BAND[:cut], st.integers(0, len(OUT_OF_BAND)))
)
_random_envelopes = st.builds(
    lambda version, flags, sizes, kinds, mac, body: envelope(
        body, flags=flags, version=version, mac=mac, sizes=tuple(sizes), kinds=kinds
    ),
    st.sampled_from([VERSION, VERSION_BYTES]) | st.integers(0, 255),
    st.sampled_from([0, FLAG_SIGNED, FLAG_BYTES, FLAG_SIGNED | FLAG_BYTES]) | st.integers(0, 255),
    st.just([]) | st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 64), max_size=4),
    st.just(b"") | st.binary(max_size=5),
    st.just(b"") | st.binary(min_size=MAC_SIZE, max_size=MAC_SIZE) | st.binary(max_size=MAC_SIZE + 2),
    _bodies,
)
_frames = st.tuples(
    st.binary(max_size=300) | _random_envelopes | st.sampled_from(FORGERIES),
    st.lists(st.binary(max_size=64), max_size=3),
)


def test_the_fuzz_oracle_sees_code_run():
    assert _unpickled(Serializer(), [envelope(EVIL)]) == [("posix" if os.name == "posix" else "nt", "mkdir")]
    assert all(_unpickled(Serializer("k"), [f]) == [] for f in FORGERIES)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=_frames, key=st.sampled_from([KEY, "other"]))
def test_fuzz_with_a_secret_nothing_is_ever_unpickled(frames, key):
    first, rest = frames
    assert _unpickled(Serializer("k"), [first, *rest], key=key) == [], "unpickling began on an unverified payload"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=_frames)
def test_fuzz_without_a_secret_only_serialization_errors(frames):
    first, rest = frames
    # Unsigned payloads are trusted by design (that is what the secret is for); only check the
    # decoder fails cleanly. The forged ones would call os.mkdir on a path that cannot exist.
    _unpickled(Serializer(), [first, *rest])


_sizes = st.sampled_from([0, 1, MIN_SIZE - 1, MIN_SIZE, MIN_SIZE + 251])
_bytes_like = st.builds(
    lambda kind, size, seed: {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[kind](blob(size, seed)),
    st.sampled_from(["bytes", "bytearray", "memoryview"]),
    _sizes,
    st.integers(0, 250),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(value=st.lists(_bytes_like | st.integers(), max_size=4).map(tuple), secret=st.sampled_from([None, "k"]))
def test_fuzz_bytes_like_values_come_back_equal_and_of_their_type(value, secret):
    s = Serializer(secret)
    frames = s.dumps(value, key=KEY, field=FIELD)
    assert len(frames) == 1 + sum(isinstance(v, (bytes, bytearray, memoryview)) and len(v) >= MIN_SIZE for v in value)
    out = load(s, [bytes(f) for f in frames])
    assert [type(v) for v in out] == [type(v) for v in value]
    assert [bytes(v) if isinstance(v, memoryview) else v for v in out] == [
        bytes(v) if isinstance(v, memoryview) else v for v in value
    ]

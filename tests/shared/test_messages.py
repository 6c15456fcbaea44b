"""Every v1 message (shared/messages.py) to msgpack bytes and back, and every bad field.

The peer chooses every byte, so each field of each message is checked for type and
range; anything off is ``bad-shape`` (an unknown type number is ``unknown-type``).
"""

from __future__ import annotations

import msgpack
import pytest

from shared.errors import RemoteProtocolError
from shared.messages import (
    MESSAGE_CLASSES,
    Ack,
    Bye,
    Deflate,
    Error,
    Hello,
    Hint,
    HintDone,
    HintStart,
    HintStop,
    Inflate,
    MessageType,
    Ping,
    Pong,
    Report,
    Reuse,
    Stats,
    Target,
    Welcome,
    from_wire,
    valid_guest_id,
)
from shared.ranges import encode_ranges

PAYLOAD = encode_ranges([1, 2], [3, 4096])

SAMPLES = [
    Hello(guest="g1", pages=65536, features=("ranges52", "stats")),
    Hello(guest="vm-7.a_b", pages=1, features=(), token="s3cret"),
    Welcome(window=8, max_ranges=4096, features=("ranges52",)),
    Welcome(window=1, max_ranges=1, features=(), max_message_bytes=1 << 20, ram_file="/dev/shm/balloon/g1.ram"),
    Welcome(window=4, max_ranges=64, features=(), pages=262144),
    Report(seq=0, payload=PAYLOAD),
    Report(seq=2**64 - 1, payload=b""),
    Ack(seq=0, rejected_pages=0),
    Ack(seq=41, rejected_pages=2**40),
    Reuse(seq=3, payload=PAYLOAD),
    Inflate(seq=4, payload=PAYLOAD),
    Deflate(seq=5, payload=PAYLOAD),
    Target(pages=262144),
    HintStart(cmd_id=7),
    Hint(seq=6, cmd_id=7, payload=PAYLOAD),
    HintDone(cmd_id=7),
    HintStop(cmd_id=0xFFFFFFFF),
    Stats(values={0: 1, 5: 2**40, 15: 3}),
    Stats(values={}),
    Ping(nonce=12345),
    Pong(nonce=12345),
    Bye(reason="shutting down"),
    Error(code="bad-seq", detail="expected seq 3, got 5"),
]


def wire(message) -> bytes:
    return msgpack.packb(message.to_wire(), use_bin_type=True)


def parse(data: bytes):
    return from_wire(msgpack.unpackb(data, raw=False, strict_map_key=False))


def parse_obj(obj):
    return from_wire(msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, strict_map_key=False))


def test_samples_cover_every_message_type():
    assert {type(m).TYPE for m in SAMPLES} == set(MessageType)
    assert set(MESSAGE_CLASSES) == {int(t) for t in MessageType}
    assert len(MessageType) == 17


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: f"{type(m).__name__}")
def test_round_trip_through_msgpack_bytes(message):
    back = parse(wire(message))
    assert type(back) is type(message)
    assert back == message
    assert wire(back) == wire(message)


def test_wire_forms_follow_design_section_3():
    assert Report(seq=3, payload=b"x" * 8).to_wire() == [3, 3, b"x" * 8]
    assert Ack(seq=3, rejected_pages=1).to_wire() == [4, 3, 1]
    assert Hint(seq=1, cmd_id=9, payload=b"").to_wire() == [10, 1, 9, b""]
    assert Error("bad-seq", "d").to_wire() == [15, "bad-seq", "d"]
    body = Hello(guest="g", pages=10, features=("a",)).to_wire()[1]
    assert body == {"version": 1, "guest": "g", "page_size": 4096, "pages": 10, "features": ["a"]}
    welcome = Welcome(window=2, max_ranges=3, features=()).to_wire()
    assert welcome == [2, {"version": 1, "window": 2, "max_ranges": 3, "features": []}]
    assert Stats(values={1: 2}).to_wire() == [13, [[1, 2]]]
    # The payload goes out as msgpack bin (0xc4 for short ones), never str.
    assert wire(Report(seq=0, payload=b"\x00" * 8))[3] == 0xC4


def expect(code, obj):
    with pytest.raises(RemoteProtocolError) as caught:
        parse_obj(obj)
    assert caught.value.code == code, caught.value
    return caught.value


# -- framing-level shape ------------------------------------------------------------------


@pytest.mark.parametrize("obj", [5, "x", b"x", None, {}, [], {"type": 3}, ["3", 0, b""], [1.0, {}], [True, 1]])
def test_not_a_typed_array_is_bad_shape(obj):
    expect("bad-shape", obj)


@pytest.mark.parametrize("kind", [0, 18, 99, 2**32, 2**64 - 1, -1])
def test_unknown_type(kind):
    expect("unknown-type", [kind, 0, b""])


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_wrong_arity_is_bad_shape(message):
    obj = message.to_wire()
    expect("bad-shape", obj + [0])
    expect("bad-shape", obj[:-1])


# -- every field of every message with a wrong type or out of range ------------------------

NOT_UINT = ["1", -1, 1.5, None, True, b"\x01", [1], {"a": 1}]
NOT_TEXT = [1, None, b"bytes", ["x"], {"a": 1}, 1.5]
NOT_BIN = ["text", 1, None, [1], 1.5]

# (message, index of field in the wire array, wrong values)
POSITIONAL = [
    (Report(seq=0, payload=PAYLOAD), 1, NOT_UINT),
    (Report(seq=0, payload=PAYLOAD), 2, NOT_BIN),
    (Reuse(seq=0, payload=PAYLOAD), 1, NOT_UINT),
    (Reuse(seq=0, payload=PAYLOAD), 2, NOT_BIN),
    (Inflate(seq=0, payload=PAYLOAD), 1, NOT_UINT),
    (Inflate(seq=0, payload=PAYLOAD), 2, NOT_BIN),
    (Deflate(seq=0, payload=PAYLOAD), 1, NOT_UINT),
    (Deflate(seq=0, payload=PAYLOAD), 2, NOT_BIN),
    (Hint(seq=0, cmd_id=1, payload=PAYLOAD), 1, NOT_UINT),
    (Hint(seq=0, cmd_id=1, payload=PAYLOAD), 2, NOT_UINT + [2**32]),
    (Hint(seq=0, cmd_id=1, payload=PAYLOAD), 3, NOT_BIN),
    (Ack(seq=0), 1, NOT_UINT),
    (Ack(seq=0), 2, NOT_UINT),
    (Target(pages=1), 1, NOT_UINT + [2**52 + 1]),
    (HintStart(cmd_id=1), 1, NOT_UINT + [2**32]),
    (HintDone(cmd_id=1), 1, NOT_UINT + [2**32]),
    (HintStop(cmd_id=1), 1, NOT_UINT + [2**32]),
    (Ping(nonce=1), 1, NOT_UINT),
    (Pong(nonce=1), 1, NOT_UINT),
    (Bye(reason=""), 1, NOT_TEXT + ["x" * 1025]),
    (Error(code="internal"), 1, NOT_TEXT + ["x" * 65]),
    (Error(code="internal"), 2, NOT_TEXT + ["x" * 1025]),
    (Stats(values={}), 1, [1, "x", None, {"a": 1}, [[1]], [[1, 2, 3]], [["a", 1]], [[1, -1]],
                           [[2**16, 1]], [1, 2], [[1, 2]] * 65]),
]


@pytest.mark.parametrize(
    "message,index,bad",
    [(m, i, b) for m, i, values in POSITIONAL for b in values],
    ids=lambda v: type(v).__name__ if not isinstance(v, int | str | bytes | float | list | dict | None) else None,
)
def test_wrong_field_is_bad_shape(message, index, bad):
    obj = message.to_wire()
    obj[index] = bad
    expect("bad-shape", obj)


HELLO_BODY = Hello(guest="g1", pages=100, features=("ranges52",), token="t").to_wire()[1]
WELCOME_BODY = Welcome(window=4, max_ranges=64, features=(), max_message_bytes=4096,
                       ram_file="/x").to_wire()[1]

HELLO_BAD = {
    "version": NOT_UINT,
    "guest": NOT_TEXT + ["g" * 65],
    "page_size": NOT_UINT,
    "pages": NOT_UINT + [2**52 + 1],
    "features": [None, "ranges52", {"a": 1}, [1], [None], ["x" * 65], ["f"] * 33],
    "token": [1, b"t", ["t"], "t" * 257],
}
WELCOME_BAD = {
    "version": NOT_UINT,
    "window": NOT_UINT + [0, 2**16 + 1],
    "max_ranges": NOT_UINT + [0, 2**24 + 1],
    "features": [None, "ranges52", [1], ["x" * 65]],
    "max_message_bytes": ["1", -1, 1.5, b"1"],
    "ram_file": [1, b"/x", ["/x"], "x" * 4097],
}


@pytest.mark.parametrize("key,bad", [(k, b) for k, values in HELLO_BAD.items() for b in values])
def test_hello_wrong_field_is_bad_shape(key, bad):
    expect("bad-shape", [1, {**HELLO_BODY, key: bad}])


@pytest.mark.parametrize("key,bad", [(k, b) for k, values in WELCOME_BAD.items() for b in values])
def test_welcome_wrong_field_is_bad_shape(key, bad):
    expect("bad-shape", [2, {**WELCOME_BODY, key: bad}])


@pytest.mark.parametrize("key", ["version", "guest", "page_size", "pages", "features"])
def test_hello_missing_required_key(key):
    body = dict(HELLO_BODY)
    del body[key]
    expect("bad-shape", [1, body])


@pytest.mark.parametrize("key", ["version", "window", "max_ranges", "features"])
def test_welcome_missing_required_key(key):
    body = dict(WELCOME_BODY)
    del body[key]
    expect("bad-shape", [2, body])


@pytest.mark.parametrize("body", [None, [], "x", {1: 2}, {b"version": 1}])
def test_handshake_body_must_be_a_string_keyed_map(body):
    expect("bad-shape", [1, body])
    expect("bad-shape", [2, body])


def test_unknown_map_keys_are_ignored_for_later_minor_versions():
    hello = parse_obj([1, {**HELLO_BODY, "future": [1, 2, 3]}])
    assert hello.guest == "g1"
    welcome = parse_obj([2, {**WELCOME_BODY, "future": {"x": 1}}])
    assert welcome.window == 4


def test_optional_none_fields_are_left_out_of_the_wire_form():
    assert "token" not in Hello(guest="g", pages=1).to_wire()[1]
    body = Welcome(window=1, max_ranges=1).to_wire()[1]
    assert "max_message_bytes" not in body and "ram_file" not in body


def test_stats_keeps_unknown_tags():
    """Linux 6.12 added tags 10..15; a newer guest may send more. Kept, never rejected."""
    stats = parse_obj([13, [[0, 10], [15, 20], [99, 30], [65535, 1]]])
    assert stats.values == {0: 10, 15: 20, 99: 30, 65535: 1}


def test_guest_id_alphabet():
    for good in ["g", "g1", "vm-1.prod_a", "A" * 63, "9lives"]:
        assert valid_guest_id(good), good
    for bad in ["", "-g", ".g", "_g", "A" * 64, "a/b", "../x", "a b", "é", "a\x00", 5, None]:
        assert not valid_guest_id(bad), bad

"""One receive path and one send path: retries, features, chunking and what a message may cost.

Regression tests for tracker issue 10 item 1 and issue 11 items 4, 9 and 12 (protocol
level); each failed on the code that had short paths, mutable messages and an unbounded
decoder.
"""

from __future__ import annotations

import dataclasses
import sys
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairkit import HELLO, raw, ready_guest, ready_host, remote_error

from shared.errors import CODES, LocalProtocolError, RemoteProtocolError
from shared.messages import Ack, Hello, HintDone, HintStart, ReceivedBatch, Report, Stats, Welcome
from shared.protocol import GuestConnection, HostConnection, State
from shared.ranges import encode_pfn32, encode_ranges
from shared.vocabulary import MAX_DEPTH, MAX_OBJECTS, MAX_STR_BYTES, U64_MAX

# -- seq is assigned only after every check ------------------------------------------


def test_a_refused_batch_can_be_retried_as_is():
    """window-overrun, then an ACK, then the *same* message again: it goes out as seq 2."""
    guest = ready_guest(window=2)
    guest.send(Report(payload=encode_ranges([1], [1])))
    guest.send(Report(payload=encode_ranges([2], [1])))
    retry = Report(payload=encode_ranges([3], [1]))
    with pytest.raises(LocalProtocolError) as caught:
        guest.send(retry)
    assert caught.value.code == "window-overrun"
    assert retry.seq is None and guest.next_seq == 2 and guest.last_seq == 1
    guest.receive_data(raw(4, 0, 0))
    assert isinstance(guest.next_event(), Ack)
    data = guest.send(retry)
    assert msgpack.unpackb(data)[1] == 2 and guest.last_seq == 2 and guest.next_seq == 3


def test_a_batch_too_big_for_the_host_takes_no_seq():
    guest = ready_guest()
    with pytest.raises(LocalProtocolError) as caught:
        guest.send(Report(payload=encode_ranges(np.arange(0, 90, 10), np.ones(9, dtype=np.uint64))))
    assert caught.value.code == "too-many-ranges"
    assert guest.next_seq == 0 and guest.last_seq is None and guest.window.in_flight == 0


def test_messages_are_immutable_and_received_batches_arrive_decoded():
    host = ready_host()
    host.receive_data(raw(3, 0, encode_ranges([7, 100], [1, 5000])))
    batch = host.next_event()
    assert batch.seq == 0 and batch.pfns.tolist() == [7, 100] and batch.counts.tolist() == [1, 5000]
    with pytest.raises(AttributeError):  # a ReceivedBatch, plain values in a tuple
        batch.seq = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        Report(payload=b"").seq = 1
    with pytest.raises(TypeError):
        Stats({1: 2}).values[3] = 4


# -- one send path: ACK -----------------------------------------------------------------


def test_ack_goes_through_send_and_frees_the_window():
    host = ready_host(window=1)
    host.receive_data(raw(3, 0, b""))
    host.next_event()
    assert host.window.full
    assert msgpack.unpackb(host.send(Ack(0, 3))) == [4, 0, 3]
    assert not host.window.full
    with pytest.raises(LocalProtocolError) as caught:
        host.send(Ack(0, 0))
    assert caught.value.code == "bad-ack"
    assert not hasattr(host, "send_ack")


def test_rejected_pages_saturate_at_u64_max():
    host = ready_host()
    host.receive_data(raw(3, 0, b""))
    host.next_event()
    assert msgpack.unpackb(host.send(Ack(0, 1 << 70))) == [4, 0, U64_MAX]


# -- negotiated features are enforced ---------------------------------------------------


@pytest.mark.parametrize("message", [raw(10, 0, 1, b""), raw(11, 1)], ids=["HINT", "HINT_DONE"])
def test_hinting_messages_need_hinting(message):
    assert "feature-not-negotiated" in CODES
    error = remote_error(ready_host(features=("ranges52", "stats")), message)
    assert error.code == "feature-not-negotiated"


def test_stats_needs_stats():
    error = remote_error(ready_host(features=("ranges52", "hinting")), raw(13, [[4, 1]]))
    assert error.code == "feature-not-negotiated"
    assert ready_host(features=("stats",)).send is not None  # and with it, STATS is fine:
    host = ready_host(features=("stats",))
    host.receive_data(raw(13, [[4, 1]]))
    assert host.next_event().values == {4: 1}


def test_guest_refuses_hint_start_without_hinting_and_cannot_send_hint_done():
    guest = ready_guest(features=("ranges52",))
    with pytest.raises(LocalProtocolError) as caught:
        guest.send(HintDone(cmd_id=1))
    assert caught.value.code == "feature-not-negotiated"
    with pytest.raises(LocalProtocolError):
        guest.send(Stats({4: 1}))
    assert guest.state is State.READY  # a refused send changes nothing
    assert remote_error(guest, raw(9, 1)).code == "feature-not-negotiated"


def test_host_cannot_start_hinting_a_guest_that_did_not_accept_it():
    host = ready_host(features=("ranges52",))
    with pytest.raises(LocalProtocolError) as caught:
        host.send(HintStart(cmd_id=1))
    assert caught.value.code == "feature-not-negotiated"


def test_payload_must_fit_the_negotiated_encoding():
    with pytest.raises(LocalProtocolError) as caught:
        ready_guest(features=("ranges52",)).send(Report(payload=encode_pfn32([1, 2, 3])))
    assert caught.value.code == "bad-payload"
    with pytest.raises(LocalProtocolError) as caught:
        ready_guest(features=("pfn32",)).send(Report(payload=b"\x00" * 6))
    assert caught.value.code == "bad-payload"
    assert remote_error(ready_host(), raw(3, 0, encode_pfn32([1, 2, 3]))).code == "bad-payload"


# -- check order (PROTOCOL.md §5.1) -----------------------------------------------------


@pytest.mark.parametrize("message,code", [
    (raw(2, "not a map"), "bad-state"),  # a WELCOME from a guest: state before fields
    (raw(-1, 0), "unknown-type"),  # negative types are unknown, not bad-shape
    (raw(99), "unknown-type"),  # type before arity
    (raw(10, "x", "y", "z"), "feature-not-negotiated"),  # feature before fields
    (raw(3, "zero", b""), "bad-shape"),
    (raw(True, 0, b""), "bad-shape"),  # a bool is not an integer type
])
def test_check_order(message, code):
    assert remote_error(ready_host(), message).code == code


# -- the same bytes in any chunking give the same events ---------------------------------


def _session_bytes() -> bytes:
    guest = GuestConnection("g1", 1 << 20, features=("ranges52", "stats", "hinting"))
    parts = [guest.hello()]
    guest.receive_data(raw(2, {"version": 1, "window": 64, "max_ranges": 64,
                               "features": ["ranges52", "stats", "hinting"]}))
    guest.next_event()
    for seq in range(6):
        parts.append(guest.send(Report(payload=encode_ranges([seq * 9000, 5], [seq + 1, 4096 + seq]))))
        parts.append(guest.send(Stats({seq: seq, 4: 1 << 40})))
    parts.append(guest.send(HintDone(cmd_id=3)))
    return b"".join(parts)


SESSION = _session_bytes()
TAILS = [b"", raw(3, 7, b""), raw(13, [[1, 2]] * 70), b"\xc1", raw(1, {"a": [[[]]]}), b"\x91" * 10,
         raw(13, "x" * 70_000), b"\xd4\x01\x02", raw(2, {}), b"\x93\x03\x06\xc6\xff\xff\xff\xff"]


def _replay(data: bytes, cuts: list[int]) -> list:
    host = HostConnection(max_message_bytes=64 * 1024)
    seen: list = []
    positions = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})  # b"" would be EOF
    try:
        for start, end in zip(positions, positions[1:], strict=False):
            host.receive_data(data[start:end])
            for event in host.events():
                seen.append((type(event).__name__, getattr(event, "seq", None),
                             None if getattr(event, "pfns", None) is None else event.pfns.tolist()))
                if isinstance(event, Hello):
                    host.send(Welcome(window=64, max_ranges=64, features=event.features))
                elif getattr(event, "pfns", None) is not None:
                    host.send(Ack(event.seq, 0))
        host.receive_data(b"")
        seen.extend(type(event).__name__ for event in host.events())
    except RemoteProtocolError as error:
        seen.append(("error", error.code))
    return seen


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TAILS), st.integers(0, len(SESSION)),
       st.lists(st.integers(0, len(SESSION) + 80), max_size=40))
def test_small_and_large_chunks_give_identical_events_and_errors(tail, cut, cuts):
    data = SESSION[:cut] + tail
    whole = _replay(data, [])
    assert _replay(data, cuts) == whole
    assert _replay(data, list(range(1, len(data)))) == whole  # one byte at a time


# -- what a message may cost the host (issue 11 items 4 and 9) -----------------------------


def test_nested_empty_arrays_are_refused_on_the_header_and_cost_nothing():
    """~1 MiB of nested arrays sent without its last byte used to hold ~60 MiB of lists."""
    host = HostConnection()
    bomb = b"\x91" * (1 << 20)
    tracemalloc.start()
    try:
        host.receive_data(bomb[:-1])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # the bytes themselves, not a list per byte
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "too-large" and "deeper" in str(caught.value)


def test_many_small_objects_are_bounded_per_message():
    host = ready_host(features=("stats",))
    pairs = [[1, 2]] * 300  # 900 objects: more than any v1 message needs
    error = remote_error(host, raw(13, pairs))
    assert error.code == "too-large" and str(MAX_OBJECTS) in str(error)


def test_depth_three_is_enough_for_every_message_and_four_is_refused():
    host = ready_host(features=("stats",))
    host.receive_data(raw(13, [[1, 2]]))  # STATS: depth 3
    assert host.next_event().values == {1: 2}
    assert MAX_DEPTH == 3
    assert remote_error(host, raw(13, [[[1], 2]])).code == "too-large"


def test_a_deep_array_in_a_checked_field_is_a_clean_error():
    """1023 levels in a checked field made the error message hit the recursion limit."""
    deep = b"\x91" * 1023 + b"\x00"
    host = HostConnection()
    error = remote_error(host, b"\x92\x01" + deep)
    assert error.code == "too-large" and len(str(error)) < 200
    assert sys.getrecursionlimit() >= 1000


def test_a_str_header_over_the_str_limit_is_refused_on_the_header():
    host = HostConnection()
    header = b"\x92\x11\xdb" + (MAX_STR_BYTES + 1).to_bytes(4, "big")  # BYE with a 64 KiB + 1 str
    host.receive_data(header)
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "too-large"


def test_ext_types_are_refused_even_as_values_of_unknown_keys():
    body = b"\x86" + b"".join(msgpack.packb(x) for x in (
        "version", 1, "guest", "g1", "page_size", 4096, "pages", 1, "features", [])) + msgpack.packb("future")
    error = remote_error(HostConnection(), b"\x92\x01" + body + b"\xd4\x01\x00")
    assert error.code == "bad-msgpack" and "extension" in str(error)


def test_unknown_keys_with_plain_values_are_still_ignored():
    body = {"version": 1, "guest": "g1", "page_size": 4096, "pages": 1, "features": [], "future": [1, "x"]}
    host = HostConnection()
    host.receive_data(raw(1, body))
    assert host.next_event().guest == "g1"


# -- the batch lane and the general path: the same events and errors (issue 19) -----------


def _uint(value: int, form: str) -> bytes:
    """``value`` as a msgpack unsigned integer in one of its encodings (as wide as asked)."""
    if form == "fix" and value < 128:
        return bytes([value])
    for marker, width in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if form in ("fix", f"u{8 * width}") and value < 1 << (8 * width):
            return bytes([marker]) + value.to_bytes(width, "big")
    return b"\xcf" + (value % (1 << 64)).to_bytes(8, "big")


def _bin(body: bytes, form: str) -> bytes:
    widths = {"bin8": (0xC4, 1), "bin16": (0xC5, 2), "bin32": (0xC6, 4)}
    marker, width = widths[form]
    if len(body) >= 1 << (8 * width):
        marker, width = 0xC6, 4
    return bytes([marker]) + len(body).to_bytes(width, "big") + body


@st.composite
def batch_frames(draw):
    """Batch frames in every encoding msgpack allows, and the near misses the lane must leave
    to the general path: wrong arity, a str payload, a negative or huge field, a big frame."""
    kind = draw(st.sampled_from([3, 5, 6, 7, 10, 4, 13]))
    seq = draw(st.sampled_from([0, 1, 2, 3, 200, 70_000, 1 << 40]))
    uint = st.sampled_from(["fix", "u8", "u16", "u32", "u64"])
    ranges = draw(st.integers(0, 5))
    body = encode_ranges(np.arange(ranges, dtype=np.uint64) * 4096, np.full(ranges, 4096 + ranges, np.uint64))
    body += draw(st.sampled_from([b"", b"", b"\x01", b"\x00" * 8]))
    fields = [_uint(kind, "fix"), _uint(seq, draw(uint))]
    if kind == 10 or draw(st.integers(0, 9)) == 0:  # HINT's cmd_id, or an extra element elsewhere
        cmd = draw(st.sampled_from([0, 3, 1 << 32, (1 << 32) - 1]))
        fields.append(_uint(cmd, draw(uint)))
    if draw(st.integers(0, 9)) == 0:
        fields.append(msgpack.packb("not bin"))
    elif draw(st.integers(0, 9)) == 0:
        fields.append(msgpack.packb(-1))
    else:
        fields.append(_bin(body, draw(st.sampled_from(["bin8", "bin16", "bin32"]))))
    if draw(st.integers(0, 19)) == 0:
        fields = fields[:-1]  # one element short
    if draw(st.integers(0, 9)) == 0:
        header = b"\xdc" + len(fields).to_bytes(2, "big")  # array16: the same message, another form
    else:
        header = bytes([0x90 | len(fields)])
    return header + b"".join(fields)


def _events(data: bytes, cuts: list[int], lane: bool) -> list:
    """Every event and the error of a host fed ``data`` cut at ``cuts``, by one path."""
    host = HostConnection(max_message_bytes=4096)
    host._lane = lane
    seen: list = []
    positions = sorted({0, len(data), *(cut for cut in cuts if 0 < cut < len(data))})
    try:
        for start, end in zip(positions, positions[1:], strict=False):
            host.receive_data(data[start:end])
            for event in host.events():
                if isinstance(event, Hello):
                    host.send(Welcome(window=3, max_ranges=4, features=("ranges52", "hinting")))
                    host.send(HintStart(cmd_id=3))
                    seen.append("hello")
                elif isinstance(event, ReceivedBatch):
                    seen.append((event.kind, event.seq, event.pfns.tolist(), event.counts.tolist(), event.cmd_id))
                    if event.seq % 2:  # leave some in flight: window-overrun is reachable
                        host.ack(event.seq, event.seq)
                else:
                    seen.append(event)
    except RemoteProtocolError as error:
        seen.append(("error", error.code))
    return seen


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batch_frames(), max_size=8), st.lists(st.integers(0, 4000), max_size=12),
       st.sampled_from([b"", raw(14, 1), b"\xc1", raw(3, 0, b"x" * 5000)]))
def test_the_lane_and_the_general_path_give_the_same_events_and_errors(frames, cuts, tail):
    data = raw(1, {**HELLO, "features": ["ranges52", "hinting"]}) + b"".join(frames) + tail
    general = _events(data, [], lane=False)
    assert _events(data, [], lane=True) == general
    assert _events(data, cuts, lane=True) == general
    assert _events(data, cuts, lane=False) == general


def test_the_lane_reads_a_whole_batch_frame_without_msgpack():
    """The common frame never reaches the framer or the unpacker (they would count it)."""
    host = ready_host()
    frames = b"".join(raw(3, seq, encode_ranges([seq * 8], [1])) for seq in range(2))
    unpacked = host._unpacker.tell()  # bytes msgpack has read so far (the HELLO)
    host.receive_data(frames)
    assert host._framer.at_boundary and host._unpacker.tell() == unpacked
    assert [event.seq for event in host.events()] == [0, 1]


def test_a_frame_announcing_more_than_the_limit_is_refused_on_its_header():
    host = ready_host(max_message_bytes=1024)
    host.receive_data(b"\x93\x03\x00\xc6" + (4096).to_bytes(4, "big") + b"\x00" * 8)  # body not sent
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "too-large"

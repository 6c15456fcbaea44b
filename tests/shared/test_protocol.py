"""Whole sessions between a GuestConnection and a HostConnection with no socket.

Each failure the protocol defines is provoked here once, with its code: the guest side
through the real GuestConnection (a local error), the host side with hand-made bytes
that a misbehaving guest could send (a remote error).
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from pairkit import HELLO, raw, ready_host, remote_error

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.messages import (
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
    ReceivedBatch,
    Report,
    Reuse,
    Stats,
    Target,
    Welcome,
)
from shared.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    GuestConnection,
    HostConnection,
    State,
    negotiate_features,
)
from shared.ranges import decode_ranges, encode_pfn32, encode_ranges

# -- a whole session -------------------------------------------------------------------


def test_handshake(pair_factory):
    pair = pair_factory(features=("ranges52",), window=3, max_ranges=100)
    assert pair.guest.state is State.IDLE and pair.host.state is State.IDLE
    hello, welcome = pair.handshake()
    assert hello == Hello(guest="g1", pages=1 << 16, features=("ranges52",))
    assert welcome.window == 3 and welcome.max_ranges == 100
    assert pair.guest.state is State.READY and pair.host.state is State.READY
    assert pair.guest.features == pair.host.features == ("ranges52",)
    assert pair.guest.encoding == pair.host.encoding == "ranges52"
    assert pair.host.hello.guest == "g1"


def test_feature_negotiation_ignores_unknown_names(pair_factory):
    pair = pair_factory(features=("warp-drive", "stats", "ranges52", "stats", "deflate-on-oom"),
                        host_features=("ranges52", "stats", "hinting"))
    _, welcome = pair.handshake()
    assert welcome.features == ("stats", "ranges52")
    assert pair.guest.features == ("stats", "ranges52")


def test_negotiate_features_keeps_guest_order_and_drops_duplicates():
    assert negotiate_features(["b", "a", "x", "b"], ["a", "b", "c"]) == ("b", "a")
    assert negotiate_features([], ["a"]) == ()


def test_no_encoding_feature_means_ranges52(pair_factory):
    pair = pair_factory(features=(), host_features=("ranges52",))
    _, welcome = pair.handshake()
    assert welcome.features == ()
    assert pair.guest.encoding == pair.host.encoding == "ranges52"
    batch = pair.guest_sends(Report(payload=encode_ranges([5], [5000])))[0]
    assert batch.counts.tolist() == [5000]


def test_reports_and_acks(pair_factory):
    pair = pair_factory(window=4)
    pair.handshake()
    kinds = [Report, Reuse, Inflate, Deflate, Report]
    for expected_seq, kind in enumerate(kinds):
        pfns = np.array([10 * expected_seq, 100_000], dtype=np.uint64)
        counts = np.array([1 + expected_seq, 4096], dtype=np.uint64)
        batch = pair.guest_sends(kind(payload=encode_ranges(pfns, counts)))[0]
        assert batch.TYPE is kind.TYPE and batch.seq == expected_seq
        assert batch.pfns.tolist() == pfns.tolist() and batch.counts.tolist() == counts.tolist()
        assert pair.host.window.in_flight == 1
        ack = pair.host_sends(Ack(seq=batch.seq, rejected_pages=expected_seq))[0]
        assert ack == Ack(seq=expected_seq, rejected_pages=expected_seq)
        assert pair.guest.window.in_flight == 0 and pair.host.window.in_flight == 0
    assert pair.guest.next_seq == pair.host.expected_seq == len(kinds)


def test_acks_may_come_out_of_order(pair_factory):
    pair = pair_factory(window=3)
    pair.handshake()
    for _ in range(3):
        pair.guest_sends(Report(payload=encode_ranges([1], [1])))
    for seq in (2, 0, 1):
        pair.host_sends(Ack(seq=seq))
    assert pair.guest.window.in_flight == 0


def test_hinting_flow(pair_factory):
    pair = pair_factory(features=("ranges52", "hinting"))
    pair.handshake()
    assert pair.host_sends(HintStart(cmd_id=7))[0] == HintStart(cmd_id=7)
    hint = pair.guest_sends(Hint(cmd_id=7, payload=encode_ranges([512], [512])))[0]
    assert hint.seq == 0 and hint.cmd_id == 7 and hint.counts.tolist() == [512]
    pair.host_sends(Ack(seq=0))
    assert pair.guest_sends(HintDone(cmd_id=7))[0] == HintDone(cmd_id=7)
    assert pair.host_sends(HintStop(cmd_id=7))[0] == HintStop(cmd_id=7)


def test_target_stats_ping_pong_bye(pair_factory):
    pair = pair_factory(features=("ranges52", "stats"))
    pair.handshake()
    assert pair.host_sends(Target(pages=4096))[0] == Target(pages=4096)
    stats = pair.guest_sends(Stats(values={0: 1, 99: 5}))[0]
    assert stats.values == {0: 1, 99: 5}
    assert pair.host_sends(Ping(nonce=9))[0] == Ping(nonce=9)
    assert pair.guest_sends(Pong(nonce=9))[0] == Pong(nonce=9)
    assert pair.guest_sends(Ping(nonce=10))[0] == Ping(nonce=10)
    assert pair.host_sends(Pong(nonce=10))[0] == Pong(nonce=10)
    assert pair.guest_sends(Bye(reason="done"))[0] == Bye(reason="done")
    assert pair.guest.state is State.CLOSED and pair.host.state is State.CLOSED
    with pytest.raises(LocalProtocolError) as caught:
        pair.guest.send(Ping(nonce=1))
    assert caught.value.code == "bad-state"


def test_pfn32_legacy_session(pair_factory):
    pair = pair_factory(features=("pfn32", "ranges52"), host_features=("ranges52", "pfn32"))
    _, welcome = pair.handshake()
    assert welcome.features == ("pfn32", "ranges52")
    assert pair.guest.encoding == pair.host.encoding == "pfn32"
    pages = np.arange(1000, 1256, dtype=np.uint64)
    batch = pair.guest_sends(Inflate(payload=encode_pfn32(pages)))[0]
    assert batch.pfns.tolist() == pages.tolist() and batch.counts.tolist() == [1] * 256
    with pytest.raises(LocalProtocolError) as caught:
        pair.guest.send(Inflate(payload=np.arange(257, dtype="<u4").tobytes()))
    assert caught.value.code == "too-many-ranges"


def test_pfn32_host_rejects_more_than_256(pair_factory):
    host = ready_host(features=(), max_ranges=4096)
    host.features = ("pfn32",)  # as if negotiated
    error = remote_error(host, raw(6, 0, np.arange(257, dtype="<u4").tobytes()))
    assert error.code == "too-many-ranges"


def test_error_message_is_an_event_and_closes(pair_factory):
    pair = pair_factory()
    pair.handshake()
    error = pair.host_sends(Error(code="internal", detail="boom"))[0]
    assert error == Error(code="internal", detail="boom")
    assert pair.guest.state is State.CLOSED and pair.host.state is State.CLOSED


# -- the window ------------------------------------------------------------------------


def test_window_full_is_a_local_error_on_the_guest(pair_factory):
    pair = pair_factory(window=2)
    pair.handshake()
    for _ in range(2):
        pair.guest_sends(Report(payload=encode_ranges([1], [1])))
    assert not pair.guest.can_send_batch
    with pytest.raises(LocalProtocolError) as caught:
        pair.guest.send(Report(payload=encode_ranges([1], [1])))
    assert caught.value.code == "window-overrun"
    assert pair.guest.next_seq == 2  # the refused batch did not take a seq
    pair.host_sends(Ack(seq=0))
    assert pair.guest.can_send_batch
    batch = pair.guest_sends(Report(payload=encode_ranges([2], [2])))[0]
    assert batch.seq == 2


def test_window_overrun_seen_by_the_host(pair_factory):
    host = ready_host(window=2)
    host.receive_data(raw(3, 0, b"") + raw(3, 1, b""))
    assert [e.TYPE for e in host.events()] == [MessageType.REPORT] * 2
    error = remote_error(host, raw(3, 2, b""))
    assert error.code == "window-overrun"
    assert host.state is State.CLOSED


def test_window_reopens_after_host_ack():
    host = ready_host(window=1)
    host.receive_data(raw(3, 0, b""))
    list(host.events())
    host.send(Ack(seq=0))
    host.receive_data(raw(3, 1, b""))
    assert next(host.events()).seq == 1


def test_host_cannot_ack_what_is_not_in_flight():
    host = ready_host()
    with pytest.raises(LocalProtocolError) as caught:
        host.send(Ack(seq=0))
    assert caught.value.code == "bad-ack"


def test_guest_rejects_an_ack_for_nothing(pair_factory):
    pair = pair_factory()
    pair.handshake()
    error = remote_error(pair.guest, raw(4, 5, 0))
    assert error.code == "bad-ack"


# -- remote errors, one per code ----------------------------------------------------------


def test_bad_seq():
    host = ready_host(window=4)
    host.receive_data(raw(3, 0, b""))
    list(host.events())
    assert remote_error(host, raw(3, 2, b"")).code == "bad-seq"


def test_seq_counts_over_every_batch_kind():
    host = ready_host(window=8, features=("hinting",))
    host.receive_data(raw(3, 0, b"") + raw(5, 1, b"") + raw(10, 2, 1, b"") + raw(6, 3, b""))
    assert [e.seq for e in host.events()] == [0, 1, 2, 3]
    assert remote_error(host, raw(7, 3, b"")).code == "bad-seq"


def test_report_before_hello_is_bad_state():
    host = HostConnection()
    assert remote_error(host, raw(3, 0, b"")).code == "bad-state"


def test_hello_twice_is_bad_state():
    host = HostConnection()
    host.receive_data(raw(1, HELLO))
    host.next_event()
    assert remote_error(host, raw(1, HELLO)).code == "bad-state"


def test_hello_twice_after_welcome_is_bad_state():
    host = ready_host()
    assert remote_error(host, raw(1, HELLO)).code == "bad-state"


def test_report_before_welcome_is_bad_state():
    host = HostConnection()
    assert remote_error(host, raw(1, HELLO) + raw(3, 0, b"")).code == "bad-state"


@pytest.mark.parametrize("message", [raw(4, 0, 0), raw(8, 1), raw(9, 1), raw(12, 1), raw(2, {
    "version": 1, "window": 1, "max_ranges": 1, "features": []})])
def test_host_cannot_receive_host_messages(message):
    host = ready_host()
    assert remote_error(host, message).code == "bad-state"


@pytest.mark.parametrize("message", [raw(3, 0, b""), raw(11, 1), raw(13, []), raw(1, HELLO)])
def test_guest_cannot_receive_guest_messages(pair_factory, message):
    pair = pair_factory()
    pair.handshake()
    assert remote_error(pair.guest, message).code == "bad-state"


def test_guest_cannot_receive_before_hello():
    guest = GuestConnection("g1", 10)
    assert remote_error(guest, raw(2, {"version": 1, "window": 1, "max_ranges": 1, "features": []})).code == "bad-state"


def test_guest_cannot_send_before_welcome():
    guest = GuestConnection("g1", 10)
    with pytest.raises(LocalProtocolError) as caught:
        guest.send(Report(payload=b""))
    assert caught.value.code == "bad-state"
    guest.hello()
    with pytest.raises(LocalProtocolError):
        guest.hello()
    with pytest.raises(LocalProtocolError):
        guest.send(Report(payload=b""))


def test_host_cannot_send_before_hello():
    host = HostConnection()
    with pytest.raises(LocalProtocolError) as caught:
        host.send(Welcome(window=1, max_ranges=1))
    assert caught.value.code == "bad-state"


def test_host_cannot_accept_features_never_offered():
    host = HostConnection()
    host.receive_data(raw(1, HELLO))
    host.next_event()
    with pytest.raises(LocalProtocolError):
        host.send(Welcome(window=1, max_ranges=1, features=("pfn32",)))


def test_guest_rejects_a_welcome_with_features_never_offered():
    guest = GuestConnection("g1", 10, features=("ranges52",))
    guest.hello()
    error = remote_error(guest, raw(2, {"version": 1, "window": 1, "max_ranges": 1, "features": ["pfn32"]}))
    assert error.code == "bad-shape"


@pytest.mark.parametrize("version", [0, 2, 255])
def test_bad_version(version):
    assert remote_error(HostConnection(), raw(1, {**HELLO, "version": version})).code == "bad-version"
    guest = GuestConnection("g1", 10)
    guest.hello()
    welcome = {"version": version, "window": 1, "max_ranges": 1, "features": []}
    assert remote_error(guest, raw(2, welcome)).code == "bad-version"


@pytest.mark.parametrize("page_size", [0, 512, 8192, 65536, 2**21])
def test_bad_page_size(page_size):
    assert remote_error(HostConnection(), raw(1, {**HELLO, "page_size": page_size})).code == "bad-page-size"


@pytest.mark.parametrize("guest", ["", "../etc", "a/b", "-x", "x" * 64, "a b", "g\n1"])
def test_bad_guest_id(guest):
    assert remote_error(HostConnection(), raw(1, {**HELLO, "guest": guest})).code == "bad-guest-id"
    with pytest.raises(LocalProtocolError) as caught:
        GuestConnection(guest, 10)
    assert caught.value.code == "bad-guest-id"


def test_guest_with_no_pages_is_bad_shape():
    assert remote_error(HostConnection(), raw(1, {**HELLO, "pages": 0})).code == "bad-shape"


@pytest.mark.parametrize("payload", [b"\x00" * 7, struct.pack("<Q", 5 << 12), struct.pack("<QQ", 5 << 12, 0)])
def test_bad_payload(payload):
    host = ready_host()
    assert remote_error(host, raw(3, 0, payload)).code == "bad-payload"


def test_too_many_ranges():
    host = ready_host(max_ranges=4)
    host.receive_data(raw(3, 0, encode_ranges(range(4), [1] * 4)))
    assert next(host.events()).pfns.size == 4
    host.send(Ack(seq=0))
    assert remote_error(host, raw(3, 1, encode_ranges(range(5), [1] * 5))).code == "too-many-ranges"


def test_too_many_ranges_cheap_bound_before_decoding():
    host = ready_host(max_ranges=4)
    assert remote_error(host, raw(3, 0, b"\x01" * 8 * 9)).code == "too-many-ranges"


def test_escaped_ranges_count_once_against_max_ranges(pair_factory):
    pair = pair_factory(max_ranges=4)
    pair.handshake()
    batch = pair.guest_sends(Report(payload=encode_ranges([1, 2, 3, 4], [4096] * 4)))[0]
    assert batch.counts.tolist() == [4096] * 4
    with pytest.raises(LocalProtocolError) as caught:
        pair.guest.send(Report(payload=encode_ranges(range(5), [1] * 5)))
    assert caught.value.code == "too-many-ranges"


def test_guest_honours_the_hosts_max_message_bytes(pair_factory):
    pair = pair_factory(max_ranges=1 << 20, welcome_max_message_bytes=1024)
    pair.handshake()
    with pytest.raises(LocalProtocolError) as caught:
        pair.guest.send(Report(payload=encode_ranges(range(200), [1] * 200)))
    assert caught.value.code == "too-large"


def test_frame_announcing_200_mb_is_refused_after_the_header_only():
    host = ready_host(max_ranges=1 << 20)
    header = b"\x93\x03\x00\xc6" + struct.pack(">I", 200_000_000)
    host.receive_data(header)
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "too-large"
    # Nothing of the announced body was needed, and nothing more is accepted.
    host.receive_data(b"\x00" * 4096)
    with pytest.raises(RemoteProtocolError):
        host.next_event()


@pytest.mark.parametrize("header", [
    b"\xc6" + struct.pack(">I", 200_000_000),  # bin32
    b"\xc5" + struct.pack(">H", 60_000),  # bin16 over a small limit
    b"\xdb" + struct.pack(">I", 200_000_000),  # str32
])
def test_oversized_announcement_anywhere_in_the_first_bytes(header):
    host = HostConnection(max_message_bytes=4096)
    host.receive_data(b"\x92\x01\x81\xa5guest" + header)
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "too-large"


def test_oversized_announcement_fed_one_byte_at_a_time():
    host = ready_host(max_ranges=1 << 20)
    header = b"\x93\x03\x00\xc6" + struct.pack(">I", 200_000_000)
    for byte in header[:-1]:
        host.receive_data(bytes([byte]))
        assert host.next_event() is NEED_DATA
    host.receive_data(header[-1:])
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "too-large"


def test_complete_message_over_the_limit_is_too_large():
    host = ready_host(max_ranges=1 << 20, max_message_bytes=4096)
    assert remote_error(host, raw(3, 0, b"\x01" * 8 * 600)).code == "too-large"


def test_message_just_under_the_limit_is_accepted():
    host = ready_host(max_ranges=1 << 20, max_message_bytes=4096)
    payload = encode_ranges(range(500), [1] * 500)
    frame = raw(3, 0, payload)
    assert len(frame) <= 4096
    host.receive_data(frame)
    assert next(host.events()).pfns.size == 500


def test_stream_of_small_messages_larger_than_the_limit_in_one_read():
    host = ready_host(window=1000, max_ranges=8, max_message_bytes=4096)
    data = b"".join(raw(3, seq, encode_ranges([seq], [1])) for seq in range(600))
    assert len(data) > 2 * 4096
    host.receive_data(data)
    assert [e.seq for e in host.events()] == list(range(600))


@pytest.mark.parametrize("garbage", [b"\xc1", b"\x93\xc1\x00\x00"])
def test_garbage_is_bad_msgpack(garbage):
    assert remote_error(HostConnection(), garbage).code == "bad-msgpack"


def _hello_with_key(key_bytes: bytes, value_bytes: bytes = b"\x01") -> bytes:
    """A valid HELLO body plus one entry whose key is raw msgpack (an array or a map)."""
    body = msgpack.packb(HELLO)
    assert 0x80 <= body[0] < 0x8F
    return bytes([0x92, 0x01, body[0] + 1]) + body[1:] + key_bytes + value_bytes


@pytest.mark.parametrize("key", [b"\x92\x01\x02", b"\x90", b"\x81\xa1a\x01", b"\x01"], ids=["array", "empty-array", "map", "int"])
def test_a_hello_key_that_is_not_a_string_is_bad_shape(key):
    """§2: maps have str keys only; a key no dict can hold used to crash the decoder (bad-msgpack)."""
    error = remote_error(HostConnection(), _hello_with_key(key))
    assert error.code == "bad-shape" and "string keys" in error.detail


def test_a_map_with_an_int_key_as_an_unknown_keys_value_is_ignored():
    """An unknown key's value is not otherwise checked (§2.1), whatever keys it holds (an
    array key there would sit at level 4: too deep, §2.1)."""
    host = HostConnection()
    host.receive_data(_hello_with_key(b"\xa5extra", b"\x81\x01\x03"))
    assert isinstance(host.next_event(), Hello)


@pytest.mark.parametrize("field,value", [("features", [0]), ("pages", 0), ("page_size", 512), ("guest", "../x")])
def test_the_version_is_checked_before_the_fields_after_it(field, value):
    """§5.1 step 6: fields in order, each with its own code — version first."""
    assert remote_error(HostConnection(), raw(1, {**HELLO, "version": 2, field: value})).code == "bad-version"
    welcome = {"version": 2, "window": 0, "max_ranges": 1, "features": []}
    guest = GuestConnection("g1", 10)
    guest.hello()
    assert remote_error(guest, raw(2, welcome)).code == "bad-version"


def test_fields_are_checked_in_the_tables_order():
    host_codes = [
        ({"guest": "../x", "page_size": 512}, "bad-guest-id"),
        ({"page_size": 512, "pages": 0}, "bad-page-size"),
        ({"pages": 0, "features": [0]}, "bad-shape"),
    ]
    for fields, code in host_codes:
        assert remote_error(HostConnection(), raw(1, {**HELLO, **fields})).code == code


def test_not_an_array_is_bad_shape():
    assert remote_error(HostConnection(), b"\x05").code == "bad-shape"


def test_unknown_type():
    host = ready_host()
    assert remote_error(host, raw(99, 0)).code == "unknown-type"


# -- after an error, and at the end -------------------------------------------------------


def test_connection_is_dead_after_an_error():
    host = ready_host()
    first = remote_error(host, raw(3, 7, b""))
    assert first.code == "bad-seq" and host.state is State.CLOSED
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as again:
            host.next_event()
        assert again.value is first
    host.receive_data(raw(3, 0, b""))  # ignored
    with pytest.raises(RemoteProtocolError):
        host.next_event()
    with pytest.raises(LocalProtocolError) as caught:
        host.send(Ack(seq=0))
    assert caught.value.code == "bad-state"
    # The ERROR for it may still be sent, and the guest sees it as an event.
    guest = GuestConnection("g1", 10)
    guest.hello()
    guest.receive_data(raw(2, {"version": 1, "window": 1, "max_ranges": 1, "features": []}))
    guest.next_event()
    guest.receive_data(host.send_error(first))
    error = guest.next_event()
    assert error == Error(code="bad-seq", detail=first.detail)
    assert guest.state is State.CLOSED


def test_error_buffered_behind_good_messages_comes_after_them():
    host = ready_host(window=4)
    host.receive_data(raw(3, 0, b"") + b"\xc1")
    assert host.next_event().seq == 0
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "bad-msgpack"


def test_eof_gives_connection_closed():
    host = ready_host()
    host.receive_data(raw(3, 0, b""))
    host.receive_data(b"")
    assert host.next_event().seq == 0
    assert host.next_event() is CONNECTION_CLOSED
    assert host.state is State.CLOSED
    assert host.next_event() is CONNECTION_CLOSED


def test_eof_before_hello():
    host = HostConnection()
    host.receive_data(b"")
    assert host.next_event() is CONNECTION_CLOSED


def session_bytes() -> tuple[bytes, bytes]:
    """A guest's whole side of a session, and the host replies, as two byte strings."""
    guest = GuestConnection("g1", 1 << 20, features=("ranges52", "stats"))
    host = HostConnection()
    to_host = [guest.hello()]
    host.receive_data(to_host[-1])
    host.next_event()
    to_guest = [host.send(Welcome(window=4, max_ranges=64, features=("ranges52", "stats")))]
    guest.receive_data(to_guest[-1])
    guest.next_event()
    rng = np.random.default_rng(5)
    for round_ in range(6):
        counts = rng.integers(1, 9000, 5).astype(np.uint64)
        pfns = np.cumsum(counts + 3).astype(np.uint64)
        to_host.append(guest.send(Report(payload=encode_ranges(pfns, counts))))
        to_host.append(guest.send(Stats(values={round_: round_})))
        host.receive_data(b"".join(to_host[-2:]))
        for event in host.events():
            if isinstance(event, ReceivedBatch):
                to_guest.append(host.send(Ack(seq=event.seq)))
                guest.receive_data(to_guest[-1])
                list(guest.events())
    to_host.append(guest.send(Bye(reason="done")))
    return b"".join(to_host), b"".join(to_guest)


def summarize(event):
    if event is NEED_DATA or event is CONNECTION_CLOSED:
        return event
    if getattr(event, "pfns", None) is not None:
        return (event.TYPE.name, event.seq, event.pfns.tolist(), event.counts.tolist())
    return event


def events_of(connection_type, chunks, replies=()):
    connection = connection_type()
    seen = []
    for chunk in chunks:
        connection.receive_data(chunk)
        for event in connection.events():
            seen.append(summarize(event))
            if isinstance(event, Hello):
                connection.send(Welcome(window=4, max_ranges=64, features=("ranges52", "stats")))
            elif isinstance(event, ReceivedBatch):
                connection.send(Ack(seq=event.seq))
    return seen


def test_one_byte_at_a_time_gives_the_same_events():
    to_host, _ = session_bytes()
    whole = events_of(HostConnection, [to_host])
    bytewise = events_of(HostConnection, [to_host[i : i + 1] for i in range(len(to_host))])
    assert whole == bytewise
    assert [e[0] for e in whole if isinstance(e, tuple)] == ["REPORT"] * 6
    assert isinstance(whole[0], Hello) and isinstance(whole[-1], Bye)


def test_decoded_arrays_match_the_payload(pair_factory):
    pair = pair_factory()
    pair.handshake()
    payload = encode_ranges([1, 2**51], [4095, 2**40])
    batch = pair.guest_sends(Report(payload=payload))[0]
    expected = decode_ranges(payload)
    assert batch.pfns.tolist() == expected[0].tolist() and batch.counts.tolist() == expected[1].tolist()


def test_counters(pair_factory):
    pair = pair_factory()
    pair.handshake()
    data = pair.guest.send(Report(payload=encode_ranges([1], [1])))
    pair.to_host(data)
    assert pair.host.messages_received == 2
    assert pair.host.bytes_received == pair.guest.bytes_sent


def test_message_trickling_in_is_refused_once_past_the_limit():
    """Many small strings: no header announces much, but the message keeps growing."""
    host = HostConnection(max_message_bytes=4096)
    data = msgpack.packb([13, ["x" * 50] * 1000])
    fed = 0
    with pytest.raises(RemoteProtocolError) as caught:
        for start in range(0, len(data), 500):
            host.receive_data(data[start : start + 500])
            fed += 500
            assert host.next_event() is NEED_DATA
    assert caught.value.code == "too-large"
    assert fed <= 4096 + 500


def test_message_over_the_limit_split_across_reads_is_too_large():
    host = ready_host(max_ranges=1 << 20, max_message_bytes=4096)
    data = raw(3, 0, b"\x01" * 4096)  # the bin alone fits max_bin_len; the frame does not
    host.receive_data(data[:3])
    assert host.next_event() is NEED_DATA
    host.receive_data(data[3:])
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "too-large"


def test_objects_count_as_they_arrive_not_as_a_header_announces_them():
    """§2.1: [13, [...]] announcing 1,000 pairs passes its header and is refused at object 513."""
    host = ready_host_stats()
    data = b"\x92\x0d\xdc" + (1000).to_bytes(2, "big")  # 3 objects so far
    host.receive_data(data)
    assert host.next_event() is NEED_DATA
    objects = 3
    pair = b"\x92\x01\x02"
    while objects + 3 <= 512:
        host.receive_data(pair)
        objects += 3
        assert host.next_event() is NEED_DATA
    assert objects == 510
    host.receive_data(pair[:2])  # objects 511 and 512: still fine
    assert host.next_event() is NEED_DATA
    host.receive_data(pair[2:])  # the 513th
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "too-large" and "512" in caught.value.detail


def test_resync_filler_completes_a_half_batch_which_is_handled_then_bad_msgpack():
    """§1.1 step 3: 0xC1 inside a half-written bin body is body bytes; the batch it completes
    is acted on (every range out-of-range), and the next 0xC1 is bad-msgpack."""
    host = ready_host_stats()
    report = raw(3, 0, encode_ranges([5], [1]))
    host.receive_data(report[:-4])  # the guest died inside the payload
    assert host.next_event() is NEED_DATA
    host.receive_data(b"\xc1" * 8)
    batch = host.next_event()
    assert batch.TYPE is MessageType.REPORT and batch.pfns.tolist()[0] > 1 << 40  # far beyond the guest
    with pytest.raises(RemoteProtocolError) as caught:
        host.next_event()
    assert caught.value.code == "bad-msgpack"


def ready_host_stats() -> HostConnection:
    return ready_host(window=4, max_ranges=64, features=("ranges52", "stats"))

"""The connection state machine under every input, in the style of h2's test_state_machines.

Two layers: a sweep over every (role, state, message type) pair that checks the outcome
against RECEIVE_RULES / SEND_RULES, and Hypothesis state machines that throw random
sequences of messages and bytes at a host and at a guest. The only acceptable outcomes
are a move to the state the table names, or a ProtocolError after which the connection
is closed for good — never another exception.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shared.errors import CODES, LocalProtocolError, ProtocolError, RemoteProtocolError
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
    Report,
    Reuse,
    Stats,
    Target,
    Welcome,
)
from shared.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    RECEIVE_RULES,
    SEND_RULES,
    GuestConnection,
    HostConnection,
    Role,
    State,
    negotiate_features,
)
from shared.ranges import encode_ranges

PAYLOAD = encode_ranges([1, 100], [3, 5000])


def sample(kind: MessageType):
    """A well-formed message of each type; batches leave seq to the connection."""
    return {
        MessageType.HELLO: Hello(guest="g1", pages=1 << 16, features=("ranges52", "hinting", "stats")),
        MessageType.WELCOME: Welcome(window=4, max_ranges=64, features=("ranges52", "hinting", "stats")),
        MessageType.REPORT: Report(payload=PAYLOAD),
        MessageType.ACK: Ack(seq=0),
        MessageType.REUSE: Reuse(payload=PAYLOAD),
        MessageType.INFLATE: Inflate(payload=PAYLOAD),
        MessageType.DEFLATE: Deflate(payload=PAYLOAD),
        MessageType.TARGET: Target(pages=10),
        MessageType.HINT_START: HintStart(cmd_id=1),
        MessageType.HINT: Hint(cmd_id=1, payload=PAYLOAD),
        MessageType.HINT_DONE: HintDone(cmd_id=1),
        MessageType.HINT_STOP: HintStop(cmd_id=1),
        MessageType.STATS: Stats(values={0: 1, 99: 2}),
        MessageType.PING: Ping(nonce=1),
        MessageType.ERROR: Error(code="internal", detail="x"),
        MessageType.PONG: Pong(nonce=1),
        MessageType.BYE: Bye(reason="bye"),
    }[kind]


def wire(kind: MessageType, seq: int = 0) -> bytes:
    obj = sample(kind).to_wire()
    if kind in (MessageType.REPORT, MessageType.REUSE, MessageType.INFLATE, MessageType.DEFLATE,
                MessageType.HINT):
        obj[1] = seq
    return msgpack.packb(obj, use_bin_type=True)


def guest_in(state: State) -> GuestConnection:
    guest = GuestConnection("g1", 1 << 16, features=("ranges52", "hinting", "stats"))
    if state is State.IDLE:
        return guest
    guest.hello()
    if state is State.HANDSHAKE:
        return guest
    guest.receive_data(wire(MessageType.WELCOME))
    assert isinstance(guest.next_event(), Welcome)
    if state is State.READY:
        return guest
    guest.receive_data(wire(MessageType.BYE))
    assert isinstance(guest.next_event(), Bye)
    assert guest.state is State.CLOSED
    return guest


def host_in(state: State) -> HostConnection:
    host = HostConnection()
    if state is State.IDLE:
        return host
    host.receive_data(wire(MessageType.HELLO))
    assert isinstance(host.next_event(), Hello)
    if state is State.HANDSHAKE:
        return host
    host.send(sample(MessageType.WELCOME))
    if state is State.READY:
        return host
    host.receive_data(wire(MessageType.BYE))
    assert isinstance(host.next_event(), Bye)
    assert host.state is State.CLOSED
    return host


def make(role: Role, state: State):
    return guest_in(state) if role is Role.GUEST else host_in(state)


def assert_dead(connection, error: ProtocolError) -> None:
    assert error.code in CODES
    assert connection.state is State.CLOSED
    with pytest.raises(RemoteProtocolError) as again:
        connection.next_event()
    assert again.value is error


SWEEP = [(role, state, kind) for role in Role for state in State for kind in MessageType]


@pytest.mark.parametrize("role,state,kind", SWEEP, ids=lambda v: getattr(v, "name", v))
def test_receive_every_type_in_every_state(role, state, kind):
    connection = make(role, state)
    move = RECEIVE_RULES[(role, state)].get(int(kind))
    allowed = None if move is None else move.after
    connection.receive_data(wire(kind))
    try:
        event = connection.next_event()
    except RemoteProtocolError as error:
        assert_dead(connection, error)
        if allowed is None:
            assert error.code == "bad-state"
        else:  # allowed by the table, refused by a role check: only these can say no
            assert (kind, error.code) in {(MessageType.ACK, "bad-ack")}
        return
    assert allowed is not None, f"{role} in {state} accepted {kind.name}"
    assert event.TYPE is kind
    assert connection.state is allowed


@pytest.mark.parametrize("role,state,kind", SWEEP, ids=lambda v: getattr(v, "name", v))
def test_send_every_type_in_every_state(role, state, kind):
    connection = make(role, state)
    move = SEND_RULES[(role, state)].get(int(kind))
    allowed = None if move is None else move.after
    try:
        data = connection.send(sample(kind))
    except LocalProtocolError as error:
        assert error.code in CODES
        owed = role is Role.HOST and kind is MessageType.ACK and connection.goodbye == "received"
        if allowed is None and not owed:
            assert error.code == "bad-state"
        else:  # an ACK the table allows, or one owed after the guest's BYE: no such seq here
            assert (kind, error.code) in {(MessageType.ACK, "bad-ack")}
        assert connection.state is state  # a refused send changes nothing
        return
    assert allowed is not None, f"{role} in {state} sent {kind.name}"
    assert isinstance(data, bytes) and data
    assert connection.state is allowed


def test_acks_owed_after_the_guests_bye_go_out_and_the_guest_takes_them():
    """Every batch the host applied is acked, also when the BYE came in the same read."""
    host, guest = HostConnection(), GuestConnection("g1", 1 << 16)
    host.receive_data(guest.hello())
    assert isinstance(host.next_event(), Hello)
    guest.receive_data(host.send(Welcome(window=4, max_ranges=64, features=("ranges52",))))
    assert isinstance(guest.next_event(), Welcome)
    host.receive_data(guest.send(Report(payload=PAYLOAD)) + guest.send(Bye("done")))
    assert host.next_event().TYPE is MessageType.REPORT and isinstance(host.next_event(), Bye)
    assert host.state is State.CLOSED and host.goodbye == "received" and guest.goodbye == "sent"
    with pytest.raises(LocalProtocolError, match="bad-ack"):
        host.send(Ack(seq=1))  # only a seq still in flight
    with pytest.raises(LocalProtocolError, match="bad-state"):
        host.send(Ping(nonce=1))  # nothing but the owed ACKs
    guest.receive_data(host.send(Ack(seq=0)))
    assert guest.next_event() == Ack(seq=0) and guest.window.in_flight == 0
    guest.receive_data(msgpack.packb([14, 1]))
    with pytest.raises(RemoteProtocolError, match="bad-state"):
        guest.next_event()


def test_a_host_that_said_bye_owes_nothing_more():
    host = HostConnection()
    host.receive_data(GuestConnection("g1", 1 << 16).hello())
    host.next_event()
    host.send(Bye("shutting down"))
    with pytest.raises(LocalProtocolError, match="bad-state"):
        host.send(Ack(seq=0))


def test_tables_cover_every_role_and_state():
    for table in (RECEIVE_RULES, SEND_RULES):
        assert set(table) == {(role, state) for role in Role for state in State}
        for (_role, state), moves in table.items():
            if state is State.CLOSED:
                assert moves == {}
            else:
                assert moves[int(MessageType.BYE)].after is State.CLOSED
                assert moves[int(MessageType.ERROR)].after is State.CLOSED


def test_each_direction_owns_its_messages():
    guest_ready = RECEIVE_RULES[(Role.HOST, State.READY)]
    host_ready = RECEIVE_RULES[(Role.GUEST, State.READY)]
    shared_kinds = {int(MessageType.PING), int(MessageType.PONG), int(MessageType.BYE), int(MessageType.ERROR)}
    assert set(guest_ready) & set(host_ready) == shared_kinds


# -- Hypothesis state machines ---------------------------------------------------------

STATEFUL = settings(max_examples=150, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

kinds = st.sampled_from(list(MessageType))
seqs = st.integers(0, 6)
payloads = st.sampled_from([PAYLOAD, b"", b"\x00" * 7, b"\x00" * 8, encode_ranges(range(70), [1] * 70)])


def batch_bytes(kind: MessageType, seq: int, payload: bytes) -> bytes:
    obj = sample(kind).to_wire()
    if kind in (MessageType.REPORT, MessageType.REUSE, MessageType.INFLATE, MessageType.DEFLATE):
        obj[1], obj[2] = seq, payload
    elif kind is MessageType.HINT:
        obj[1], obj[3] = seq, payload
    return msgpack.packb(obj, use_bin_type=True)


def _hello_bytes(version=1, guest="g1", page_size=4096, pages=1 << 20, features=("ranges52", "hinting", "stats", "unknown")):
    body = {"version": version, "guest": guest, "page_size": page_size, "pages": pages, "features": list(features)}
    return msgpack.packb([1, body])


def _welcome_bytes(version=1, window=2, features=("ranges52", "hinting", "stats")):
    return msgpack.packb([2, {"version": version, "window": window, "max_ranges": 8, "features": list(features)}])


garbage = st.one_of(st.binary(max_size=24), kinds.map(wire), st.just(b""))
HOST_HOSTILE = st.one_of(
    garbage,
    st.builds(_hello_bytes, version=st.sampled_from([1, 2]), guest=st.sampled_from(["g1", "../x"]),
              page_size=st.sampled_from([4096, 8192]), pages=st.sampled_from([1, 0])),
    st.builds(batch_bytes, st.sampled_from([MessageType.REPORT, MessageType.HINT]), seqs, payloads),
)
GUEST_HOSTILE = st.one_of(
    garbage,
    st.builds(_welcome_bytes, version=st.sampled_from([1, 3]), window=st.sampled_from([1, 0]),
              features=st.sampled_from([(), ("pfn32",)])),
    st.builds(lambda seq: msgpack.packb([4, seq, 0]), seqs),
)


class _Machine(RuleBasedStateMachine):
    """Shared machinery. Protocol-following rules only fire where the protocol allows
    them, one ``misbehave`` rule sends something hostile at any time, and a dead or closed
    connection is replaced by a fresh one, so every run carries several sessions that get
    far enough to exchange batches (test_machines_reach_ready checks that they do)."""

    role: Role
    reached: set[str] = set()  # across all runs: which interesting events happened

    def __init__(self) -> None:
        super().__init__()
        self.connection = self.fresh()
        self.dead: RemoteProtocolError | None = None
        self.closed = False

    def fresh(self):
        raise NotImplementedError

    @property
    def open(self) -> bool:
        return self.dead is None and not self.closed

    def feed(self, data: bytes) -> None:
        connection = self.connection
        if self.dead is not None:
            connection.receive_data(data)
            with pytest.raises(RemoteProtocolError):
                connection.next_event()
            return
        connection.receive_data(data)
        while True:
            before = connection.state
            try:
                event = connection.next_event()
            except RemoteProtocolError as error:
                assert_dead(connection, error)
                self.dead = error
                self.reached.add(f"{self.role.value}:error:{error.code}")
                return
            if event is NEED_DATA:
                return
            if event is CONNECTION_CLOSED:
                assert connection.state is State.CLOSED
                self.closed = True
                return
            expected = RECEIVE_RULES[(self.role, before)][event.TYPE].after
            assert expected is connection.state
            if expected is State.CLOSED:
                self.closed = True
            self.reached.add(f"{self.role.value}:{event.TYPE.name}")
            if getattr(event, "pfns", None) is not None:
                self.reached.add(f"{self.role.value}:batch")
            self.react(event)

    def react(self, event) -> None:
        """What the daemon would do in response."""

    @precondition(lambda self: not self.open)
    @rule()
    def reconnect(self):
        self.connection = self.fresh()
        self.dead = None
        self.closed = False

    @invariant()
    def window_is_never_exceeded(self):
        window = self.connection.window
        if window is not None:
            assert window.in_flight <= window.size

    @invariant()
    def closed_means_closed(self):
        if not self.open:
            assert self.connection.state is State.CLOSED


def _ready(self) -> bool:
    return self.open and self.connection.state is State.READY


class HostUnderFire(_Machine):
    """A host fed whatever a hostile or buggy guest might send."""

    role = Role.HOST

    def fresh(self):
        return HostConnection(max_message_bytes=4096)

    def react(self, event) -> None:
        if isinstance(event, Hello):
            accepted = negotiate_features(event.features, ("ranges52", "hinting", "stats"))
            self.connection.send(Welcome(window=3, max_ranges=64, features=accepted))
            assert self.connection.state is State.READY
        elif event.TYPE in (3, 5, 6, 7, 10):
            assert event.seq == self.connection.expected_seq - 1
            assert event.pfns.size == event.counts.size <= self.connection.max_ranges

    @rule(data=HOST_HOSTILE)
    def misbehave(self, data):
        self.feed(data)

    @precondition(lambda self: self.open and self.connection.state is State.IDLE)
    @rule()
    def hello(self):
        self.feed(_hello_bytes())

    @precondition(_ready)
    @rule(kind=st.sampled_from([MessageType.REPORT, MessageType.REUSE, MessageType.INFLATE,
                                MessageType.DEFLATE, MessageType.HINT]))
    def batch(self, kind):
        self.feed(batch_bytes(kind, self.connection.expected_seq, PAYLOAD))

    @precondition(_ready)
    @rule(kind=st.sampled_from([MessageType.STATS, MessageType.PING, MessageType.PONG, MessageType.HINT_DONE]))
    def chatter(self, kind):
        self.feed(wire(kind))

    @precondition(lambda self: _ready(self) and self.connection.window.in_flight)
    @rule()
    def ack_oldest(self):
        self.connection.send(Ack(seq=self.connection.window.oldest))


class GuestUnderFire(_Machine):
    """A guest fed whatever a hostile or buggy host might send, while it sends batches."""

    role = Role.GUEST

    def fresh(self):
        return GuestConnection("g1", 1 << 16, features=("ranges52", "hinting", "stats"), max_message_bytes=4096)

    @rule(data=GUEST_HOSTILE)
    def misbehave(self, data):
        self.feed(data)

    @precondition(lambda self: self.open and self.connection.state is State.IDLE)
    @rule()
    def hello(self):
        self.connection.hello()

    @precondition(lambda self: self.open and self.connection.state is State.HANDSHAKE)
    @rule()
    def welcome(self):
        self.feed(_welcome_bytes())

    @precondition(lambda self: _ready(self) and self.connection.window.in_flight)
    @rule(rejected=st.integers(0, 10))
    def ack_oldest(self, rejected):
        self.feed(msgpack.packb([4, self.connection.window.oldest, rejected]))

    @precondition(_ready)
    @rule(kind=st.sampled_from([MessageType.TARGET, MessageType.HINT_START, MessageType.HINT_STOP,
                                MessageType.PING, MessageType.PONG]))
    def chatter(self, kind):
        self.feed(wire(kind))

    @precondition(_ready)  # sending in other states is swept by test_send_every_type_in_every_state
    @rule(kind=st.sampled_from([Report, Reuse, Inflate, Deflate]), ranges=st.integers(1, 12))
    def send_batch(self, kind, ranges):
        guest = self.connection
        before = guest.next_seq
        try:
            guest.send(kind(payload=encode_ranges(np.arange(ranges), np.ones(ranges, dtype=np.uint64))))
        except LocalProtocolError as error:
            assert error.code in {"bad-state", "window-overrun", "too-many-ranges"}
            assert guest.next_seq == before
        else:
            assert guest.next_seq == before + 1
            self.reached.add("guest:sent-batch")


TestHostUnderFire = HostUnderFire.TestCase
TestHostUnderFire.settings = STATEFUL
TestGuestUnderFire = GuestUnderFire.TestCase
TestGuestUnderFire.settings = STATEFUL


# -- corrupted sessions ----------------------------------------------------------------


def guest_stream() -> bytes:
    guest = GuestConnection("g1", 1 << 20, features=("ranges52", "stats"))
    parts = [guest.hello()]
    guest.receive_data(msgpack.packb([2, {"version": 1, "window": 8, "max_ranges": 64, "features": ["ranges52", "stats"]}]))
    guest.next_event()
    for seq in range(4):
        parts.append(guest.send(Report(payload=encode_ranges([seq * 10_000, 7], [seq + 1, 4096 * (seq + 1)]))))
        parts.append(guest.send(Stats(values={seq: seq})))
        guest.receive_data(msgpack.packb([4, seq, 0]))
        guest.next_event()
    parts.append(guest.send(Bye(reason="done")))
    return b"".join(parts)


STREAM = guest_stream()


def run_host(data: bytes, chunk: int) -> None:
    host = HostConnection(max_message_bytes=4096)
    try:
        for start in range(0, len(data), chunk):
            host.receive_data(data[start : start + chunk])
            for event in host.events():
                if isinstance(event, Hello):  # a corrupted HELLO may offer other features
                    accepted = negotiate_features(event.features, ("ranges52", "pfn32", "stats"))
                    host.send(Welcome(window=8, max_ranges=64, features=accepted))
                elif getattr(event, "pfns", None) is not None:
                    host.send(Ack(seq=event.seq))
        host.receive_data(b"")
        list(host.events())
    except RemoteProtocolError as error:
        assert_dead(host, error)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(STREAM) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(STREAM)), st.sampled_from([1, 7, 64, 4096]))
def test_corrupted_session_ends_in_a_protocol_error_or_valid_events(flips, cut, chunk):
    data = bytearray(STREAM)
    for position, value in flips:
        data[position] = value
    run_host(bytes(data[:cut]), chunk)


def test_uncorrupted_session_runs_clean():
    host = HostConnection()
    host.receive_data(STREAM)
    seen = []
    for event in host.events():
        seen.append(event.TYPE.name)
        if isinstance(event, Hello):
            host.send(Welcome(window=8, max_ranges=64, features=("ranges52", "stats")))
        elif event.TYPE is MessageType.REPORT:
            host.send(Ack(seq=event.seq))
    assert seen == ["HELLO"] + ["REPORT", "STATS"] * 4 + ["BYE"]
    assert host.state is State.CLOSED


def test_machines_reach_ready():
    """The machines above are only worth something if sessions get to carry batches."""
    for machine in (HostUnderFire, GuestUnderFire):
        machine.reached = set()
        run_state_machine_as_test(machine, settings=settings(STATEFUL, max_examples=300, derandomize=True,
                                                             database=None))
    reached = HostUnderFire.reached | GuestUnderFire.reached
    for needed in ("host:HELLO", "host:batch", "host:STATS", "host:error:window-overrun", "host:error:bad-seq",
                   "guest:WELCOME", "guest:ACK", "guest:TARGET", "guest:sent-batch", "guest:error:bad-ack"):
        assert needed in reached, (needed, sorted(reached))

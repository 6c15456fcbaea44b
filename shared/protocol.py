"""Sans-IO guest and host connections, in the style of h11 and h2.

``receive_data(bytes)`` walks the msgpack headers (``framing.Framer``: sizes, depth and
object counts bounded before anything is built) and splits the stream into objects;
``next_event()`` validates one message and moves the state machine; ``send(message)``
checks that this side may send it now and returns the bytes to write. The caller owns
the socket, the clock and the event loop.

The state machine is data. :data:`RECEIVE_RULES` and :data:`SEND_RULES` map ``(role,
state)`` to ``{message type: Move}``, and a :class:`Move` carries everything that message
needs in that state, as h2's transition table does: the next state, the feature it
requires, and the one function that parses (receive) or checks and numbers it (send). There
is one set of rules: every message, batches included, is looked up in the same tables and
checked by the same functions. Only the *reading* of a batch frame may differ: the host
takes a whole batch frame at a message boundary from its fixed header (the batch lane,
``HostConnection``: one decoder per message shape, no msgpack object, no message built) and
reads everything else through the framer and msgpack; both reach ``_accept_batch``, and
``ReceivedBatch`` is what the host gets either way. Anything not in the tables is a protocol
error — local when we try it, remote when the peer does — and a connection that saw a
remote error is dead: every later call raises the same error.

Receive checks run in this order (docs/PROTOCOL.md §5.1): framing limits; a non-empty array
with an integer type (``bad-shape``); a v1 type (``unknown-type``); allowed in this state
and direction (``bad-state``); its feature negotiated (``feature-not-negotiated``); element
count and fields (``bad-shape`` or the field's own code); then the session's rules (seq,
window, ranges). A message is built only once all of them passed, and never changes after.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, as_remote
from .framing import Framer
from .messages import (
    BATCH_KIND_CODES,
    BATCH_TYPES,
    MESSAGE_CLASSES,
    Ack,
    Batch,
    Error,
    Hello,
    Message,
    MessageType,
    ReceivedBatch,
    Welcome,
    check_arity,
    map_from_pairs,
    message_type,
    valid_guest_id,
)
from .ranges import MAX_INLINE_COUNT, decode_pfn32, decode_ranges
from .vocabulary import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HINTING,
    MAX_ARRAY_LEN,
    MAX_MAP_LEN,
    MAX_STR_BYTES,
    PAGE_SIZE,
    PFN32,
    PFN32_MAX_PER_MESSAGE,
    PROTOCOL_VERSION,
    RANGES52,
    STATS,
    U64_MAX,
)
from .window import FlowWindow, UnknownSequence, WindowFull

M = MessageType
ACK = int(M.ACK)
_new_batch = tuple.__new__  # a ReceivedBatch from its values, without NamedTuple's Python __new__
#: The message types a host acknowledges (their kind names: vocabulary.BATCH_KINDS).
BATCH_MESSAGES = frozenset({M.REPORT, M.REUSE, M.INFLATE, M.DEFLATE, M.HINT})
GUEST_SENDS = BATCH_MESSAGES | {M.HINT_DONE, M.STATS, M.PING, M.PONG}
HOST_SENDS = frozenset({M.ACK, M.TARGET, M.HINT_START, M.HINT_STOP, M.PING, M.PONG})
#: The messages that end a session, either way.
ENDING_MESSAGES = frozenset({M.BYE, M.ERROR})
#: Messages that exist only with a negotiated feature (the feature's whole vocabulary).
NEEDS_FEATURE = {M.HINT: HINTING, M.HINT_START: HINTING, M.HINT_DONE: HINTING, M.HINT_STOP: HINTING,
                 M.STATS: STATS}


class Role(Enum):
    GUEST = "guest"
    HOST = "host"


class State(Enum):
    IDLE = "idle"  # guest: HELLO not sent yet; host: waiting for HELLO
    HANDSHAKE = "handshake"  # guest: waiting for WELCOME; host: HELLO seen, WELCOME owed
    READY = "ready"
    CLOSED = "closed"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
CONNECTION_CLOSED = _Sentinel("CONNECTION_CLOSED")


@dataclass(frozen=True, slots=True)
class Move:
    """One table entry: what a message of ``cls`` does in one role and state.

    ``handle`` is the message's one parser (receive: ``(connection, wire list) ->
    message``) or its one emitter (send: ``(connection, message) -> wire list``), with the
    role's checks and bookkeeping bound in; ``feature`` is the negotiated feature the
    message needs, if any; ``after`` is the state once it has gone through.
    """

    after: State
    cls: type[Message]
    handle: Callable[[Any, Any], Any]
    feature: str | None = None


# -- handlers: each is the whole of one message's work in one role --------------------


def _parse(connection, obj: list) -> Message:
    cls = MESSAGE_CLASSES[obj[0]]
    check_arity(cls, obj)
    return cls.parse(obj)


def _emit(connection, message: Message) -> list:
    return message.to_wire()


def _host_receives_hello(host, obj: list) -> Message:
    return host._accept_hello(_parse(host, obj))


def _host_receives_batch(host, obj: list) -> ReceivedBatch:
    """A batch the framer and msgpack read: its fields checked by its class, then the
    session's rules — the same ``_accept_batch`` a batch read by the lane goes to."""
    cls = MESSAGE_CLASSES[obj[0]]
    check_arity(cls, obj)
    return host._accept_batch(obj[0], *cls.fields(obj))


def _host_sends_welcome(host, welcome: Welcome) -> list:
    return host._welcome_sent(welcome)


def _host_sends_ack(host, ack: Ack) -> list:
    return host._ack_sent(ack)


def _guest_receives_welcome(guest, obj: list) -> Message:
    return guest._accept_welcome(_parse(guest, obj))


def _guest_receives_ack(guest, obj: list) -> Message:
    return guest._accept_ack(_parse(guest, obj))


def _guest_sends_batch(guest, batch: Batch) -> list:
    return guest._batch_sent(batch)


_HANDLERS: dict[tuple[Role, str, MessageType], Callable] = {
    (Role.HOST, "receive", M.HELLO): _host_receives_hello,
    **{(Role.HOST, "receive", cls.TYPE): _host_receives_batch for cls in BATCH_TYPES},
    (Role.HOST, "send", M.WELCOME): _host_sends_welcome,
    (Role.HOST, "send", M.ACK): _host_sends_ack,
    (Role.GUEST, "receive", M.WELCOME): _guest_receives_welcome,
    (Role.GUEST, "receive", M.ACK): _guest_receives_ack,
    **{(Role.GUEST, "send", cls.TYPE): _guest_sends_batch for cls in BATCH_TYPES},
}


def _rules(direction: str, table: dict[tuple[Role, State], dict[MessageType, State]]):
    """Build the Move tables; BYE and ERROR are allowed in every open state and end it.

    Keys become plain ints: the tables are consulted for every message, and hashing an
    IntEnum member runs Python code while hashing an int does not.
    """
    default = _parse if direction == "receive" else _emit
    rules = {}
    for (role, state), moves in table.items():
        if state is not State.CLOSED:
            moves = {**moves, **dict.fromkeys(ENDING_MESSAGES, State.CLOSED)}
        rules[(role, state)] = {
            int(kind): Move(after, MESSAGE_CLASSES[kind], _HANDLERS.get((role, direction, kind), default),
                            NEEDS_FEATURE.get(kind))
            for kind, after in moves.items()
        }
    return rules


SEND_RULES = _rules("send", {
    (Role.GUEST, State.IDLE): {M.HELLO: State.HANDSHAKE},
    (Role.GUEST, State.HANDSHAKE): {},
    (Role.GUEST, State.READY): dict.fromkeys(GUEST_SENDS, State.READY),
    (Role.GUEST, State.CLOSED): {},
    (Role.HOST, State.IDLE): {},
    (Role.HOST, State.HANDSHAKE): {M.WELCOME: State.READY},
    (Role.HOST, State.READY): dict.fromkeys(HOST_SENDS, State.READY),
    (Role.HOST, State.CLOSED): {},
})

RECEIVE_RULES = _rules("receive", {
    (Role.GUEST, State.IDLE): {},
    (Role.GUEST, State.HANDSHAKE): {M.WELCOME: State.READY},
    (Role.GUEST, State.READY): dict.fromkeys(HOST_SENDS, State.READY),
    (Role.GUEST, State.CLOSED): {},
    (Role.HOST, State.IDLE): {M.HELLO: State.HANDSHAKE},
    (Role.HOST, State.HANDSHAKE): {},
    (Role.HOST, State.READY): dict.fromkeys(GUEST_SENDS, State.READY),
    (Role.HOST, State.CLOSED): {},
})

#: What a dead connection may still send: the ERROR that reports why it died.
_LAST_WORDS = Move(State.CLOSED, Error, _emit)
#: The ACKs a host still owes after the guest's BYE or ERROR closed the session: every batch
#: the host applied is acked (docs/PROTOCOL.md §7.1), so a batch read in the same chunk as
#: the BYE is acked after it; the window still holds its seq, so nothing else can follow.
_OWED_ACK = Move(State.CLOSED, Ack, _host_sends_ack)
#: ... and a guest that said BYE or ERROR accepts them (and only them).
_LATE_ACK = Move(State.CLOSED, Ack, _guest_receives_ack)


def negotiate_features(offered, supported) -> tuple[str, ...]:
    """Features both sides know, in the guest's order; unknown names are ignored (virtio)."""
    known = set(supported)
    accepted = []
    for name in offered:
        if name in known and name not in accepted:
            accepted.append(name)
    return tuple(accepted)


class Connection:
    """What the guest and host connections share: framing, limits, the state machine."""

    role: Role

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 64:
            raise ValueError("max_message_bytes must be at least 64")
        self.max_message_bytes = max_message_bytes
        # The framer sees every byte first and enforces every structural limit, so the
        # unpacker only ever holds bounded, already-checked structure; its own limits are
        # the same numbers, as configuration of the C decoder.
        self._framer = Framer(max_message_bytes)
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            strict_map_key=False,
            object_pairs_hook=map_from_pairs,  # a key no dict can hold is bad-shape, not a crash
            max_buffer_size=2 * max_message_bytes,
            max_bin_len=max_message_bytes,
            max_str_len=MAX_STR_BYTES,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
        self._objects: deque[Any] = deque()
        self._pending_error: RemoteProtocolError | None = None
        self._dead: RemoteProtocolError | None = None
        self._eof = False
        self._goodbye = ""  # "sent" / "received": who ended the session with BYE or ERROR
        self._packer = msgpack.Packer(use_bin_type=True)
        self._lane = False  # batch frames read from their header (the host: HostConnection)
        self.state = State.IDLE
        self.features: tuple[str, ...] = ()
        self.window: FlowWindow | None = None
        self.max_ranges = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.messages_received = 0

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        if state is getattr(self, "_state", None):
            return  # READY -> READY on every batch: the tables need no new lookup
        self._state = state
        self._receive_moves = RECEIVE_RULES[(self.role, state)]
        self._send_moves = SEND_RULES[(self.role, state)]

    @property
    def goodbye(self) -> str:
        """Who ended the session with BYE or ERROR: "sent", "received", or "" (not ended so)."""
        return self._goodbye

    @property
    def features(self) -> tuple[str, ...]:
        return self._features

    @features.setter
    def features(self, features) -> None:
        self._features = tuple(features)
        self._pfn32 = PFN32 in self._features  # read for every batch: kept, not recomputed

    @property
    def encoding(self) -> str:
        return PFN32 if self._pfn32 else RANGES52

    # -- receiving ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        if self._dead is not None or self._pending_error is not None:
            return
        if not data:
            self._eof = True
            return
        self.bytes_received += len(data)
        if self._lane:
            self._receive_lane(data if data.__class__ is bytes else bytes(data))
            return
        step = self.max_message_bytes  # the unpacker holds at most one message plus one step
        view = memoryview(data) if len(data) > step else None
        for start in range(0, len(data), step):
            chunk = data if view is None else view[start : start + step]
            try:
                self._framer.scan(chunk)
            except RemoteProtocolError as error:
                # Decode what precedes the offending header: its whole messages are
                # delivered first, and a msgpack error earlier in the stream wins.
                self._unpack(chunk[: self._framer.error_at])
                self._pending_error = self._pending_error or error
                return
            self._unpack(chunk)
            if self._pending_error is not None:
                return

    def _receive_lane(self, data: bytes) -> None:
        """The batch lane: each whole batch frame at a message boundary is taken from its
        fixed header (``framing.batch_header``) as plain values — no msgpack object, no
        message — and anything else, one message at a time, goes through the framer and
        msgpack as before. So every byte is read by exactly one of them, in order, and a
        batch frame reaches ``next_event`` the same way whichever read it (the chunking
        tests in tests/shared/test_one_path.py hold the two to the same events and errors).
        """
        end = len(data)
        pos = 0
        limit = self.max_message_bytes
        framer = self._framer
        objects = self._objects
        view = memoryview(data)  # payloads and the framer's chunks are views: nothing copied
        while pos < end:
            header = framer.batch_at(data, pos, end)
            if header is not None:
                kind, seq, cmd_id, body, length = header
                stop = body + length
                # nats: the size is checked on the header, before any body is waited for;
                # a frame over the limit, or not all here yet, is the framer's to read
                if stop <= end and stop - pos <= limit:
                    objects.append((kind, seq, cmd_id, view[body:stop]))
                    pos = stop
                    continue
            chunk = view[pos:]
            try:
                framer.scan(chunk, one=True)
            except RemoteProtocolError as error:
                self._unpack(chunk[: framer.error_at])
                self._pending_error = self._pending_error or error
                return
            used = framer.consumed
            self._unpack(chunk[:used])
            if self._pending_error is not None:
                return
            pos += used

    def _unpack(self, chunk) -> None:
        """Feed framed bytes to msgpack and take the messages they complete."""
        if not chunk:
            return
        self._unpacker.feed(chunk)
        try:
            self._objects.extend(self._unpacker)
        except Exception as error:  # invalid UTF-8, unhashable map keys, ...
            self._pending_error = RemoteProtocolError(
                "bad-msgpack", f"{type(error).__name__}: {error}"[:200])

    def next_event(self):
        """The next validated message, ``NEED_DATA`` or ``CONNECTION_CLOSED``."""
        if self._dead is not None:
            raise self._dead
        if not self._objects:
            if self._pending_error is not None:
                self._die(self._pending_error)
            if self._eof:
                self.state = State.CLOSED
                return CONNECTION_CLOSED
            return NEED_DATA
        obj = self._objects.popleft()
        try:
            lane = obj.__class__ is tuple  # (type, seq, cmd_id, payload) read by the lane
            kind = obj[0] if lane else message_type(obj)
            move = self._receive_moves.get(kind)
            if move is None and kind == M.ACK and self._goodbye == "sent" and self.role is Role.GUEST:
                move = _LATE_ACK
            if move is None:
                raise RemoteProtocolError(
                    "bad-state", f"a {self.role.value} in state {self.state.value} cannot receive "
                                 f"{MessageType(obj[0]).name}")
            if move.feature is not None and move.feature not in self._features:
                raise RemoteProtocolError(
                    "feature-not-negotiated", f"{move.cls.TYPE.name} needs the {move.feature!r} feature")
            message = self._accept_batch(*obj) if lane else move.handle(self, obj)
        except ProtocolError as error:
            self._die(as_remote(error))
        if move.after is not self._state:  # READY -> READY, every batch: nothing to change
            if move.after is State.CLOSED and not self._goodbye:
                self._goodbye = "received"
            self.state = move.after
        self.messages_received += 1
        return message

    def events(self):
        """Yield messages until more data is needed (or the peer closed)."""
        while True:
            event = self.next_event()
            if event is NEED_DATA or event is CONNECTION_CLOSED:
                return
            yield event

    def _die(self, error: RemoteProtocolError):
        self._dead = error
        self.state = State.CLOSED
        self._objects.clear()
        raise error

    # -- sending --------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Check that we may send ``message`` now and return its bytes.

        Nothing changes unless every check passed: a refused send leaves the state, the
        window and the sequence numbers as they were, so it can be retried as is.
        """
        if self._dead is not None:
            if type(message) is not Error:
                raise LocalProtocolError("bad-state", "the connection is dead after a protocol error")
            move = _LAST_WORDS
        else:
            move = self._send_moves.get(message.WIRE_TYPE)
            if move is None and type(message) is Ack and self._goodbye == "received" and self.role is Role.HOST:
                move = _OWED_ACK
            if move is None:
                raise LocalProtocolError(
                    "bad-state", f"a {self.role.value} in state {self.state.value} cannot send {message.TYPE.name}")
            if move.feature is not None and move.feature not in self._features:
                raise LocalProtocolError(
                    "feature-not-negotiated", f"{message.TYPE.name} needs the {move.feature!r} feature")
        data = self._packer.pack(move.handle(self, message))
        if move.after is State.CLOSED and not self._goodbye:
            self._goodbye = "sent"
        self.state = move.after
        self.bytes_sent += len(data)
        return data

    def send_error(self, error: ProtocolError) -> bytes:
        """The ERROR message for ``error`` (allowed even on a dead connection)."""
        return self.send(Error(error.code, error.detail[:1000]))


class GuestConnection(Connection):
    """The guest (driver) side: sends HELLO and batches, receives WELCOME and ACKs.

    Batches are built without a sequence number; ``send`` numbers each one as it goes out
    (after every check passed) and records the number in ``last_seq``.
    """

    role = Role.GUEST

    def __init__(self, guest: str, pages: int, features=(RANGES52,), token: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(max_message_bytes)
        if not valid_guest_id(guest):
            raise LocalProtocolError("bad-guest-id", f"{guest!r} is not a valid guest id")
        self.guest = guest
        self.pages = pages
        self.offered = tuple(features)
        self.token = token
        self.next_seq = 0
        self.last_seq: int | None = None
        self.peer_max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.welcome: Welcome | None = None

    def hello(self) -> bytes:
        return self.send(Hello(guest=self.guest, pages=self.pages, features=self.offered,
                               version=PROTOCOL_VERSION, page_size=PAGE_SIZE, token=self.token))

    @property
    def can_send_batch(self) -> bool:
        return self.state is State.READY and not self.window.full

    def _batch_sent(self, batch: Batch) -> list:
        seq = self.next_seq
        if batch.seq is not None and batch.seq != seq:
            raise LocalProtocolError("bad-seq", f"seq {batch.seq} is not the next ({seq})")
        self._check_payload(batch.payload)
        try:
            self.window.consume(seq)
        except WindowFull as error:
            raise LocalProtocolError("window-overrun", str(error)) from None
        self.next_seq = seq + 1
        self.last_seq = seq
        return batch.to_wire(seq)

    def _check_payload(self, payload: bytes) -> None:
        """What the host would refuse about this payload, in the negotiated encoding."""
        if self._pfn32:
            if len(payload) % 4:
                raise LocalProtocolError("bad-payload", "a pfn32 payload is whole 32-bit PFNs")
            if len(payload) // 4 > PFN32_MAX_PER_MESSAGE:
                raise LocalProtocolError("too-many-ranges", "a legacy batch carries at most 256 PFNs")
            return
        if len(payload) % 8:
            raise LocalProtocolError("bad-payload", "a ranges52 payload is whole 64-bit words")
        if len(payload) // 8 > self.max_ranges and len(decode_ranges(payload)[0]) > self.max_ranges:
            raise LocalProtocolError("too-many-ranges", f"the host accepts at most {self.max_ranges} ranges")
        if len(payload) + 32 > self.peer_max_message_bytes:
            raise LocalProtocolError("too-large", f"the host accepts messages of {self.peer_max_message_bytes} bytes")

    def _accept_welcome(self, welcome: Welcome) -> Welcome:
        unknown = set(welcome.features) - set(self.offered)
        if unknown:
            raise RemoteProtocolError("bad-shape", f"host accepted features never offered: {sorted(unknown)}")
        self.features = welcome.features
        self.window = FlowWindow(welcome.window)
        self.max_ranges = welcome.max_ranges
        if welcome.max_message_bytes:
            self.peer_max_message_bytes = welcome.max_message_bytes
        self.welcome = welcome
        return welcome

    def _accept_ack(self, ack: Ack) -> Ack:
        try:
            self.window.release(ack.seq)
        except UnknownSequence as error:
            raise RemoteProtocolError("bad-ack", str(error)) from None
        return ack


class HostConnection(Connection):
    """The host (device) side: receives HELLO and batches, sends WELCOME and ACKs.

    A batch arrives as a :class:`ReceivedBatch` of plain values, decoded here with the
    negotiated encoding, so its ``pfns``/``counts`` arrays are already bounds-safe to
    index; batch frames are read by the lane (``_receive_lane``), and ``ack`` answers one
    with the ACK's bytes.
    """

    role = Role.HOST

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(max_message_bytes)
        self._lane = True
        self.hello: Hello | None = None
        self.expected_seq = 0

    def _accept_hello(self, hello: Hello) -> Hello:
        self.hello = hello  # every field was checked, in order, by Hello.parse
        return hello

    def _accept_batch(self, kind: int, seq: int, cmd_id: int | None, payload) -> ReceivedBatch:
        """The session's rules for a batch (seq, window, ranges), checked once, whichever
        path read it; returns it decoded."""
        if seq != self.expected_seq:
            raise RemoteProtocolError("bad-seq", f"expected seq {self.expected_seq}, got {seq}")
        try:  # its slot, as a device takes a ring entry (the connection dies if the payload is bad)
            self.window.consume(seq)
        except WindowFull as error:
            raise RemoteProtocolError("window-overrun", str(error)) from None
        if self._pfn32:
            pfns, counts = decode_pfn32(payload)
        else:
            if len(payload) // 8 > 2 * self.max_ranges:  # cheap bound before decoding
                raise RemoteProtocolError(
                    "too-many-ranges", f"{len(payload) // 8} words exceed max_ranges {self.max_ranges}")
            pfns, counts = decode_ranges(payload)
            if pfns.size > self.max_ranges:
                raise RemoteProtocolError("too-many-ranges", f"{pfns.size} ranges exceed max_ranges {self.max_ranges}")
        self.expected_seq = seq + 1
        return _new_batch(ReceivedBatch, (BATCH_KIND_CODES[kind], seq, pfns, counts, cmd_id))

    def ack(self, seq: int, rejected_pages: int = 0) -> bytes:
        """The bytes of ``send(Ack(seq, rejected_pages))``, without building the message: the
        same table entry allows it and the same ``_ack_wire`` releases the window and clamps.
        Anything but the plain case (the session over, an owed ACK, a dead connection) is
        left to ``send``, which decides it."""
        move = self._send_moves.get(ACK)
        if move is None or self._dead is not None or move.after is not self._state:
            return self.send(Ack(seq, rejected_pages))
        data = self._packer.pack(self._ack_wire(seq, rejected_pages))
        self.bytes_sent += len(data)
        return data

    def _welcome_sent(self, welcome: Welcome) -> list:
        unknown = set(welcome.features) - set(self.hello.features)
        if unknown:
            raise LocalProtocolError("bad-state", f"cannot accept features the guest never offered: {sorted(unknown)}")
        self.features = welcome.features
        self.window = FlowWindow(welcome.window)
        self.max_ranges = welcome.max_ranges
        return welcome.to_wire()

    def _ack_sent(self, ack: Ack) -> list:
        return self._ack_wire(ack.seq, ack.rejected_pages)

    def _ack_wire(self, seq: int, rejected_pages: int) -> list:
        """The one ACK rule: ``seq`` must be in flight (its slot is freed); rejected_pages
        saturates, as a batch of escaped ranges can reject more than 2**64-1 pages."""
        try:
            self.window.release(seq)
        except UnknownSequence as error:
            raise LocalProtocolError("bad-ack", str(error)) from None
        return [ACK, seq, rejected_pages if rejected_pages <= U64_MAX else U64_MAX]


__all__ = [
    "CONNECTION_CLOSED", "DEFAULT_MAX_MESSAGE_BYTES", "GuestConnection", "HostConnection",
    "MAX_INLINE_COUNT", "NEED_DATA", "PFN32", "RANGES52", "RECEIVE_RULES", "SEND_RULES", "Move",
    "ReceivedBatch", "Role",
    "State", "negotiate_features",
]

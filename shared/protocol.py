"""Sans-IO guest and host connections, in the style of h11.

``receive_data(bytes)`` only buffers and splits the stream into msgpack objects;
``next_event()`` validates one message at a time and moves the state machine;
``send(message)`` checks that this side may send it now and returns the bytes to
write. The caller owns the socket, the clock and the event loop.

The state machine is data: :data:`RECEIVE_RULES` and :data:`SEND_RULES` map
``(role, state, message type)`` to the next state. Anything not in the tables is a
protocol error — local when we try it, remote when the peer does — and a connection
that saw a remote error is dead: a msgpack ``Unpacker`` must not be reused after an
error, so every later call raises the same error again.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Any

import msgpack

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, as_remote
from .framing import HEAD_BYTES, announced_size
from .messages import (
    Ack,
    Batch,
    Deflate,
    Error,
    Hello,
    Hint,
    Inflate,
    Message,
    MessageType,
    Report,
    Reuse,
    Welcome,
    from_wire,
    valid_guest_id,
)
from .ranges import MAX_INLINE_COUNT, PFN32_MAX_PER_MESSAGE, decode_pfn32, decode_ranges
from .vocabulary import DEFAULT_MAX_MESSAGE_BYTES, PAGE_SIZE, PFN32, PROTOCOL_VERSION, RANGES52
from .window import FlowWindow, UnknownSequence, WindowFull

M = MessageType
BATCH_KINDS = frozenset({M.REPORT, M.REUSE, M.INFLATE, M.DEFLATE, M.HINT})
GUEST_SENDS = BATCH_KINDS | {M.HINT_DONE, M.STATS, M.PING, M.PONG}
HOST_SENDS = frozenset({M.ACK, M.TARGET, M.HINT_START, M.HINT_STOP, M.PING, M.PONG})
ENDINGS = frozenset({M.BYE, M.ERROR})


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


def _rules(table: dict[tuple[Role, State], dict[MessageType, State]]):
    """Add BYE and ERROR (allowed in every open state, always ending it) to a table.

    Keys become plain ints: the tables are consulted for every message, and hashing an
    IntEnum member runs Python code while hashing an int does not.
    """
    for (_role, state), moves in table.items():
        if state is not State.CLOSED:
            for ending in ENDINGS:
                moves[ending] = State.CLOSED
    return {key: {int(kind): after for kind, after in moves.items()} for key, moves in table.items()}


SEND_RULES = _rules({
    (Role.GUEST, State.IDLE): {M.HELLO: State.HANDSHAKE},
    (Role.GUEST, State.HANDSHAKE): {},
    (Role.GUEST, State.READY): {kind: State.READY for kind in GUEST_SENDS},
    (Role.GUEST, State.CLOSED): {},
    (Role.HOST, State.IDLE): {},
    (Role.HOST, State.HANDSHAKE): {M.WELCOME: State.READY},
    (Role.HOST, State.READY): {kind: State.READY for kind in HOST_SENDS},
    (Role.HOST, State.CLOSED): {},
})

RECEIVE_RULES = _rules({
    (Role.GUEST, State.IDLE): {},
    (Role.GUEST, State.HANDSHAKE): {M.WELCOME: State.READY},
    (Role.GUEST, State.READY): {kind: State.READY for kind in HOST_SENDS},
    (Role.GUEST, State.CLOSED): {},
    (Role.HOST, State.IDLE): {M.HELLO: State.HANDSHAKE},
    (Role.HOST, State.HANDSHAKE): {},
    (Role.HOST, State.READY): {kind: State.READY for kind in GUEST_SENDS},
    (Role.HOST, State.CLOSED): {},
})


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
        # msgpack checks container counts as their headers arrive, but bin/str lengths only
        # once the body is complete; _check_announced refuses an oversized announcement
        # from the header (shared/framing.py), so a frame claiming 200 MB costs us nothing.
        # The buffer may hold one incomplete message plus one fed chunk; receive_data feeds
        # at most max_message_bytes at a time.
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            strict_map_key=False,
            max_buffer_size=2 * max_message_bytes,
            max_bin_len=max_message_bytes,
            max_str_len=64 * 1024,
            max_array_len=1024,
            max_map_len=64,
            max_ext_len=0,
        )
        self._objects: deque[Any] = deque()
        self._pending_error: RemoteProtocolError | None = None
        self._dead: RemoteProtocolError | None = None
        self._eof = False
        # The first bytes of the incomplete message at stream offset _head_start, so an
        # announced length that cannot fit is refused before its body is buffered.
        self._fed = 0
        self._message_start = 0
        self._head = bytearray()
        self._head_start = -1
        self._packer = msgpack.Packer(use_bin_type=True)
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
            return  # READY -> READY on every batch: keep the hot path free of enum hashing
        self._state = state
        self._receive_moves = RECEIVE_RULES[(self.role, state)]
        self._send_moves = SEND_RULES[(self.role, state)]

    # -- receiving ------------------------------------------------------------------

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

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        if self._dead is not None or self._pending_error is not None:
            return
        if not data:
            self._eof = True
            return
        self.bytes_received += len(data)
        step = self.max_message_bytes
        view = memoryview(data) if len(data) > step else None
        for start in range(0, len(data), step):
            try:
                chunk = data if view is None else view[start : start + step]
                self._unpacker.feed(chunk)
                self._fed += len(chunk)
                self._split()
                self._check_announced(chunk)
            except RemoteProtocolError as error:
                self._pending_error = error
                return
            except msgpack.BufferFull:
                self._pending_error = RemoteProtocolError(
                    "too-large", f"an incomplete message exceeds {self.max_message_bytes} bytes")
                return

    def _split(self) -> None:
        unpacker = self._unpacker
        while True:
            try:
                obj = unpacker.unpack()
            except msgpack.OutOfData:
                return
            except ValueError as error:
                code = "too-large" if "exceeds max" in str(error) else "bad-msgpack"
                raise RemoteProtocolError(code, str(error)[:200]) from None
            except Exception as error:  # FormatError, StackError, unhashable keys, ...
                raise RemoteProtocolError("bad-msgpack", f"{type(error).__name__}: {error}"[:200]) from None
            # tell() also counts bytes of a partly parsed message, so sizes are measured
            # from where the previous message ended, not from before this unpack().
            end = unpacker.tell()
            size = end - self._message_start
            self._message_start = end
            if size > self.max_message_bytes:
                raise RemoteProtocolError(
                    "too-large", f"a {size}-byte message exceeds {self.max_message_bytes} bytes")
            self._objects.append(obj)

    def _check_announced(self, chunk) -> None:
        """Refuse an incomplete message whose headers announce more than the limit."""
        start = self._message_start
        if start >= self._fed:
            return  # nothing incomplete is buffered
        if self._fed - start > self.max_message_bytes:
            # The unpacker keeps a partly parsed message as objects, not buffered bytes,
            # so max_buffer_size alone does not bound a message that trickles in.
            raise RemoteProtocolError(
                "too-large", f"an incomplete message exceeds {self.max_message_bytes} bytes")
        if start != self._head_start:
            self._head_start = start
            self._head.clear()
        have = len(self._head)
        if have >= HEAD_BYTES:
            return
        offset = start + have - (self._fed - len(chunk))  # where the head continues in chunk
        if offset < 0:
            return
        self._head += chunk[offset : offset + HEAD_BYTES - have]
        size = announced_size(self._head)
        if size > self.max_message_bytes:
            raise RemoteProtocolError(
                "too-large", f"a message announcing at least {size} bytes exceeds {self.max_message_bytes}")

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
            message = from_wire(obj)
            next_state = self._receive_moves.get(obj[0])
            if next_state is None:
                raise RemoteProtocolError(
                    "bad-state",
                    f"a {self.role.value} in state {self.state.value} cannot receive {message.TYPE.name}")
            self._on_receive(message)
        except ProtocolError as error:
            self._die(as_remote(error))
        self.state = next_state
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

    def _on_receive(self, message: Message) -> None:
        """Role-specific checks and bookkeeping for a message that the table allowed."""

    # -- sending --------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Check that we may send ``message`` now and return its bytes."""
        if self._dead is not None and message.WIRE_TYPE != M.ERROR:
            raise LocalProtocolError("bad-state", "the connection is dead after a protocol error")
        next_state = self._send_moves.get(message.WIRE_TYPE)
        if next_state is None and not (message.WIRE_TYPE == M.ERROR and self._dead is not None):
            raise LocalProtocolError(
                "bad-state", f"a {self.role.value} in state {self.state.value} cannot send {message.TYPE.name}")
        self._on_send(message)
        data = self._packer.pack(message.to_wire())
        self.state = State.CLOSED if next_state is None else next_state
        self.bytes_sent += len(data)
        return data

    def send_error(self, error: ProtocolError) -> bytes:
        """The ERROR message for ``error`` (allowed even on a dead connection)."""
        return self.send(Error(error.code, error.detail[:1000]))

    def _on_send(self, message: Message) -> None:
        """Role-specific checks and bookkeeping before ``message`` goes out."""


class GuestConnection(Connection):
    """The guest (driver) side: sends HELLO and batches, receives WELCOME and ACKs."""

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
        self.peer_max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.welcome: Welcome | None = None

    def hello(self) -> bytes:
        return self.send(Hello(guest=self.guest, pages=self.pages, features=self.offered,
                               version=PROTOCOL_VERSION, page_size=PAGE_SIZE, token=self.token))

    @property
    def can_send_batch(self) -> bool:
        return self.state is State.READY and not self.window.full

    def send(self, message: Message) -> bytes:
        """As ``Connection.send``, with a short path for batches once READY."""
        if type(message) in _SHORT_PATH_SENDS and self._state is State.READY and self._dead is None:
            self._on_send(message)  # seq, size and window checks, exactly as the general path
            data = self._packer.pack(message.to_wire())
            self.bytes_sent += len(data)
            return data
        return super().send(message)

    def next_event(self):
        """As ``Connection.next_event``, with a short path for a well-formed ACK of a batch in flight."""
        objects = self._objects
        if objects and self._state is State.READY and self._dead is None:
            obj = objects[0]
            if type(obj) is list and len(obj) == 3 and obj[0] == ACK_TYPE and type(obj[0]) is int:
                seq = obj[1]
                rejected = obj[2]
                if (type(seq) is int and type(rejected) is int and 0 <= rejected <= U64_MAX
                        and seq in self.window):
                    objects.popleft()
                    self.window.release(seq)
                    self.messages_received += 1
                    return Ack(seq, rejected)
        return super().next_event()

    def _on_send(self, message: Message) -> None:
        if isinstance(message, Batch):
            if message.seq is None:
                message.seq = self.next_seq
            elif message.seq != self.next_seq:
                raise LocalProtocolError("bad-seq", f"seq {message.seq} is not the next ({self.next_seq})")
            self._check_batch_size(message.payload)
            try:
                self.window.consume(message.seq)
            except WindowFull as error:
                raise LocalProtocolError("window-overrun", str(error)) from None
            self.next_seq += 1

    def _check_batch_size(self, payload: bytes) -> None:
        if self._pfn32:
            if len(payload) // 4 > PFN32_MAX_PER_MESSAGE:
                raise LocalProtocolError("too-many-ranges", "a legacy batch carries at most 256 PFNs")
            return
        words = len(payload) // 8
        if words > self.max_ranges and len(decode_ranges(payload)[0]) > self.max_ranges:
            raise LocalProtocolError("too-many-ranges", f"the host accepts at most {self.max_ranges} ranges")
        if len(payload) + 32 > self.peer_max_message_bytes:
            raise LocalProtocolError("too-large", f"the host accepts messages of {self.peer_max_message_bytes} bytes")

    def _on_receive(self, message: Message) -> None:
        if isinstance(message, Welcome):
            if message.version != PROTOCOL_VERSION:
                raise RemoteProtocolError("bad-version", f"host speaks version {message.version}")
            unknown = set(message.features) - set(self.offered)
            if unknown:
                raise RemoteProtocolError("bad-shape", f"host accepted features never offered: {sorted(unknown)}")
            self.features = message.features
            self.window = FlowWindow(message.window)
            self.max_ranges = message.max_ranges
            if message.max_message_bytes:
                self.peer_max_message_bytes = message.max_message_bytes
            self.welcome = message
        elif isinstance(message, Ack):
            try:
                self.window.release(message.seq)
            except UnknownSequence as error:
                raise RemoteProtocolError("bad-ack", str(error)) from None


class HostConnection(Connection):
    """The host (device) side: receives HELLO and batches, sends WELCOME and ACKs.

    Every batch is decoded here with the negotiated encoding, so the daemon receives
    messages whose ``pfns``/``counts`` arrays are already bounds-safe to index.
    """

    role = Role.HOST

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(max_message_bytes)
        self.hello: Hello | None = None
        self.expected_seq = 0

    def next_event(self):
        """As ``Connection.next_event``, with a short path for the common batch.

        A well-formed REPORT/REUSE/INFLATE/DEFLATE with the expected seq and room in the
        window is what a READY host sees almost every time; it is recognised with a few
        exact type checks and built directly. Anything else — a wrong type, seq, shape or
        a full window — takes the general path, which raises the precise error.
        """
        objects = self._objects
        if objects and self._state is State.READY and self._dead is None:
            obj = objects[0]
            if type(obj) is list and len(obj) == 3 and type(obj[0]) is int:
                cls = _SHORT_PATH_BATCHES.get(obj[0])
                seq = obj[1]
                payload = obj[2]
                if (cls is not None and type(seq) is int and seq == self.expected_seq
                        and type(payload) is bytes and not self.window.full):
                    objects.popleft()
                    batch = cls(payload, seq)
                    try:
                        self._decode(batch)
                    except ProtocolError as error:
                        self._die(as_remote(error))
                    self.window.consume(seq)
                    self.expected_seq = seq + 1
                    self.messages_received += 1
                    return batch
        return super().next_event()

    def send_ack(self, ack: Ack) -> bytes:
        """``send(ack)`` without the generic dispatch: ACKs are the host's hot path."""
        if self._state is not State.READY or self._dead is not None:
            return self.send(ack)  # the general path raises the precise error
        try:
            self.window.release(ack.seq)
        except UnknownSequence as error:
            raise LocalProtocolError("bad-ack", str(error)) from None
        data = self._packer.pack([ACK_TYPE, ack.seq, ack.rejected_pages])
        self.bytes_sent += len(data)
        return data

    def _on_receive(self, message: Message) -> None:
        if isinstance(message, Hello):
            if message.version != PROTOCOL_VERSION:
                raise RemoteProtocolError("bad-version", f"this host speaks version {PROTOCOL_VERSION}, not {message.version}")
            if message.page_size != PAGE_SIZE:
                raise RemoteProtocolError("bad-page-size", f"page size must be {PAGE_SIZE}, not {message.page_size}")
            if not valid_guest_id(message.guest):
                raise RemoteProtocolError("bad-guest-id", f"{message.guest!r:.80} is not a valid guest id")
            if message.pages < 1:
                raise RemoteProtocolError("bad-shape", "a guest has at least one page")
            self.hello = message
        elif isinstance(message, Batch):
            if message.seq != self.expected_seq:
                raise RemoteProtocolError("bad-seq", f"expected seq {self.expected_seq}, got {message.seq}")
            try:
                self.window.consume(message.seq)
            except WindowFull as error:
                raise RemoteProtocolError("window-overrun", str(error)) from None
            self.expected_seq += 1
            self._decode(message)

    def _decode(self, batch: Batch) -> None:
        payload = batch.payload
        if self._pfn32:
            batch.pfns, batch.counts = decode_pfn32(payload)
            return
        if len(payload) // 8 > 2 * self.max_ranges:  # cheap bound before decoding
            raise RemoteProtocolError("too-many-ranges", f"{len(payload) // 8} words exceed max_ranges {self.max_ranges}")
        pfns, counts = decode_ranges(payload)
        if pfns.size > self.max_ranges:
            raise RemoteProtocolError("too-many-ranges", f"{pfns.size} ranges exceed max_ranges {self.max_ranges}")
        batch.pfns, batch.counts = pfns, counts

    def _on_send(self, message: Message) -> None:
        if isinstance(message, Welcome):
            unknown = set(message.features) - set(self.hello.features)
            if unknown:
                raise LocalProtocolError("bad-state", f"cannot accept features the guest never offered: {sorted(unknown)}")
            self.features = message.features
            self.window = FlowWindow(message.window)
            self.max_ranges = message.max_ranges
        elif isinstance(message, Ack):
            try:
                self.window.release(message.seq)
            except UnknownSequence as error:
                raise LocalProtocolError("bad-ack", str(error)) from None


_SHORT_PATH_BATCHES = {int(cls.TYPE): cls for cls in (Report, Reuse, Inflate, Deflate)}
_SHORT_PATH_SENDS = frozenset({Report, Reuse, Inflate, Deflate, Hint})
ACK_TYPE = int(M.ACK)
U64_MAX = (1 << 64) - 1

__all__ = [
    "CONNECTION_CLOSED", "DEFAULT_MAX_MESSAGE_BYTES", "GuestConnection", "HostConnection",
    "MAX_INLINE_COUNT", "NEED_DATA", "PFN32", "RANGES52", "Role", "State", "negotiate_features",
]

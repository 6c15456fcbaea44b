"""The v1 message set: one small typed class per message, to and from msgpack arrays.

Every message on the wire is a msgpack array whose first element is its type number
(docs/PROTOCOL.md §4). ``from_wire`` checks the shape and the type of every field and raises
RemoteProtocolError ``bad-shape`` (or a more specific code) — the parsers never trust
a length or a count the peer chose. Maps use string keys; unknown map keys are ignored
so that later minor versions can add optional fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import numpy as np

from . import vocabulary as v
from .errors import RemoteProtocolError
from .vocabulary import MAX_FEATURES, MAX_NAME_LEN, MAX_STATS, MAX_TEXT_LEN, U64_MAX

GUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class MessageType(IntEnum):
    HELLO = 1
    WELCOME = 2
    REPORT = 3
    ACK = 4
    REUSE = 5
    INFLATE = 6
    DEFLATE = 7
    TARGET = 8
    HINT_START = 9
    HINT = 10
    HINT_DONE = 11
    HINT_STOP = 12
    STATS = 13
    PING = 14
    ERROR = 15
    PONG = 16
    BYE = 17


# --- field checks -------------------------------------------------------------------


def _bad(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError("bad-shape", detail)


def describe(value: Any) -> str:
    """A short, depth-safe description of a peer's value for an error message.

    Only scalars are shown; a container is named by its type and length, never repr'd, so
    a deeply nested or huge value costs nothing to describe (and never hits the recursion
    limit).
    """
    if value is None or type(value) in (bool, int, float) or (type(value) is str and len(value) <= 64):
        text = repr(value)
        return text if len(text) <= 70 else f"{text[:67]}..."
    if type(value) in (str, bytes, list, dict):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _uint(value: Any, what: str, maximum: int = U64_MAX) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise _bad(f"{what} must be an integer in 0..{maximum}, got {describe(value)}")
    return value


def _text(value: Any, what: str, maximum: int = MAX_TEXT_LEN) -> str:
    if type(value) is not str or len(value) > maximum:
        raise _bad(f"{what} must be a string of at most {maximum} characters")
    return value


def _payload(value: Any, what: str = "payload") -> bytes:
    if type(value) is not bytes:
        raise _bad(f"{what} must be msgpack bin, got {type(value).__name__}")
    return value


def _features(value: Any) -> tuple[str, ...]:
    if type(value) is not list or len(value) > MAX_FEATURES:
        raise _bad(f"features must be a list of at most {MAX_FEATURES} strings")
    return tuple(_text(name, "feature name", MAX_NAME_LEN) for name in value)


def _map(value: Any, what: str) -> dict:
    if type(value) is not dict or not all(type(key) is str for key in value):
        raise _bad(f"{what} must be a map with string keys")
    return value


def _version(value: Any, speaker: str) -> int:
    version = _uint(value, "version")
    if version != v.PROTOCOL_VERSION:
        raise RemoteProtocolError("bad-version", f"{speaker} version {v.PROTOCOL_VERSION}, not {version}")
    return version


class OddMap(tuple):
    """A msgpack map with a key that is not a str, as the decoder hands it over: its pairs.

    Such a key can be an array or a map, which no dict can hold; building one raised
    TypeError inside the decoder (``bad-msgpack``) although the message is well-formed
    msgpack with a field of the wrong type (``bad-shape``, docs/PROTOCOL.md §2). Where a map
    is a message body, ``_map`` refuses it; as the value of an unknown key it is ignored.
    """

    __slots__ = ()


def map_from_pairs(pairs: list) -> dict | OddMap:
    """The decoder's ``object_pairs_hook``: a dict when every key is a str, else an OddMap."""
    for key, _value in pairs:
        if type(key) is not str:
            return OddMap(pairs)
    return dict(pairs)


def _require(fields: dict, key: str, what: str) -> Any:
    if key not in fields:
        raise _bad(f"{what} lacks required key {key!r}")
    return fields[key]


def valid_guest_id(name: str) -> bool:
    """Guest ids name RAM files and metric labels, so they are kept to a safe alphabet."""
    return type(name) is str and GUEST_ID.fullmatch(name) is not None


# --- message classes ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[MessageType]
    WIRE_TYPE: ClassVar[int]  # int(TYPE), cached: hashing and comparing a plain int is cheaper
    ARITY: ClassVar[int]

    def to_wire(self) -> list:
        raise NotImplementedError

    @classmethod
    def parse(cls, fields: list) -> Message:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Guest → host, first message: who I am, how much RAM, which features I offer."""

    TYPE: ClassVar = MessageType.HELLO
    ARITY: ClassVar = 2
    guest: str
    pages: int
    features: tuple[str, ...] = ()
    version: int = v.PROTOCOL_VERSION
    page_size: int = v.PAGE_SIZE
    token: str | None = None

    def to_wire(self) -> list:
        body = {
            "version": self.version,
            "guest": self.guest,
            "page_size": self.page_size,
            "pages": self.pages,
            "features": list(self.features),
        }
        if self.token is not None:
            body["token"] = self.token
        return [self.WIRE_TYPE, body]

    @classmethod
    def parse(cls, fields: list) -> Hello:
        """Each field checked whole — its type, then its own code — in the table's order
        (docs/PROTOCOL.md §5.1 step 6): a HELLO of version 2 is ``bad-version`` whatever
        follows it."""
        body = _map(fields[1], "HELLO body")
        version = _version(_require(body, "version", "HELLO"), "this host speaks")
        guest = _text(_require(body, "guest", "HELLO"), "guest", MAX_NAME_LEN)
        if not valid_guest_id(guest):
            raise RemoteProtocolError("bad-guest-id", f"{describe(guest)} is not a valid guest id")
        page_size = _uint(_require(body, "page_size", "HELLO"), "page_size")
        if page_size != v.PAGE_SIZE:
            raise RemoteProtocolError("bad-page-size", f"page size must be {v.PAGE_SIZE}, not {page_size}")
        pages = _uint(_require(body, "pages", "HELLO"), "pages", v.MAX_GUEST_PAGES)
        if pages < 1:
            raise _bad("a guest has at least one page")
        token = body.get("token")
        return cls(
            version=version,
            guest=guest,
            page_size=page_size,
            pages=pages,
            features=_features(_require(body, "features", "HELLO")),
            token=None if token is None else _text(token, "token", v.MAX_TOKEN_LEN),
        )


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Host → guest: the accepted features, the window and the batch limit."""

    TYPE: ClassVar = MessageType.WELCOME
    ARITY: ClassVar = 2
    window: int
    max_ranges: int
    features: tuple[str, ...] = ()
    version: int = v.PROTOCOL_VERSION
    max_message_bytes: int | None = None
    ram_file: str | None = None
    #: the guest's size in pages as the host counts it (its inventory, or the HELLO claim in
    #: open mode); ranges are checked against it. Optional on the wire for older hosts.
    pages: int | None = None

    def to_wire(self) -> list:
        body: dict[str, Any] = {
            "version": self.version,
            "window": self.window,
            "max_ranges": self.max_ranges,
            "features": list(self.features),
        }
        if self.max_message_bytes is not None:
            body["max_message_bytes"] = self.max_message_bytes
        if self.ram_file is not None:
            body["ram_file"] = self.ram_file
        if self.pages is not None:
            body["pages"] = self.pages
        return [self.WIRE_TYPE, body]

    @classmethod
    def parse(cls, fields: list) -> Welcome:
        body = _map(fields[1], "WELCOME body")
        version = _version(_require(body, "version", "WELCOME"), "the host speaks")
        window = _uint(_require(body, "window", "WELCOME"), "window", v.MAX_WINDOW)
        max_ranges = _uint(_require(body, "max_ranges", "WELCOME"), "max_ranges", v.MAX_RANGES_LIMIT)
        if window < 1 or max_ranges < 1:
            raise _bad("window and max_ranges must be at least 1")
        mmb = body.get("max_message_bytes")
        ram_file = body.get("ram_file")
        pages = body.get("pages")
        return cls(
            version=version,
            window=window,
            max_ranges=max_ranges,
            features=_features(_require(body, "features", "WELCOME")),
            max_message_bytes=None if mmb is None else _uint(mmb, "max_message_bytes"),
            ram_file=None if ram_file is None else _text(ram_file, "ram_file", v.MAX_PATH_LEN),
            pages=None if pages is None else _uint(pages, "pages", v.MAX_GUEST_PAGES),
        )


@dataclass(frozen=True, slots=True)
class Batch(Message):
    """A batch of ranges that the host must ACK: ``[type, seq, payload]``.

    What a guest sends: it builds one without ``seq`` (its connection numbers batches as
    they go out and says which number it used in ``last_seq``). The host receives a batch
    as a :class:`ReceivedBatch` of plain values instead (shared/protocol.py).
    """

    ARITY: ClassVar = 3
    KIND: ClassVar[str]  # one of vocabulary.BATCH_KINDS: the name in metrics, the tracker and logs
    payload: bytes
    seq: int | None = None

    def to_wire(self, seq: int | None = None) -> list:
        """The wire form, numbered ``seq`` (default: the message's own)."""
        return [self.WIRE_TYPE, self.seq if seq is None else seq, self.payload]

    @classmethod
    def fields(cls, obj: list) -> tuple[int, int | None, bytes]:
        """``(seq, cmd_id, payload)`` of a batch's wire list, each field checked (arity
        checked by the caller); ``cmd_id`` is None but for HINT."""
        return _uint(obj[1], "seq"), None, _payload(obj[2])

    @classmethod
    def parse(cls, fields: list) -> Batch:
        seq, _, payload = cls.fields(fields)
        return cls(payload, seq)


@dataclass(frozen=True, slots=True)
class Report(Batch):
    """Free page report; the guest keeps the pages isolated until the ACK."""

    TYPE: ClassVar = MessageType.REPORT
    KIND: ClassVar = v.REPORT


@dataclass(frozen=True, slots=True)
class Reuse(Batch):
    """The guest takes back pages it reported earlier (before it touches them)."""

    TYPE: ClassVar = MessageType.REUSE
    KIND: ClassVar = v.REUSE


@dataclass(frozen=True, slots=True)
class Inflate(Batch):
    """Pages the guest put into the balloon: the host may discard them."""

    TYPE: ClassVar = MessageType.INFLATE
    KIND: ClassVar = v.INFLATE


@dataclass(frozen=True, slots=True)
class Deflate(Batch):
    """Pages the guest takes out of the balloon; it frees them only after the ACK."""

    TYPE: ClassVar = MessageType.DEFLATE
    KIND: ClassVar = v.DEFLATE


@dataclass(frozen=True, slots=True)
class Hint(Batch):
    """Free page hints for migration command ``cmd_id``: ``[10, seq, cmd_id, payload]``."""

    TYPE: ClassVar = MessageType.HINT
    KIND: ClassVar = v.HINT
    ARITY: ClassVar = 4
    cmd_id: int = 0

    def to_wire(self, seq: int | None = None) -> list:
        return [self.WIRE_TYPE, self.seq if seq is None else seq, self.cmd_id, self.payload]

    @classmethod
    def fields(cls, obj: list) -> tuple[int, int | None, bytes]:
        return _uint(obj[1], "seq"), _uint(obj[2], "cmd_id", v.MAX_CMD_ID), _payload(obj[3])

    @classmethod
    def parse(cls, fields: list) -> Hint:
        seq, cmd_id, payload = cls.fields(fields)
        return cls(payload, seq, cmd_id=cmd_id)


class ReceivedBatch(NamedTuple):
    """A batch as the host receives it: plain values, decoded and checked against the
    session (seq, window, max_ranges) — what a device sees in a used virtqueue buffer, not
    a message object. Built by HostConnection whichever path read the frame."""

    kind: int  # its index in vocabulary.BATCH_KINDS (REPORT 0 .. HINT 4): counters and the tracker use it
    seq: int
    pfns: np.ndarray
    counts: np.ndarray
    cmd_id: int | None  # HINT's migration command, None for the others

    @property
    def TYPE(self) -> MessageType:  # noqa: N802 - the name every message has for its type
        """Its message type (REPORT ... HINT), as a message's class says it."""
        return BATCH_TYPES[self.kind].TYPE


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Host → guest: batch ``seq`` is applied; ``rejected_pages`` of it were skipped."""

    TYPE: ClassVar = MessageType.ACK
    ARITY: ClassVar = 3
    seq: int
    rejected_pages: int = 0

    def to_wire(self) -> list:
        return [self.WIRE_TYPE, self.seq, self.rejected_pages]

    @classmethod
    def parse(cls, fields: list) -> Ack:
        return cls(seq=_uint(fields[1], "seq"), rejected_pages=_uint(fields[2], "rejected_pages"))


@dataclass(frozen=True, slots=True)
class Target(Message):
    """Host → guest: hold this many pages in the balloon."""

    TYPE: ClassVar = MessageType.TARGET
    ARITY: ClassVar = 2
    pages: int

    def to_wire(self) -> list:
        return [self.WIRE_TYPE, self.pages]

    @classmethod
    def parse(cls, fields: list) -> Target:
        return cls(pages=_uint(fields[1], "pages", v.MAX_GUEST_PAGES))


@dataclass(frozen=True, slots=True)
class _Command(Message):
    ARITY: ClassVar = 2
    cmd_id: int

    def to_wire(self) -> list:
        return [self.WIRE_TYPE, self.cmd_id]

    @classmethod
    def parse(cls, fields: list) -> _Command:
        return cls(cmd_id=_uint(fields[1], "cmd_id", v.MAX_CMD_ID))


@dataclass(frozen=True, slots=True)
class HintStart(_Command):
    """Host → guest: start hinting free pages for migration command ``cmd_id``."""

    TYPE: ClassVar = MessageType.HINT_START


@dataclass(frozen=True, slots=True)
class HintDone(_Command):
    """Guest → host: every free block has been hinted for ``cmd_id``."""

    TYPE: ClassVar = MessageType.HINT_DONE


@dataclass(frozen=True, slots=True)
class HintStop(_Command):
    """Host → guest: command ``cmd_id`` is over; hints tagged with it are now stale."""

    TYPE: ClassVar = MessageType.HINT_STOP


@dataclass(frozen=True, slots=True)
class Stats(Message):
    """Guest → host: virtio-balloon stats as ``[[tag, value], ...]``.

    Tags 0..9 are in the virtio spec, 10..15 arrived with Linux 6.12; any other tag is
    kept as is and must be ignored by consumers, never rejected.
    """

    TYPE: ClassVar = MessageType.STATS
    ARITY: ClassVar = 2
    values: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))  # read-only, like the rest

    def to_wire(self) -> list:
        return [self.WIRE_TYPE, [[tag, value] for tag, value in self.values.items()]]

    @classmethod
    def parse(cls, fields: list) -> Stats:
        pairs = fields[1]
        if type(pairs) is not list or len(pairs) > MAX_STATS:
            raise _bad(f"STATS must carry a list of at most {MAX_STATS} [tag, value] pairs")
        values = {}
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise _bad("each STATS entry must be a [tag, value] pair")
            values[_uint(pair[0], "stat tag", v.MAX_STAT_TAG)] = _uint(pair[1], "stat value")
        return cls(values=values)


@dataclass(frozen=True, slots=True)
class _Nonce(Message):
    ARITY: ClassVar = 2
    nonce: int = 0

    def to_wire(self) -> list:
        return [self.WIRE_TYPE, self.nonce]

    @classmethod
    def parse(cls, fields: list) -> _Nonce:
        return cls(nonce=_uint(fields[1], "nonce"))


@dataclass(frozen=True, slots=True)
class Ping(_Nonce):
    """Either way: keepalive; the peer answers PONG with the same nonce."""

    TYPE: ClassVar = MessageType.PING


@dataclass(frozen=True, slots=True)
class Pong(_Nonce):
    """The answer to a PING (the same shape, not a kind of PING: receivers dispatch on the
    exact type)."""

    TYPE: ClassVar = MessageType.PONG


@dataclass(frozen=True, slots=True)
class Bye(Message):
    """Either way: orderly goodbye; the sender closes after it."""

    TYPE: ClassVar = MessageType.BYE
    ARITY: ClassVar = 2
    reason: str = ""

    def to_wire(self) -> list:
        return [self.WIRE_TYPE, self.reason]

    @classmethod
    def parse(cls, fields: list) -> Bye:
        return cls(reason=_text(fields[1], "reason"))


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Either way: fatal error with a stable code; the sender closes after it."""

    TYPE: ClassVar = MessageType.ERROR
    ARITY: ClassVar = 3
    code: str
    detail: str = ""

    def to_wire(self) -> list:
        return [self.WIRE_TYPE, self.code, self.detail]

    @classmethod
    def parse(cls, fields: list) -> Error:
        return cls(code=_text(fields[1], "code", MAX_NAME_LEN), detail=_text(fields[2], "detail"))


BATCH_TYPES = (Report, Reuse, Inflate, Deflate, Hint)
#: Batch wire type -> its kind code, the index of its name in vocabulary.BATCH_KINDS.
BATCH_KIND_CODES: dict[int, int] = {int(cls.TYPE): v.BATCH_KINDS.index(cls.KIND) for cls in BATCH_TYPES}
#: Batch kind name (vocabulary.BATCH_KINDS) -> message class.
BATCH_CLASSES: dict[str, type[Batch]] = {cls.KIND: cls for cls in BATCH_TYPES}
MESSAGE_CLASSES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Welcome, Report, Ack, Reuse, Inflate, Deflate, Target, HintStart, Hint,
                HintDone, HintStop, Stats, Ping, Error, Pong, Bye)
}
for _cls in MESSAGE_CLASSES.values():
    _cls.WIRE_TYPE = int(_cls.TYPE)


_BY_INT: dict[int, type[Message]] = {int(kind): cls for kind, cls in MESSAGE_CLASSES.items()}


def message_type(obj: Any) -> int:
    """The type number of one unpacked msgpack object, after checking it is a message at all.

    The first checks of every receive (docs/PROTOCOL.md §5.1): a non-empty array whose first
    element is an integer (else ``bad-shape``) naming a v1 type (else ``unknown-type``,
    negative numbers included).
    """
    if type(obj) is not list or not obj:
        raise _bad(f"a message must be a non-empty msgpack array, got {describe(obj)}")
    kind = obj[0]
    if type(kind) is not int:
        raise _bad(f"the first element of a message must be its integer type, got {describe(kind)}")
    if kind not in _BY_INT:
        raise RemoteProtocolError("unknown-type", f"message type {describe(kind)} is not defined in v1")
    return kind


def check_arity(cls: type[Message], obj: list) -> None:
    if len(obj) != cls.ARITY:
        raise _bad(f"{cls.TYPE.name} has {cls.ARITY} elements, got {len(obj)}")


def from_wire(obj: Any) -> Message:
    """Build a message from one unpacked msgpack object, checking every field.

    Batches come back undecoded (``pfns``/``counts`` None): decoding needs the session's
    encoding and limits, which only a connection has.
    """
    cls = _BY_INT[message_type(obj)]
    check_arity(cls, obj)
    return cls.parse(obj)

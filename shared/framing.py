"""Where each message ends, and what it may cost, decided before msgpack builds anything.

msgpack's ``Unpacker`` checks ``max_bin_len``/``max_str_len`` only once a body has
arrived and builds every object of an incomplete message as its bytes come in: ~1 MiB of
nested empty arrays, sent without its last byte, holds ~60 MiB of half-built lists. So,
like nats.py, which checks every size limit before it reads a payload, the connection walks
the msgpack *headers* of the stream first (:class:`Framer`) and hands the unpacker only
bytes that passed. The walk never looks inside a ``bin``/``str`` body — it steps over it
by its announced length — so a batch costs four header tokens whatever its payload.

Limits (docs/PROTOCOL.md §2.1), each refused as soon as a header shows it is exceeded:

- message size: ``max_message_bytes`` — a ``bin``/``str`` header whose announced length
  cannot fit is refused on the header, as is a message still incomplete past the limit;
- ``str`` length, array and map element counts;
- nesting depth (a v1 message nests at most 3 deep: ``[13, [[tag, value], ...]]``) and
  objects per message (every container, key and value counts), so what a message can
  cost in Python objects is bounded by a constant, not by its size;
- extension types and the never-used byte 0xc1 are not msgpack this protocol speaks.
"""

from __future__ import annotations

from .errors import RemoteProtocolError
from .vocabulary import MAX_ARRAY_LEN, MAX_DEPTH, MAX_MAP_LEN, MAX_OBJECTS, MAX_STR_BYTES

# What each first byte of a msgpack token is, as (kind, n):
_SCALAR = 0  # n body bytes follow the header byte (fixint, nil, bool, int, float)
_STR = 1  # n is the width of the big-endian length field (0: fixstr, length in the byte)
_BIN = 2  # n is the width of the length field (kinds are ordered: <= _BIN has a body)
_ARRAY = 3  # n is the width of the count field (0: fixarray)
_MAP = 4  # n is the width of the count field (0: fixmap; <= _MAP is a container)
_EXT = 5  # extension types: not part of this protocol
_INVALID = 6  # 0xc1


def _token_table() -> tuple:
    table = [None] * 256
    for byte in range(0x00, 0x80):
        table[byte] = (_SCALAR, 0)  # positive fixint
    for byte in range(0xE0, 0x100):
        table[byte] = (_SCALAR, 0)  # negative fixint
    for byte in range(0x80, 0x90):
        table[byte] = (_MAP, 0)
    for byte in range(0x90, 0xA0):
        table[byte] = (_ARRAY, 0)
    for byte in range(0xA0, 0xC0):
        table[byte] = (_STR, 0)
    fixed = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
             0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
    for byte, size in fixed.items():
        table[byte] = (_SCALAR, size)
    for byte, width in {0xC4: 1, 0xC5: 2, 0xC6: 4}.items():
        table[byte] = (_BIN, width)
    for byte, width in {0xD9: 1, 0xDA: 2, 0xDB: 4}.items():
        table[byte] = (_STR, width)
    for byte, width in {0xDC: 2, 0xDD: 4}.items():
        table[byte] = (_ARRAY, width)
    for byte, width in {0xDE: 2, 0xDF: 4}.items():
        table[byte] = (_MAP, width)
    for byte in (0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8):
        table[byte] = (_EXT, 0)
    table[0xC1] = (_INVALID, 0)
    return tuple(table)


_TOKENS = _token_table()


def _too_large(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError("too-large", detail)


class Framer:
    """Incremental msgpack header walker: message boundaries and structural limits.

    ``scan(chunk)`` walks the chunk's tokens, continuing the message the previous chunk
    left incomplete, and returns how many messages it completed. On a violation it raises
    ``RemoteProtocolError`` with ``error_at`` set to the chunk offset of the offending
    token, so the caller can still decode everything before it (and an error msgpack
    itself finds earlier in the stream wins, whatever the chunking).
    """

    __slots__ = ("max_message_bytes", "max_depth", "max_objects", "error_at", "consumed",
                 "_stack", "_skip", "_carry", "_size", "_objects")

    def __init__(self, max_message_bytes: int, max_depth: int = MAX_DEPTH,
                 max_objects: int = MAX_OBJECTS) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_depth = max_depth
        self.max_objects = max_objects
        self.error_at = 0
        self.consumed = 0  # bytes of the last chunk ``scan`` walked (all of it unless ``one``)
        self._stack: list[int] = []  # elements still due in each open container, outermost first
        self._skip = 0  # body bytes of the current str/bin still to step over
        self._carry = b""  # a token header split across chunks
        self._size = 0  # bytes of the current message so far
        self._objects = 0

    @property
    def at_boundary(self) -> bool:
        """No message is under way: the next byte starts a new one."""
        return not (self._stack or self._skip or self._carry)

    def batch_at(self, data, pos: int, end: int):
        """``batch_header(data, pos, end)`` when no message is under way here, else None:
        a batch lane may only take a frame that starts at a message boundary."""
        if self._stack or self._skip or self._carry:
            return None
        return batch_header(data, pos, end)

    def scan(self, chunk, one: bool = False) -> int:
        """Walk ``chunk``; with ``one``, stop where the first message completes
        (``consumed`` says where), so the caller can read the next one another way."""
        base = len(self._carry)  # offsets in ``data`` minus this are offsets in ``chunk``
        data = self._carry + bytes(chunk) if base else chunk
        self._carry = b""
        end = len(data)
        limit = self.max_message_bytes
        max_depth = self.max_depth
        max_objects = self.max_objects
        tokens = _TOKENS
        stack = self._stack
        skip = self._skip
        objects = self._objects
        # The current message's size is ``before + (pos - first)``: bytes it had before this
        # chunk plus what it has in it. Scalars and container headers are at most 9 bytes
        # and a message has at most max_objects of them, so size is checked where it can
        # jump — at str/bin headers — and where a message or the chunk ends.
        before = self._size
        first = 0
        pos = 0
        completed = 0
        start = 0
        while True:
            if skip:  # inside a str/bin body: step over what this chunk holds of it
                if skip > end - pos:
                    skip -= end - pos
                    pos = end
                    break
                pos += skip
                skip = 0
            elif pos >= end:
                break
            else:
                start = pos
                byte = data[pos]
                kind, width = tokens[byte]
                if pos + 1 + width > end:  # the header itself is split: finish it with the next chunk
                    self._carry = bytes(data[pos:end])
                    end = pos  # what is carried is not part of this chunk's size
                    break
                objects += 1
                if objects > max_objects:
                    self.error_at = max(0, start - base)
                    raise _too_large(f"a message holds more than {max_objects} msgpack objects")
                if kind == _SCALAR:
                    pos += 1 + width
                elif kind <= _BIN:  # str or bin
                    length = (byte & 0x1F) if width == 0 else int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
                    pos += 1 + width
                    size = before + pos - first + length
                    if kind == _STR and length > MAX_STR_BYTES:
                        self.error_at = max(0, start - base)
                        raise _too_large(f"a str of {length} bytes exceeds {MAX_STR_BYTES}")
                    if size > limit:
                        self.error_at = max(0, start - base)
                        raise _too_large(f"a message announcing at least {size} bytes exceeds {limit}")
                    if length:
                        skip = length
                        continue  # complete once the body is stepped over
                elif kind <= _MAP:  # array or map
                    count = (byte & 0x0F) if width == 0 else int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
                    if kind == _ARRAY and count > MAX_ARRAY_LEN:
                        self.error_at = max(0, start - base)
                        raise _too_large(f"an array of {count} elements exceeds {MAX_ARRAY_LEN}")
                    if kind == _MAP and count > MAX_MAP_LEN:
                        self.error_at = max(0, start - base)
                        raise _too_large(f"a map of {count} entries exceeds {MAX_MAP_LEN}")
                    if len(stack) >= max_depth:
                        self.error_at = max(0, start - base)
                        raise _too_large(f"a message nests deeper than {max_depth} levels")
                    pos += 1 + width
                    if count:
                        stack.append(count if kind == _ARRAY else 2 * count)
                        continue
                elif kind == _EXT:
                    self.error_at = max(0, start - base)
                    raise RemoteProtocolError(
                        "bad-msgpack", f"byte {byte:#04x} starts a msgpack extension type; v1 uses none")
                else:
                    self.error_at = max(0, start - base)
                    raise RemoteProtocolError("bad-msgpack", "byte 0xc1 is never used in msgpack")
            # An element is complete: close every container it completes.
            while stack:
                left = stack[-1] - 1
                if left:
                    stack[-1] = left
                    break
                stack.pop()
            else:  # a whole message
                if before + pos - first > limit:
                    self.error_at = max(0, start - base)
                    raise _too_large(f"a {before + pos - first}-byte message exceeds {limit} bytes")
                completed += 1
                before = 0
                first = pos
                objects = 0
                if one:
                    end = pos
                    break
        self.consumed = len(data) - base if self._carry else end - base
        size = before + end - first if (stack or skip or self._carry) else 0
        if size > limit:
            self.error_at = max(0, start - base)
            raise _too_large(f"an incomplete message exceeds {limit} bytes")
        self._skip = skip
        self._size = size
        self._objects = objects
        return completed


# -- the batch lane's header: one fixed shape, recognised whole or not at all ----------------

#: Batch wire types by array length: REPORT, REUSE, INFLATE, DEFLATE are ``[type, seq,
#: payload]``; HINT is ``[10, seq, cmd_id, payload]`` (docs/PROTOCOL.md §4).
_LANE_TYPES = {0x93: frozenset({3, 5, 6, 7}), 0x94: frozenset({10})}
#: Width of an unsigned msgpack integer's body by its first byte (positive fixint: 0).
_UINT_WIDTH = {**dict.fromkeys(range(0x80), 0), 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BIN_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def batch_header(data, pos: int, end: int):
    """``(type, seq, cmd_id, body_at, body_len)`` when ``data[pos:end]`` starts with a whole
    batch header, else None — the caller then hands the bytes to the framer.

    Recognised: a fixarray of 3 (4 for HINT), a positive fixint type, ``seq`` as any
    unsigned msgpack integer, HINT's ``cmd_id`` as one of at most 32 bits, the payload as
    ``bin``. Every field of that shape is in range by its encoding (seq < 2**64, cmd_id <
    2**32), so no field rule is needed here; any other encoding of the same message, an
    incomplete header and every malformed frame take the general path, which has the rules
    and their errors. The caller still checks the frame's size against the limit before
    it waits for the body.
    """
    if end - pos < 4:
        return None
    kinds = _LANE_TYPES.get(data[pos])
    kind = data[pos + 1]
    if kinds is None or kind not in kinds:
        return None
    at = pos + 2
    width = _UINT_WIDTH.get(data[at])
    if width is None or at + 1 + width >= end:
        return None
    seq = data[at] if width == 0 else int.from_bytes(data[at + 1 : at + 1 + width], "big")
    at += 1 + width
    cmd_id = None
    if kind == 10:
        width = _UINT_WIDTH.get(data[at])
        if width is None or width > 4 or at + 1 + width >= end:
            return None
        cmd_id = data[at] if width == 0 else int.from_bytes(data[at + 1 : at + 1 + width], "big")
        at += 1 + width
    width = _BIN_WIDTH.get(data[at])
    if width is None or at + 1 + width > end:
        return None
    length = int.from_bytes(data[at + 1 : at + 1 + width], "big")
    return kind, seq, cmd_id, at + 1 + width, length

"""Read the size a peer announces in the first bytes of an incomplete msgpack message.

msgpack's ``Unpacker`` checks ``max_bin_len``/``max_str_len`` only once the whole body
has arrived, so a frame announcing a 200 MB bin would be buffered up to
``max_buffer_size`` before it is refused (and a peer that then goes quiet would never
be told). Like nats.py, which checks every size limit before the payload is read, the
connection walks the headers in the first few bytes of each incomplete message and
refuses it as soon as an announced length cannot fit.
"""

from __future__ import annotations

#: Bytes of an incomplete message kept for the check: a batch's bin header sits within
#: the first 15 (``[type, seq, bin32]``); a HELLO map's fields within the first 64.
HEAD_BYTES = 64

# Header byte -> bytes that follow it with no length field (scalars, container counts).
_FIXED = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,  # nil, false, true
    0xCA: 4, 0xCB: 8,  # float32/64
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,  # uint8..64
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,  # int8..64
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,  # fixext 1..16 (type byte + data)
    0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4,  # array16/32, map16/32: elements follow inline
}
# Header byte -> width of its big-endian length field, then (ext only) one type byte.
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4}
_EXT = frozenset({0xC7, 0xC8, 0xC9})


def announced_size(head: bytes) -> int:
    """The fewest bytes the message starting with ``head`` can take, by its headers.

    msgpack is a prefix encoding, so a linear walk over the tokens in ``head`` sees every
    length field in order; the walk stops where ``head`` ends or at an invalid byte
    (which the unpacker itself reports as bad msgpack).
    """
    pos = 0
    size = 0
    end = len(head)
    while pos < end:
        byte = head[pos]
        if byte <= 0x9F or byte >= 0xE0:  # fixint, fixmap, fixarray, negative fixint
            pos += 1
        elif byte <= 0xBF:  # fixstr
            pos += 1 + (byte & 0x1F)
        elif byte in _FIXED:
            pos += 1 + _FIXED[byte]
        elif byte in _SIZED:
            width = _SIZED[byte]
            if pos + 1 + width > end:
                break
            length = int.from_bytes(head[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width + (byte in _EXT) + length
        else:  # 0xc1 is never used
            break
        size = max(size, pos)
    return size

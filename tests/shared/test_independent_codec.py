"""A second codec written only from docs/PROTOCOL.md must agree word for word.

The reference below deliberately shares nothing with shared/ranges.py: plain Python
integers, ``struct.pack('<Q')``, one loop iteration per word — the way a C driver
would be written. If the vectorized codec and this one ever disagree, one of them has
misread the spec (v6 of the 2016 series inlined count 4096; that is the kind of slip
this test exists to catch).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ProtocolError
from shared.ranges import decode_ranges, encode_ranges

PFN_LIMIT = 1 << 52
INLINE_LIMIT = 1 << 12  # counts 1..4095 are inline


class SpecError(Exception):
    """The reference decoder's own notion of a malformed payload."""


def spec_encode(ranges: list[tuple[int, int]]) -> bytes:
    out = bytearray()
    for pfn, count in ranges:
        if not 0 <= pfn < PFN_LIMIT:
            raise ValueError("pfn")
        if not 1 <= count < 1 << 64:
            raise ValueError("count")
        if count < INLINE_LIMIT:
            out += struct.pack("<Q", (pfn << 12) | count)
        else:
            out += struct.pack("<Q", pfn << 12)  # low 12 bits 0: escape
            out += struct.pack("<Q", count)
    return bytes(out)


def spec_decode(data: bytes) -> list[tuple[int, int]]:
    if len(data) % 8:
        raise SpecError("not whole words")
    words = [struct.unpack_from("<Q", data, offset)[0] for offset in range(0, len(data), 8)]
    ranges = []
    i = 0
    while i < len(words):
        word = words[i]
        pfn, count = word >> 12, word & 0xFFF
        if count == 0:
            if i + 1 == len(words):
                raise SpecError("trailing escape")
            count = words[i + 1]
            if count == 0:
                raise SpecError("escaped zero")
            i += 1
        ranges.append((pfn, count))
        i += 1
    return ranges


def ours(data: bytes) -> list[tuple[int, int]]:
    pfns, counts = decode_ranges(data)
    return list(zip(pfns.tolist(), counts.tolist(), strict=True))


def pack(ranges):
    return (np.array([p for p, _ in ranges], dtype=np.uint64), np.array([c for _, c in ranges], dtype=np.uint64))


EDGE = [
    (0, 1),
    (0, 4095),
    (0, 4096),
    (0, 4097),
    (1, 4096),
    (PFN_LIMIT - 1, 1),
    (PFN_LIMIT - 1, 4095),
    (PFN_LIMIT - 1, 4096),
    (PFN_LIMIT - 1, (1 << 64) - 1),
    (12345, 8192),
    (12345, 4096 * 4096),
    (7, 1 << 63),
]


@pytest.mark.parametrize("pfn,count", EDGE)
def test_edge_cases_agree_word_for_word(pfn, count):
    assert encode_ranges(*pack([(pfn, count)])) == spec_encode([(pfn, count)])
    assert ours(spec_encode([(pfn, count)])) == [(pfn, count)] == spec_decode(spec_encode([(pfn, count)]))


def test_all_edge_cases_in_one_batch():
    assert encode_ranges(*pack(EDGE)) == spec_encode(EDGE)
    assert ours(spec_encode(EDGE)) == EDGE


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, PFN_LIMIT - 1),
                          st.one_of(st.integers(1, 9000), st.integers(1, (1 << 64) - 1),
                                    st.integers(1, 1 << 20).map(lambda k: k << 12))),
                max_size=50))
def test_random_ranges_agree_word_for_word(ranges):
    encoded = spec_encode(ranges)
    assert encode_ranges(*pack(ranges)) == encoded
    assert ours(encoded) == ranges == spec_decode(encoded)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=20))
def test_random_words_decode_the_same_or_fail_the_same(words):
    """Any word sequence (canonical or not) is judged identically by both decoders."""
    data = b"".join(struct.pack("<Q", w) for w in words)
    try:
        expected = spec_decode(data)
    except SpecError:
        with pytest.raises(ProtocolError) as caught:
            decode_ranges(data)
        assert caught.value.code == "bad-payload"
    else:
        assert ours(data) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 4095, 4096, 8192, 1 << 12 | 1, 5 << 12, (5 << 12) | 7]), max_size=16))
def test_words_dense_in_escapes_agree(words):
    """Runs of words with a zero low field are where a vectorized decoder can go wrong."""
    data = b"".join(struct.pack("<Q", w) for w in words)
    try:
        expected = spec_decode(data)
    except SpecError:
        with pytest.raises(ProtocolError) as caught:
            decode_ranges(data)
        assert caught.value.code == "bad-payload"
    else:
        assert ours(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",
        b"\x00" * 7,
        struct.pack("<Q", (1 << 12) | 1) + b"\x00\x00",
        struct.pack("<Q", 9 << 12),  # trailing escape
        struct.pack("<QQ", (1 << 12) | 1, 9 << 12),  # trailing escape after a range
        struct.pack("<QQ", 9 << 12, 0),  # escaped zero
        struct.pack("<QQQ", 9 << 12, 4096, 0),  # count word 4096, then a trailing escape
    ],
)
def test_malformed_payloads_rejected_by_both(data):
    with pytest.raises(SpecError):
        spec_decode(data)
    with pytest.raises(ProtocolError) as caught:
        decode_ranges(data)
    assert caught.value.code == "bad-payload"


def test_non_canonical_escape_accepted_by_both():
    data = struct.pack("<QQ", 3 << 12, 5)
    assert spec_decode(data) == ours(data) == [(3, 5)]


@pytest.mark.parametrize("seed", [1, 2])
def test_large_payloads_agree(seed):
    """Batches past 32k words take the codec's block-scanning path; it must agree too."""
    rng = np.random.default_rng(seed)
    n = 40_000
    counts = rng.integers(1, 5000, n)
    long_runs = rng.random(n) < 0.05
    counts[long_runs] = rng.integers(1, 1 << 20, int(long_runs.sum())) << 12  # count words with low bits 0
    pfns = rng.integers(0, PFN_LIMIT, n)
    ranges = list(zip(pfns.tolist(), counts.tolist(), strict=True))
    encoded = spec_encode(ranges)
    assert encode_ranges(*pack(ranges)) == encoded
    assert ours(encoded) == ranges
    # Random words dense in zero count fields, with and without a malformed tail.
    words = rng.integers(0, 1 << 63, 36_000, dtype=np.uint64)
    words[rng.random(words.size) < 0.3] &= ~np.uint64(0xFFF)
    words[-1] |= np.uint64(1)  # a range word last, so the payload may be valid
    for data in (words.tobytes(), words[:-1].tobytes() + struct.pack("<Q", 5 << 12)):
        try:
            expected = spec_decode(data)
        except SpecError:
            with pytest.raises(ProtocolError):
                decode_ranges(data)
        else:
            assert ours(data) == expected

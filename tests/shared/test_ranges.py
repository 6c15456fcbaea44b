"""The range codec (shared/ranges.py): round trips, the 4095/4096 boundary, hostile bytes.

The codec is the guest-controlled surface the host parses most often, so besides round
trips every truncation and corruption of valid bytes must end in a coded
RemoteProtocolError or a valid decode — never an IndexError or a numpy warning.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared.errors import CODES, RemoteProtocolError
from shared.ranges import (
    MAX_INLINE_COUNT,
    MAX_PFN,
    PFN32_MAX_PER_MESSAGE,
    RangeBuffer,
    coalesce_ranges,
    count_ranges,
    decode_pfn32,
    decode_ranges,
    encode_pfn32,
    encode_ranges,
    encode_words,
    expand_pages,
    pages_to_ranges,
    sort_and_coalesce,
    words_needed,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EDGE_COUNTS = [1, 2, 4095, 4096, 4097, 8191, 8192, 2 * 4096, 3 * 4096, 4096 * 4096, 2**52, 2**63 - 1, 2**63]
EDGE_PFNS = [0, 1, 2**12 - 1, 2**12, 2**32 - 1, 2**32, 2**51, MAX_PFN]

pfn_st = st.integers(0, MAX_PFN)
count_st = st.one_of(
    st.integers(1, 2**63),
    st.integers(1, 5000),
    st.sampled_from(EDGE_COUNTS),
    st.integers(1, 2**20).map(lambda k: 4096 * k),
)
ranges_st = st.lists(st.tuples(pfn_st, count_st), max_size=60)


def arrays(ranges):
    pfns = np.array([p for p, _ in ranges], dtype=np.uint64)
    counts = np.array([c for _, c in ranges], dtype=np.uint64)
    return pfns, counts


def le_words(*words: int) -> bytes:
    return b"".join(struct.pack("<Q", w) for w in words)


# -- round trips and canonical form ---------------------------------------------------


@pytest.mark.parametrize("count", EDGE_COUNTS)
@pytest.mark.parametrize("pfn", EDGE_PFNS)
def test_edge_values_round_trip(pfn, count):
    data = encode_ranges([pfn], np.array([count], dtype=np.uint64))
    pfns, counts = decode_ranges(data)
    assert pfns.tolist() == [pfn]
    assert counts.tolist() == [count]
    assert pfns.dtype == np.uint64 and counts.dtype == np.uint64


@FAST
@given(ranges_st)
def test_round_trip(ranges):
    pfns, counts = arrays(ranges)
    data = encode_ranges(pfns, counts)
    assert len(data) == 8 * words_needed(counts)
    out_pfns, out_counts = decode_ranges(data)
    assert out_pfns.tolist() == pfns.tolist()
    assert out_counts.tolist() == counts.tolist()
    assert count_ranges(data) == len(ranges)


@FAST
@given(pfn_st, count_st)
def test_canonical_form_inlines_only_1_to_4095(pfn, count):
    words = np.frombuffer(encode_ranges([pfn], np.array([count], dtype=np.uint64)), dtype="<u8")
    if count <= 4095:
        assert words.tolist() == [(pfn << 12) | count]
    else:
        assert words.tolist() == [pfn << 12, count]


def test_4096_is_never_inlined():
    """v6 of the 2016 series inlined 4096, which spills into PFN bit 0."""
    words = np.frombuffer(encode_ranges([5], [4096]), dtype="<u8")
    assert words.size == 2
    assert int(words[0]) & 0xFFF == 0
    assert int(words[0]) >> 12 == 5
    assert int(words[1]) == 4096
    assert encode_ranges([5], [4095]) == le_words((5 << 12) | 4095)


def test_escaped_count_that_is_a_multiple_of_4096_is_not_mistaken_for_an_escape():
    """A count word with low 12 bits 0 sits next to escapes; the run parity must hold."""
    pfns = [1, 2, 3, 4]
    counts = [4096, 8192, 4096 * 7, 1]
    out = decode_ranges(encode_ranges(pfns, counts))
    assert out[0].tolist() == pfns and out[1].tolist() == counts


@FAST
@given(pfn_st, st.integers(1, 2**64 - 1))
def test_decoder_accepts_non_canonical_escapes(pfn, count):
    pfns, counts = decode_ranges(le_words(pfn << 12, count))
    assert pfns.tolist() == [pfn] and counts.tolist() == [count]


def test_non_canonical_escape_between_inline_ranges():
    data = le_words((1 << 12) | 3, 2 << 12, 7, (9 << 12) | 4095)
    pfns, counts = decode_ranges(data)
    assert pfns.tolist() == [1, 2, 9]
    assert counts.tolist() == [3, 7, 4095]


def test_empty_payload():
    pfns, counts = decode_ranges(b"")
    assert pfns.size == 0 and counts.size == 0
    assert encode_ranges([], []) == b""


def test_decode_accepts_buffer_types():
    data = encode_ranges([1, 2], [3, 5000])
    for buffer in (bytearray(data), memoryview(data)):
        assert decode_ranges(buffer)[1].tolist() == [3, 5000]


# -- encoder input checks -------------------------------------------------------------


@pytest.mark.parametrize("pfn", [MAX_PFN + 1, 2**60, 2**64 - 1])
def test_encoding_a_pfn_past_52_bits_raises(pfn):
    with pytest.raises(ValueError):
        encode_ranges(np.array([pfn], dtype=np.uint64), [1])


def test_encoding_count_zero_raises():
    with pytest.raises(ValueError):
        encode_ranges([1, 2], [1, 0])


@pytest.mark.parametrize(
    "pfns,counts",
    [([-1], [1]), ([1], [-1]), ([1, 2], [1]), ([[1]], [[1]]), ([1.5], [1])],
)
def test_encoder_refuses_what_the_wire_cannot_carry(pfns, counts):
    with pytest.raises(ValueError):
        encode_ranges(pfns, counts)


# -- malformed payloads ----------------------------------------------------------------


@pytest.mark.parametrize(
    "data,why",
    [
        (b"\x01", "not whole words"),
        (b"\x00" * 9, "not whole words"),
        (le_words(5 << 12), "ends in an escape"),
        (le_words((1 << 12) | 1, 5 << 12), "ends in an escape after a range"),
        (le_words(5 << 12, 0), "escapes zero"),
        (le_words(0, 0, 0), "escape, zero count, then trailing escape"),
        (le_words(5 << 12, 4096, 6 << 12), "escaped 4096 then trailing escape"),
    ],
)
def test_malformed_payloads_raise_bad_payload(data, why):
    with pytest.raises(RemoteProtocolError) as caught:
        decode_ranges(data)
    assert caught.value.code == "bad-payload", why


def _valid_payload(ranges) -> bytes:
    pfns, counts = arrays(ranges)
    return encode_ranges(pfns, counts)


def _decode_or_coded_error(data: bytes) -> None:
    try:
        pfns, counts = decode_ranges(data)
    except RemoteProtocolError as error:
        assert error.code in CODES
        return
    assert pfns.size == counts.size
    assert (counts >= 1).all()
    assert (pfns <= MAX_PFN).all()
    # A valid decode re-encodes to a payload that decodes to the same ranges.
    again = decode_ranges(encode_ranges(pfns, counts))
    assert again[0].tolist() == pfns.tolist() and again[1].tolist() == counts.tolist()


@FAST
@given(st.lists(st.tuples(pfn_st, count_st), min_size=1, max_size=12), st.data())
def test_truncation_ends_in_coded_error_or_valid_decode(ranges, data):
    payload = _valid_payload(ranges)
    cut = data.draw(st.integers(0, len(payload)))
    _decode_or_coded_error(payload[:cut])


def test_every_truncation_of_a_mixed_payload():
    payload = _valid_payload([(1, 1), (2, 4096), (3, 4095), (4, 2**40), (5, 8192)])
    for cut in range(len(payload) + 1):
        _decode_or_coded_error(payload[:cut])


@FAST
@given(
    st.lists(st.tuples(pfn_st, count_st), min_size=1, max_size=12),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_random_byte_corruption_ends_in_coded_error_or_valid_decode(ranges, flips):
    payload = bytearray(_valid_payload(ranges))
    for position, value in flips:
        payload[position % len(payload)] = value
    _decode_or_coded_error(bytes(payload))


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_end_in_coded_error_or_valid_decode(data):
    _decode_or_coded_error(data)


# -- RangeBuffer ----------------------------------------------------------------------


def test_range_buffer_never_reallocates():
    buffer = RangeBuffer(capacity_words=8)
    storage = buffer._words
    address = storage.__array_interface__["data"][0]
    for pfn in range(100):
        buffer.append(pfn * 10, 1 + pfn % 5000)
        if buffer.full:
            buffer.take()
    buffer.extend(np.arange(50, dtype=np.uint64) * 100, np.full(50, 5000, dtype=np.uint64))
    assert buffer._words is storage
    assert buffer._words.__array_interface__["data"][0] == address
    assert buffer.capacity == 8


def test_range_buffer_append_refuses_what_does_not_fit():
    buffer = RangeBuffer(capacity_words=3)
    assert buffer.append(1, 1)
    assert buffer.append(2, 4096)  # two words: now full
    assert buffer.used_words == 3 and buffer.full
    assert not buffer.append(3, 1)
    assert len(buffer) == 2 and buffer.pages == 4097
    payload = buffer.take()
    assert decode_ranges(payload)[0].tolist() == [1, 2]
    assert len(buffer) == 0 and buffer.used_words == 0 and buffer.pages == 0


def test_range_buffer_escaped_range_does_not_fit_in_last_word():
    buffer = RangeBuffer(capacity_words=2)
    assert buffer.append(1, 5)
    assert not buffer.append(2, 4096)
    assert buffer.used_words == 1 and not buffer.full
    assert buffer.append(3, 4095)
    assert buffer.full


def test_range_buffer_max_ranges():
    buffer = RangeBuffer(capacity_words=100, max_ranges=3)
    assert buffer.extend(np.arange(10, dtype=np.uint64), np.ones(10, dtype=np.uint64)) == 3
    assert buffer.full and not buffer.append(50, 1)


@FAST
@given(
    st.integers(2, 40),
    st.lists(st.lists(st.tuples(pfn_st, count_st), max_size=30), min_size=1, max_size=6),
)
def test_range_buffer_extend_takes_a_prefix_and_take_resets(capacity, batches):
    buffer = RangeBuffer(capacity_words=capacity)
    storage = buffer._words
    sent_pfns: list[int] = []
    sent_counts: list[int] = []
    wanted_pfns: list[int] = []
    wanted_counts: list[int] = []
    for batch in batches:
        pfns, counts = arrays(batch)
        wanted_pfns += pfns.tolist()
        wanted_counts += counts.tolist()
        while pfns.size:
            taken = buffer.extend(pfns, counts)
            assert buffer.used_words <= capacity
            if taken < pfns.size:
                # What was refused would not have fitted.
                assert buffer.used_words + (2 if int(counts[taken]) > MAX_INLINE_COUNT else 1) > capacity
                payload = buffer.take()
                assert buffer.used_words == 0 and len(buffer) == 0
                out = decode_ranges(payload)
                sent_pfns += out[0].tolist()
                sent_counts += out[1].tolist()
            pfns, counts = pfns[taken:], counts[taken:]
    out = decode_ranges(bytes(buffer.view()))
    sent_pfns += out[0].tolist()
    sent_counts += out[1].tolist()
    assert sent_pfns == wanted_pfns and sent_counts == wanted_counts
    assert buffer._words is storage


def test_range_buffer_rejects_unencodable_ranges():
    buffer = RangeBuffer(capacity_words=4)
    with pytest.raises(ValueError):
        buffer.append(MAX_PFN + 1, 1)
    with pytest.raises(ValueError):
        buffer.append(1, 0)
    with pytest.raises(ValueError):
        buffer.extend([1], [0])
    assert buffer.used_words == 0
    with pytest.raises(ValueError):
        RangeBuffer(capacity_words=1)


def test_range_buffer_bytes_match_encode_ranges():
    pfns = np.array([1, 10, 100, 1000], dtype=np.uint64)
    counts = np.array([1, 4096, 4095, 10**9], dtype=np.uint64)
    buffer = RangeBuffer(capacity_words=16)
    for pfn, count in zip(pfns[:2].tolist(), counts[:2].tolist(), strict=True):
        assert buffer.append(pfn, count)
    assert buffer.extend(pfns[2:], counts[2:]) == 2
    assert bytes(buffer.view()) == encode_ranges(pfns, counts)
    assert buffer.take() == encode_ranges(pfns, counts)


# -- coalescing and page helpers --------------------------------------------------------


def naive_coalesce(ranges):
    merged: list[list[int]] = []
    for pfn, count in sorted(ranges):
        if merged and pfn <= merged[-1][0] + merged[-1][1]:
            end = max(merged[-1][0] + merged[-1][1], pfn + count)
            merged[-1][1] = end - merged[-1][0]
        else:
            merged.append([pfn, count])
    return [tuple(r) for r in merged]


small_ranges_st = st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 300)), max_size=40)


@FAST
@given(small_ranges_st)
def test_coalesce_matches_a_naive_reference(ranges):
    ordered = sorted(ranges)
    pfns, counts = arrays(ordered)
    out = coalesce_ranges(pfns, counts)
    assert list(zip(out[0].tolist(), out[1].tolist(), strict=True)) == naive_coalesce(ranges)
    shuffled = sort_and_coalesce(*arrays(ranges))
    assert list(zip(shuffled[0].tolist(), shuffled[1].tolist(), strict=True)) == naive_coalesce(ranges)


def test_coalesce_touching_and_contained():
    out = coalesce_ranges(np.array([0, 4, 5, 20], np.uint64), np.array([4, 10, 2, 1], np.uint64))
    assert out[0].tolist() == [0, 20] and out[1].tolist() == [14, 1]


@FAST
@given(small_ranges_st)
def test_expand_pages_and_pages_to_ranges(ranges):
    pfns, counts = arrays(ranges)
    pages = expand_pages(pfns, counts)
    expected = [p for pfn, count in ranges for p in range(pfn, pfn + count)]
    assert pages.tolist() == expected
    unique = np.unique(pages)
    runs = pages_to_ranges(unique)
    assert list(zip(runs[0].tolist(), runs[1].tolist(), strict=True)) == naive_coalesce(ranges) or not ranges
    assert expand_pages(*runs).tolist() == unique.tolist()


def test_pages_to_ranges_empty():
    pfns, counts = pages_to_ranges([])
    assert pfns.size == 0 and counts.size == 0
    assert expand_pages([], []).size == 0


# -- legacy pfn32 -----------------------------------------------------------------------


@FAST
@given(st.lists(st.integers(0, 2**32 - 1), max_size=PFN32_MAX_PER_MESSAGE))
def test_pfn32_round_trip(pages):
    data = encode_pfn32(np.array(pages, dtype=np.uint64))
    assert data == b"".join(struct.pack("<I", p) for p in pages)
    pfns, counts = decode_pfn32(data)
    assert pfns.tolist() == pages
    assert counts.tolist() == [1] * len(pages)


def test_pfn32_limits():
    assert len(encode_pfn32(np.arange(256))) == 1024
    with pytest.raises(ValueError):
        encode_pfn32(np.arange(257))
    with pytest.raises(ValueError):
        encode_pfn32(np.array([2**32], dtype=np.uint64))
    with pytest.raises(ValueError):
        encode_pfn32(np.array([-1]))
    with pytest.raises(RemoteProtocolError) as caught:
        decode_pfn32(b"\x00" * (4 * 257))
    assert caught.value.code == "too-many-ranges"
    with pytest.raises(RemoteProtocolError) as caught:
        decode_pfn32(b"\x00" * 5)
    assert caught.value.code == "bad-payload"


@given(st.binary(max_size=1100))
@FAST
def test_pfn32_arbitrary_bytes(data):
    try:
        pfns, counts = decode_pfn32(data)
    except RemoteProtocolError as error:
        assert error.code in ("bad-payload", "too-many-ranges")
    else:
        assume(pfns.size)
        assert pfns.size <= 256 and (counts == 1).all()


def test_encode_words_matches_encode_ranges():
    pfns, counts = [3, 4], [4096, 1]
    assert encode_words(pfns, counts).tobytes() == encode_ranges(pfns, counts)


def test_range_buffer_validates_each_range_array_once(monkeypatch):
    """issue 19: RangeBuffer.extend checked the ranges, then encode_into checked them again."""
    import shared.ranges as codec

    calls = []
    check = codec.check_ranges
    monkeypatch.setattr(codec, "check_ranges", lambda p, c: calls.append(1) or check(p, c))
    buffer = codec.RangeBuffer(16)
    assert buffer.extend(np.array([1, 9000, 20], np.uint64), np.array([3, 5000, 1], np.uint64)) == 3
    assert len(calls) == 1
    pfns, counts = codec.decode_ranges(buffer.take())
    assert pfns.tolist() == [1, 9000, 20] and counts.tolist() == [3, 5000, 1]

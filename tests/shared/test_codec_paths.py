"""The compiled (numba) codec and the numpy fallback must agree word for word and error for error.

The rest of tests/shared runs whichever path is active (compiled when numba imports);
this file pins the other one to it, so a machine without numba is covered too.
"""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import _kernels, ranges
from shared.errors import RemoteProtocolError

pytestmark = pytest.mark.skipif(not _kernels.AVAILABLE, reason="numba not importable: only the numpy path exists")


@contextlib.contextmanager
def numpy_codec():
    saved = _kernels.AVAILABLE
    _kernels.AVAILABLE = False
    try:
        yield
    finally:
        _kernels.AVAILABLE = saved


def outcome(function, *args):
    try:
        result = function(*args)
    except (ValueError, RemoteProtocolError) as error:
        return type(error), getattr(error, "code", None)
    if isinstance(result, tuple):
        return tuple(np.asarray(part).tolist() for part in result)
    return np.asarray(result).tolist()


counts = st.one_of(st.integers(1, 4095), st.integers(4096, 2**63), st.sampled_from([4095, 4096, 4097, 8192, 2**63]))
range_lists = st.lists(st.tuples(st.integers(0, 2**52 - 1), counts), max_size=64)


@settings(max_examples=300, deadline=None)
@given(range_lists)
def test_encode_agrees(pairs):
    pfns = np.array([p for p, _ in pairs], dtype=np.uint64)
    cnts = np.array([c for _, c in pairs], dtype=np.uint64)
    compiled = outcome(ranges.encode_words, pfns, cnts)
    with numpy_codec():
        assert outcome(ranges.encode_words, pfns, cnts) == compiled


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 2**52 - 1).map(lambda p: p << 12),
                          st.just(0), st.just(8192)), max_size=48))
def test_decode_agrees_on_any_words(words):
    payload = np.array(words, dtype="<u8").tobytes()
    compiled = outcome(ranges.decode_ranges, payload)
    with numpy_codec():
        assert outcome(ranges.decode_ranges, payload) == compiled


@pytest.mark.parametrize("pfns, cnts", [([2**52], [1]), ([1], [0]), ([0, 2**52 + 5], [1, 1])])
def test_encode_errors_agree(pfns, cnts):
    pfns = np.array(pfns, dtype=np.uint64)
    cnts = np.array(cnts, dtype=np.uint64)
    compiled = outcome(ranges.encode_words, pfns, cnts)
    assert compiled[0] is ValueError
    with numpy_codec():
        assert outcome(ranges.encode_words, pfns, cnts) == compiled


@pytest.mark.parametrize("last_count", [1, 4095, 4096, 2**40])
def test_large_payloads_encoded_in_place_match_the_array_path(last_count):
    """Batches from ranges.BIG_BATCH on are written straight into their bytes object."""
    rng = np.random.default_rng(last_count)
    size = ranges.BIG_BATCH + 17
    cnts = np.where(rng.random(size) < 0.05, rng.integers(4096, 2**20, size), rng.integers(1, 4096, size))
    cnts = cnts.astype(np.uint64)
    cnts[-1] = last_count
    pfns = np.cumsum(cnts + 1, dtype=np.uint64)
    payload = ranges.encode_ranges(pfns, cnts)
    assert type(payload) is bytes
    assert payload == ranges.encode_words(pfns, cnts).tobytes()
    decoded = ranges.decode_ranges(payload)
    assert decoded[0].tolist() == pfns.tolist() and decoded[1].tolist() == cnts.tolist()
    assert hash(payload) == hash(bytes(payload))  # a normal, immutable bytes object afterwards


@pytest.mark.parametrize("pfn, count", [(2**52, 1), (5, 0)])
def test_large_payloads_refuse_what_the_wire_cannot_carry(pfn, count):
    size = ranges.BIG_BATCH + 3
    pfns = np.arange(size, dtype=np.uint64) * 8
    cnts = np.ones(size, dtype=np.uint64)
    pfns[size // 2], cnts[size // 2] = pfn, count
    with pytest.raises(ValueError):
        ranges.encode_ranges(pfns, cnts)

"""FlowWindow (shared/window.py): the in-flight batch limit that plays the virtqueue's size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.window import FlowWindow, UnknownSequence, WindowFull


def test_size_must_be_positive():
    for size in (0, -1):
        with pytest.raises(ValueError):
            FlowWindow(size)


def test_consume_until_full():
    window = FlowWindow(3)
    assert window.available == 3 and window.in_flight == 0 and not window.full
    assert window.oldest is None
    for seq in range(3):
        window.consume(seq)
    assert window.full and window.available == 0 and window.in_flight == 3
    with pytest.raises(WindowFull):
        window.consume(3)
    assert window.in_flight == 3 and 3 not in window


def test_release_reopens_and_keeps_order():
    window = FlowWindow(3)
    for seq in (10, 11, 12):
        window.consume(seq)
    window.release(11)
    assert window.pending() == [10, 12]
    assert window.oldest == 10
    assert 11 not in window and 10 in window
    window.consume(13)
    assert window.pending() == [10, 12, 13]


def test_release_unknown_or_twice():
    window = FlowWindow(2)
    with pytest.raises(UnknownSequence):
        window.release(0)
    window.consume(0)
    window.release(0)
    with pytest.raises(UnknownSequence):
        window.release(0)


def test_consume_same_seq_twice():
    window = FlowWindow(4)
    window.consume(7)
    with pytest.raises(UnknownSequence):
        window.consume(7)
    assert window.in_flight == 1


def test_clear_returns_what_was_pending():
    window = FlowWindow(4)
    for seq in (1, 2, 3):
        window.consume(seq)
    assert window.clear() == [1, 2, 3]
    assert window.in_flight == 0 and window.available == 4


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=60))
def test_matches_a_set_model(size, operations):
    """Against a plain set: consume/release succeed or fail exactly when the model says."""
    window = FlowWindow(size)
    model: list[int] = []
    for consume, seq in operations:
        if consume:
            if len(model) >= size:
                with pytest.raises(WindowFull):
                    window.consume(seq)
            elif seq in model:
                with pytest.raises(UnknownSequence):
                    window.consume(seq)
            else:
                window.consume(seq)
                model.append(seq)
        else:
            if seq in model:
                window.release(seq)
                model.remove(seq)
            else:
                with pytest.raises(UnknownSequence):
                    window.release(seq)
        assert window.pending() == model
        assert window.in_flight == len(model) <= size
        assert window.available == size - len(model)
        assert window.full == (len(model) == size)
        assert window.oldest == (model[0] if model else None)

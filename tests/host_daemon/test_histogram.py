"""The recent p99 forgets what is older than its window; the lifetime one does not."""

from __future__ import annotations

from host_daemon.histogram import RECENT_SECONDS, SLOT_SECONDS, LatencyHistogram


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_slow_first_batch_leaves_the_recent_p99_after_the_window():
    clock = Clock()
    h = LatencyHistogram(clock=clock)
    h.observe(0.4)  # a first batch that waited for something
    for _ in range(99):
        h.observe(40e-6)
    assert h.quantile(0.99) == h.recent_quantile(0.99) == 50e-6  # 99 of 100 at most 50 µs
    h.observe(0.4)
    assert h.recent_quantile(0.99) == 0.5  # two slow ones of 101: the p99 is slow now
    clock.now += RECENT_SECONDS + SLOT_SECONDS
    assert h.recent_quantile(0.99) is None  # nothing in the last minutes
    for _ in range(10):
        h.observe(20e-6)
    assert h.recent_quantile(0.99) == 25e-6
    assert h.quantile(0.99) == 0.5  # the lifetime figure keeps them
    assert h.count == 111


def test_slots_within_the_window_all_count():
    clock = Clock()
    h = LatencyHistogram(clock=clock)
    for _ in range(200):
        h.observe(0.2)
        clock.now += 1.0  # 200 s: seven slots, all inside the 5 minutes
    assert h.recent_quantile(0.5) == 0.25
    clock.now += RECENT_SECONDS - 200 + SLOT_SECONDS  # the oldest slots left the window, the newest stay
    assert h.recent_quantile(0.5) == 0.25
    clock.now += RECENT_SECONDS
    assert h.recent_quantile(0.5) is None

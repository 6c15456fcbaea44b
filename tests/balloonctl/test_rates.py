"""Rates from two polls of the host's counters (``balloonctl top``)."""

from __future__ import annotations

from balloonctl.rates import RateTracker


def test_rates_are_the_counters_slopes_between_polls():
    tracker = RateTracker()
    guest = {"id": "g", "batches": {"report": 10}, "pages_total": {"report": 100, "inflate": 0}}
    assert tracker.update([guest], 1.0)["g"]["batches_per_s"] is None
    guest = {"id": "g", "batches": {"report": 30}, "pages_total": {"report": 300, "inflate": 50}}
    rates = tracker.update([guest], 3.0)["g"]
    assert rates["batches_per_s"] == 10.0
    assert rates["report_bytes_per_s"] == 100 * 4096 and rates["inflate_bytes_per_s"] == 25 * 4096
    assert tracker.update([guest], 3.0)["g"]["batches_per_s"] is None  # no time passed: no rate

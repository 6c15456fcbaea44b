"""Latency recording and the merge of per-process results."""

from __future__ import annotations

import numpy as np
import pytest

from guest_agent.load.stats import (
    Recorder,
    Timeline,
    latency_summary,
    new_histogram,
    record_seconds,
)


def test_percentiles_of_known_latencies():
    histogram = new_histogram()
    record_seconds(histogram, [i / 1e6 for i in range(1, 1001)])  # 1 .. 1000 µs
    summary = latency_summary(histogram)
    assert abs(summary["p50"] - 500e-6) <= 1e-6
    assert abs(summary["p99"] - 990e-6) <= 1e-6
    assert summary["max"] == 1000e-6
    assert summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["p999"] <= summary["max"]


def test_merging_encoded_histograms_equals_recording_everything_in_one():
    rng = np.random.default_rng(3)
    a, b = rng.exponential(1e-3, 5000).tolist(), rng.exponential(5e-3, 500).tolist()
    one, left, right = new_histogram(), new_histogram(), new_histogram()
    record_seconds(one, a + b)
    record_seconds(left, a)
    record_seconds(right, b)
    merged = new_histogram()
    merged.decode_and_add(left.encode())
    merged.decode_and_add(right.encode())
    assert latency_summary(merged) == latency_summary(one)
    assert merged.get_total_count() == 5500


def test_timeline_adds_workers_per_second():
    first, second = Recorder(), Recorder()
    for recorder, latency in ((first, 0.001), (second, 0.004)):
        recorder.totals.batches += 10
        recorder.latencies.extend([latency] * 10)
    timeline = Timeline()
    timeline.add(first.tick(0))
    timeline.add(second.tick(0))
    row = timeline.rows()[0]
    assert row["batches"] == 20
    assert row["p50_s"] == pytest.approx(0.001, rel=1e-3)  # HdrHistogram: 3 significant digits
    assert row["max_s"] == pytest.approx(0.004, rel=1e-3)
    assert first.tick(1)["batches"] == 0  # ticks report deltas


def test_progress_counts_each_second_once_across_processes():
    from guest_agent.load.cli import Progress

    progress = Progress(total=100, by_time=False)
    slot = {"second": 0, "batches": 10, "errors": 0, "histogram": new_histogram()}
    progress.tick(slot)
    slot["batches"] = 25  # the second worker's share of second 0 arrived
    progress.tick(slot)
    progress.tick({"second": 1, "batches": 5, "errors": 1, "histogram": new_histogram()})
    assert progress.done == 30 and progress.errors == 1

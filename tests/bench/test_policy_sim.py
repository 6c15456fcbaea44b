"""The policy simulator replays its scenarios through the real policy core; each shows its rail."""

from __future__ import annotations

import pytest

from bench import policy as sim


def run(name: str):
    scenario = next(s for s in sim.scenarios() if s.name == name)
    return scenario, sim.run(scenario)


def test_host_pressure_shrinks_every_guest_then_grows_them_back_within_floors():
    _, trace = run("host-pressure")
    for gid, balloon in trace.balloon.items():
        assert max(balloon) > 0 and balloon[-1] == 0, gid
        assert min(trace.free[gid]) >= trace.floor[gid], gid


def test_thrash_after_a_shrink_is_answered_by_an_immediate_deflate():
    _, trace = run("thrash")
    reasons = trace.reasons["grower"]
    assert "guest-pressure" in reasons or "oom-deflate" in reasons
    at = max(i for i, r in enumerate(reasons) if r in ("guest-pressure", "oom-deflate"))
    assert trace.balloon["grower"][at] < trace.balloon["grower"][at - 1]
    assert trace.balloon["grower"][-1] == 0


def test_stale_stats_freeze_the_target():
    scenario, trace = run("stale")
    cfg = sim.PolicyConfig(policy="mom")
    frozen_from = next(i for i, t in enumerate(trace.t) if t > 100 + cfg.stale_intervals * 5.0)
    assert len(set(trace.balloon["silent"][frozen_from:])) == 1
    assert trace.reasons["silent"][-1] == "stale-stats"


def test_a_guest_that_never_reports_is_never_ballooned():
    _, trace = run("never-reports")
    assert set(trace.balloon["mute"]) == {0}
    assert set(trace.reasons["mute"]) == {"no-stats"}
    assert max(trace.balloon["reporter"]) > 0


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    assert sim.main(["--scenario", "burst", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "burst.png").stat().st_size > 10_000


def test_unknown_scenario_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        sim.main(["--scenario", "nope", "--no-plot"])
    assert exit_info.value.code == 2

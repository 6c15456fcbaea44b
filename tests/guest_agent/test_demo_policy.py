"""``DEMO_POLICY=balance make demo``: the option is checked, and it starts the host with the policy."""

from __future__ import annotations

import io

import pytest

from guest_agent import demo


@pytest.mark.parametrize("value, policy", [("", None), ("manual", None), ("balance", "balance"), ("MOM", "mom")])
def test_demo_policy_from_env(monkeypatch, value, policy):
    monkeypatch.setenv("DEMO_POLICY", value)
    assert demo._policy_from_env() == policy


def test_a_bad_demo_policy_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("DEMO_POLICY", "greedy")
    with pytest.raises(SystemExit, match="DEMO_POLICY must be balance, mom or manual"):
        demo._policy_from_env()


def test_the_policy_demo_runs_the_host_with_the_policy_and_guests_without_reporting(monkeypatch):
    spawned = {}
    d = demo.Demo(None, out=io.StringIO(), policy="balance", budget="200MiB")
    monkeypatch.setattr(d, "_spawn", lambda name, argv: spawned.setdefault(name, argv))
    monkeypatch.setattr(d, "_wait_ready", lambda: None)
    try:
        d.start()
        host = spawned["host"]
        assert host[host.index("--policy") + 1] == "balance"
        assert host[host.index("--guest-memory-budget") + 1] == "200MiB"
        assert "interval" in (d.folder / "policy.toml").read_text()
        assert all("--no-reporting" in argv for name, argv in spawned.items() if name.startswith("guest-"))
    finally:
        d.children.clear()
        d.stop()

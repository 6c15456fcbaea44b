"""The policy inside a real host: settings errors, GET/POST /api/v1/policy, metrics, a tick
that sends TARGET to a guest through the same path as the admin API."""

from __future__ import annotations

import os

import aiohttp
import pytest

from host_daemon import cli
from host_daemon.settings import HostSettings, SettingsError
from shared.runtime.addresses import Address


@pytest.mark.parametrize("extra, message", [
    (["--policy", "greedy"], "invalid choice"),
    (["--policy", "balance", "--host-memory", "cgroup:/nonexistent"], "cgroup"),
    (["--host-memory", "budget"], "--guest-memory-budget"),
    (["--policy-interval", "0"], "interval"),
])
def test_bad_policy_options_exit_2(extra, message, capsys, monkeypatch, tmp_path):
    for name in [n for n in os.environ if n.startswith("BALLOON_HOST_")]:
        monkeypatch.delenv(name)
    try:
        status = cli.main(["--listen", f"unix:{tmp_path}/s", *extra])
    except SystemExit as exit_info:
        status = exit_info.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_policy_config_file_unknown_knob_is_named(tmp_path):
    config = tmp_path / "policy.toml"
    config.write_text('[policy]\nblock_lo = "5s"\n')
    with pytest.raises(SettingsError, match="block_lo"):
        HostSettings(listen=(Address("unix", path=str(tmp_path / "s")),), policy_config=config)


async def test_get_and_post_policy(make_host, tmp_path):
    token = tmp_path / "admin-token"
    token.write_text("s3cret-admin-token\n")
    host = await make_host(policy="balance", guest_memory_budget=64 << 20, admin_token_file=token)
    await host.policy.tick()
    auth = {"Authorization": "Bearer s3cret-admin-token"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{host.url}/api/v1/policy") as response:
            body = await response.json()
        assert (body["policy"], body["source"], body["guest_memory_budget"]) == ("balance", "budget", 64 << 20)
        assert body["host"]["available_bytes"] == 64 << 20 and body["decisions"] == []
        async with http.post(f"{host.url}/api/v1/policy", json={"guest_memory_budget": "1GiB"}) as response:
            assert response.status == 401
        async with http.post(f"{host.url}/api/v1/policy", json={"block_lo": 3}, headers=auth) as response:
            assert response.status == 400 and "block_lo" in (await response.json())["error"]
        async with http.post(f"{host.url}/api/v1/policy", headers=auth,
                             json={"guest_memory_budget": "1GiB", "block_low": "30s"}) as response:
            body = await response.json()
        assert response.status == 200
        assert body["guest_memory_budget"] == 1 << 30 and body["config"]["block_low"] == 30.0
        async with http.get(f"{host.url}/api/v1/policy?history=5000") as response:
            assert response.status == 400
        async with http.get(f"{host.url}/metrics") as response:
            text = await response.text()
    assert 'balloon_policy_info{policy="balance",source="budget"} 1.0' in text
    assert "balloon_host_memory_available_bytes" in text
    assert 'balloon_host_memory_pressure_ratio{kind="some"}' in text


async def test_manual_policy_never_sends_targets(make_host):
    host = await make_host()
    assert host.policy.config.policy == "manual"
    assert await host.policy.tick() == []


async def test_the_inventory_limits_reach_the_policy(make_host, caplog):
    import logging

    from host_daemon.inventory import parse_entry

    host = await make_host(policy="mom")
    host.registry.provision(parse_entry("vm1", {"memory": "1GiB", "min_memory": "256MiB", "max_memory": "768MiB",
                                                "token": "at-least-8-chars"}))
    _, guests, _ = host.policy.measure(0.0)
    (vm1,) = guests
    assert (vm1.memory_bytes, vm1.min_memory, vm1.max_memory) == (1 << 30, 256 << 20, 768 << 20)
    assert not vm1.connected and vm1.stats_age is None
    with caplog.at_level(logging.DEBUG, logger="balloon.host.policy"):
        (decision,) = await host.policy.tick()
        await host.policy.tick()
    assert (decision.direction, decision.reason) == ("hold", "disconnected")
    lines = [r for r in caplog.records if r.getMessage() == "policy decision"]
    # one structured line per decision: inputs, rule, result; a repeated hold drops to debug
    assert [r.levelno for r in lines] == [logging.INFO, logging.DEBUG]
    first = lines[0]
    assert (first.guest, first.reason, first.rule, first.direction) == ("vm1", "disconnected", "rail:freeze", "hold")
    assert first.in_memory_bytes == 1 << 30 and first.policy == "mom"


async def test_a_forgotten_guest_has_no_series_even_before_the_next_tick(make_host):
    """docs/API.md: a forgotten guest leaves no stale series — the policy's included, at once.
    Also counts a guest's series, as docs/API.md lists them."""
    from hostkit import BYE, WELCOME, RawGuest, eventually, scrape

    host = await make_host(policy="balance", guest_memory_budget=64 << 20, retention=30.0, forget_after=30.0)
    guest = await RawGuest.connect(host.unix)
    assert (await guest.hello("gone", 4096, features=["ranges52", "stats"]))[0] == WELCOME
    await guest.send([13, [[4, 1 << 20], [5, 16 << 20], [6, 8 << 20]]])  # MEMFREE, MEMTOT, AVAIL
    await guest.report([(0, 16)])
    await host.policy.tick()
    text = await scrape(host.url)
    series = [line for line in text.splitlines() if 'guest="gone"' in line and not line.startswith("#")]
    names = {line.split("{")[0] for line in series}
    assert {"balloon_policy_target_bytes", "balloon_policy_decisions_total"} <= names
    # docs/API.md "Host metrics": 33 series every known guest has, 4 from its STATS (three
    # tags and their age), 2 from the policy (its target and the one decision it made)
    assert len(series) == 33 + 4 + 2, sorted(series)
    await guest.send([BYE, ""])
    await guest.closed()
    await eventually(lambda: host.registry.get("gone").connection is None)
    host.registry.forget("gone")
    text = await scrape(host.url)
    assert 'guest="gone"' not in text

"""The host's /metrics beyond its own series: process and build info, and deprecated aliases."""

from __future__ import annotations

import aiohttp
from hostkit import RawGuest, sample, scrape

from host_daemon.metrics import DEPRECATED
from host_daemon.standard_metrics import version


async def test_process_metrics_and_build_info_are_exported(make_host):
    host = await make_host()
    text = await scrape(host.url)
    assert sample(text, "balloon_build_info", version=version()) == 1
    assert version() != "unknown"  # the test venv has the package installed
    assert sample(text, "process_resident_memory_bytes") > 0
    assert sample(text, "process_cpu_seconds_total") > 0
    assert sample(text, "process_open_fds") >= 1
    assert "python_info{" in text


async def test_renamed_target_is_also_exported_under_its_old_name(make_host):
    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    await guest.hello("renamed", 65536)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{host.url}/api/v1/guests/renamed/target", json={"size": "32MiB"},
                             headers=host.admin_headers) as response:
            assert response.status == 202
    text = await scrape(host.url)
    for old, new in DEPRECATED.items():
        assert sample(text, new, guest="renamed") == 32 << 20
        assert sample(text, old, guest="renamed") == 32 << 20
        assert f"# HELP {old} DEPRECATED: use {new}." in text
    await guest.close()


async def test_vmm_vocabulary_gauges_follow_stats_and_the_balloon(make_host):
    """actual = RAM − balloon and the guest's STATS under the libvirt exporter / KubeVirt names."""
    from hostkit import ACK, INFLATE, STATS

    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    await guest.hello("vmm", 65536, features=("stats",))
    text = await scrape(host.url)
    assert sample(text, "balloon_guest_actual_balloon_bytes", guest="vmm") == 256 << 20
    for name in ("balloon_guest_available_bytes", "balloon_guest_usable_bytes", "balloon_guest_unused_bytes",
                 "balloon_guest_stats_age_seconds"):
        assert sample(text, name, guest="vmm") is None, f"{name} before any STATS"
    assert sample(text, "balloon_guest_target_unreachable", guest="vmm") == 0
    assert sample(text, "balloon_target_shortfall_bytes", guest="vmm") == 0

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{host.url}/api/v1/guests/vmm/target", json={"size": "8MiB"},
                             headers=host.admin_headers) as response:
            assert response.status == 202
    await guest.send([STATS, [[4, 100 << 20], [5, 250 << 20], [6, 180 << 20]]])
    seq = await guest.batch(INFLATE, [(0, 512)])  # 2 MiB of the 8 MiB asked for
    while (message := await guest.recv_skip_pings()) is not None and message[0] != ACK:
        pass  # the TARGET the POST sent
    assert message is not None and message[1] == seq
    text = await scrape(host.url)
    assert sample(text, "balloon_guest_actual_balloon_bytes", guest="vmm") == (256 - 2) << 20
    assert sample(text, "balloon_guest_unused_bytes", guest="vmm") == 100 << 20
    assert sample(text, "balloon_guest_available_bytes", guest="vmm") == 250 << 20
    assert sample(text, "balloon_guest_usable_bytes", guest="vmm") == 180 << 20
    assert 0 <= sample(text, "balloon_guest_stats_age_seconds", guest="vmm") < 60
    assert sample(text, "balloon_target_shortfall_bytes", guest="vmm") == 6 << 20
    assert sample(text, "balloon_guest_target_unreachable", guest="vmm") == 0  # still moving
    await guest.close()


def test_target_unreachable_is_what_the_record_says():
    from types import SimpleNamespace

    from host_daemon.metrics import vmm_vocabulary

    def record(state):
        return SimpleNamespace(id=state or "none", actual_pages=10, stats={}, stats_at=None,
                               target_shortfall_pages=None if state is None else 3,
                               target_state=lambda now, state=state: state)

    families = {f.name: f for f in vmm_vocabulary([record(s) for s in (None, "reached", "moving", "unreachable")], 0.0)}
    values = {s.labels["guest"]: s.value for s in families["balloon_guest_target_unreachable"].samples}
    assert values == {"none": 0, "reached": 0, "moving": 0, "unreachable": 1}
    shortfall = {s.labels["guest"]: s.value for s in families["balloon_target_shortfall_bytes"].samples}
    assert shortfall["none"] == 0 and shortfall["unreachable"] == 3 * 4096

"""The host's /metrics beyond its own series: process and build info, and deprecated aliases."""

from __future__ import annotations

import aiohttp
from hostkit import RawGuest, sample, scrape

from host_daemon.metrics import DEPRECATED
from shared.standard_metrics import version


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
        async with http.post(f"{host.url}/api/v1/guests/renamed/target", json={"size": "32MiB"}) as response:
            assert response.status == 202
    text = await scrape(host.url)
    for old, new in DEPRECATED.items():
        assert sample(text, new, guest="renamed") == 32 << 20
        assert sample(text, old, guest="renamed") == 32 << 20
        assert f"# HELP {old} DEPRECATED: use {new}." in text
    await guest.close()

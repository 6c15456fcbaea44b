"""The /ui dashboard in a real browser (Debian's headless Chromium) against real daemons.

A host with a RAM dir and two shared-RAM guests run as processes (tests/e2e/daemons.py); the
page must show both guests with the numbers the admin API has, draw its charts from more than
one poll, load nothing from anywhere but the host, raise no error, and say "host
unreachable, retrying" when the host goes away, then go live again when it is back.

``BALLOON_UI_SCREENSHOT=docs/ui.png`` also runs the slower screenshot test that makes the
picture in the docs (three guests for about two minutes, a target set half way).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from daemons import Daemons, post_json, wait_for
from headless import Browser, chromium_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MIB = 1 << 20
CHROMIUM, MISSING = chromium_path()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=MISSING)

FLEET_CHARTS = {"reported", "balloon", "reclaimed", "released", "ack-latency"}
ROWS = """[...document.querySelectorAll('#guests tbody tr')].map(tr => ({
    guest: tr.dataset.guest,
    cells: Object.fromEntries([...tr.querySelectorAll('td')].map(td => [td.dataset.field,
        {text: td.textContent, value: td.dataset.value === undefined ? null : Number(td.dataset.value)}]))}))"""
CHARTS = """[...document.querySelectorAll('figure[data-chart]')].map(f => {
    const canvas = f.querySelector('canvas');
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let drawn = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) drawn++;
    return {key: f.dataset.chart, points: Number(f.dataset.points), drawn,
            legend: [...f.querySelectorAll('.u-series')].map(s => s.textContent)};
})"""


@pytest.fixture
def daemons():
    d = Daemons()
    yield d
    d.close()


def _api_guests(host) -> dict[str, dict]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{host.url}/api/v1/guests", timeout=2) as response:
        return {g["id"]: g for g in json.load(response)["guests"]}


def _start(daemons: Daemons, guests: dict[str, str], memory: str):
    ram = daemons.folder / "ram"
    ram.mkdir()
    host = daemons.host("--ram-dir", str(ram))
    for guest, workload in guests.items():
        daemons.guest(guest, "--workload", workload, "--shared-ram", memory=memory)
    wait_for(lambda: all(g.get("reported_bytes", 0) > 0 and g.get("reclaimed_bytes")
                         for g in _api_guests(host).values()) and len(_api_guests(host)) == len(guests),
             60, lambda: f"every guest reporting and reclaimed: {_api_guests(host)}")
    return host


@needs_chromium
async def test_dashboard_shows_every_guest_with_the_hosts_numbers_and_survives_a_host_restart(daemons):
    host = _start(daemons, {"idle": "idle", "churn": "churn"}, "128MiB")
    async with Browser(CHROMIUM) as page:
        await page.goto(f"{host.url}/ui?interval=0.5")
        await page.wait_for("document.body.dataset.state === 'live' && Number(document.body.dataset.polls) >= 4"
                            " && document.querySelectorAll('#guests tbody tr').length === 2",
                            30, "four polls showing two guests")
        # the page went through the /ui -> /ui/ redirect, keeping the query
        assert await page.evaluate("location.pathname + location.search") == "/ui/?interval=0.5"

        rows = {row["guest"]: row["cells"] for row in await page.evaluate(ROWS)}
        api = _api_guests(host)
        assert set(rows) == {"idle", "churn"}
        for guest, cells in rows.items():
            assert cells["connected"]["text"] == "up"  # balloonctl's word
            assert cells["apply_seconds_p99_recent"]["text"].startswith("≤ "), cells  # a bucket edge, said so
            assert cells["memory_bytes"]["value"] == 128 * MIB and cells["memory_bytes"]["text"] == "128 MiB"
            assert 0 < cells["reported_bytes"]["value"] <= 128 * MIB, (guest, cells)
            assert cells["reclaimed_bytes"]["value"] > 0, (guest, cells)
            assert cells["actual_bytes"]["value"] == 128 * MIB  # no balloon yet
            assert cells["window"]["text"].endswith(f"/{api[guest]['window']['size']}"), cells["window"]
        # STATS reach the page: what the guest could still allocate, with the age of the figure
        await page.wait_for("document.querySelector('tr[data-guest=idle] td[data-field=usable_bytes]')"
                            "?.dataset.value > 0", 30, "idle's usable bytes from its STATS")
        rows = {row["guest"]: row["cells"] for row in await page.evaluate(ROWS)}
        api = _api_guests(host)
        # idle converged before the page opened: the page shows exactly the host's number
        assert rows["idle"]["reported_bytes"]["value"] == api["idle"]["reported_bytes"]

        # a balloon target reaches the page (balloon and actual columns, balloon chart)
        post_json(f"{host.url}/api/v1/guests/churn/target", {"size": "32MiB"}, host.admin_token)
        await page.wait_for("document.querySelector('tr[data-guest=churn] td[data-field=inflated_bytes]')"
                            f"?.dataset.value == {32 * MIB}", 30, "churn's 32 MiB balloon on the page")
        rows = {row["guest"]: row["cells"] for row in await page.evaluate(ROWS)}
        assert rows["churn"]["actual_bytes"]["value"] == 96 * MIB
        assert rows["churn"]["target_bytes"]["text"] == "32 MiB"

        charts = {chart["key"]: chart for chart in await page.evaluate(CHARTS)}
        assert set(charts) == FLEET_CHARTS | {"guest:idle", "guest:churn"}
        for key, chart in charts.items():
            assert chart["points"] >= 4, (key, chart)
            assert chart["drawn"] > 0, f"chart {key} drew nothing"
        reported_legend = " ".join(charts["reported"]["legend"])
        assert "idle" in reported_legend and rows["idle"]["reported_bytes"]["text"] in reported_legend
        assert any("32 MiB" in entry for entry in charts["balloon"]["legend"]), charts["balloon"]["legend"]

        assert page.errors() == []
        outside = [url for url in page.requested_urls() if not url.startswith(host.url + "/")]
        assert outside == [], f"the page loaded something from elsewhere: {outside}"
        assert {url.split("?")[0].rsplit("/", 1)[1] for url in page.requested_urls()} >= {
            "uPlot.iife.min.js", "dashboard.js", "guests", "metrics"}

        # host gone: the page says so and keeps its history; host back: live again
        polls = int(await page.evaluate("document.body.dataset.polls"))
        host.kill(signal.SIGKILL)
        await page.wait_for("document.body.dataset.state === 'unreachable'", 15, "the unreachable state")
        assert (await page.evaluate("document.getElementById('status').textContent")).startswith(
            "host unreachable, retrying")
        assert int(await page.evaluate("document.body.dataset.polls")) >= polls
        assert len(await page.evaluate(CHARTS)) == len(charts)
        await asyncio.to_thread(daemons.restart, host)
        await page.wait_for("document.body.dataset.state === 'live' && "
                            "document.querySelectorAll('#guests tbody tr').length === 2", 45,
                            "live again after the host restart")


@needs_chromium
@pytest.mark.skipif(not os.environ.get("BALLOON_UI_SCREENSHOT"),
                    reason="writes the docs' screenshot: set BALLOON_UI_SCREENSHOT=docs/ui.png")
@pytest.mark.timeout(400)
async def test_screenshot_for_the_docs(daemons):
    target = Path(os.environ["BALLOON_UI_SCREENSHOT"]).resolve()
    seconds = float(os.environ.get("BALLOON_UI_SCREENSHOT_SECONDS", "120"))
    host = _start(daemons, {"idle": "idle", "churn": "churn", "burst": "burst"}, "256MiB")
    async with Browser(CHROMIUM, width=1400, height=900) as page:
        await page.goto(f"{host.url}/ui/?interval=1&minutes=2")
        await page.wait_for("Number(document.body.dataset.polls) >= 2", 30, "the first polls")
        await asyncio.sleep(seconds / 2)  # history for the picture, not synchronisation
        post_json(f"{host.url}/api/v1/guests/churn/target", {"size": "96MiB"}, host.admin_token)
        await asyncio.sleep(seconds / 2)
        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(target)
        assert page.errors() == []
    assert target.stat().st_size > 10_000

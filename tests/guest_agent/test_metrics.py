"""The guest's /metrics: every name docs/API.md promises, /healthz, a private registry."""

from __future__ import annotations

import aiohttp
from guest_fakes import FakeBuddy
from prometheus_client.parser import text_string_to_metric_families

from guest_agent.agent import Agent
from guest_agent.balloon import Balloon
from guest_agent.metrics import GuestMetrics, start_http
from guest_agent.reporting import FreePageReporting

REQUIRED = {
    "balloon_guest_memory_bytes", "balloon_guest_free_bytes", "balloon_guest_reported_bytes",
    "balloon_guest_isolated_bytes", "balloon_guest_batches_total", "balloon_guest_ack_latency_seconds_bucket",
    "balloon_guest_window_stall_seconds_total", "balloon_guest_inflight_batches",
    "balloon_guest_reconnects_total", "balloon_guest_connected", "balloon_guest_canary_failures_total",
    "balloon_guest_canary_pages_checked_total", "balloon_guest_inflated_bytes",
    "balloon_guest_target_bytes",
}


async def test_metrics_endpoint_serves_every_promised_name_and_healthz():
    allocator = FakeBuddy(4096)
    metrics = GuestMetrics()
    Agent(allocator=allocator, reporting=FreePageReporting(allocator), balloon=Balloon(allocator),
          metrics=metrics, total_pages=4096)
    server = await start_http(metrics, "127.0.0.1", 0)
    port = server.port
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                text = await response.text()
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200 and await response.text() == "ok"
    finally:
        await server.close()
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    assert REQUIRED <= samples.keys(), REQUIRED - samples.keys()
    assert samples["balloon_guest_memory_bytes"].value == 4096 * 4096
    assert samples["balloon_guest_free_bytes"].value == 4096 * 4096
    assert samples["balloon_guest_connected"].value == 0
    # buckets resolve sub-millisecond acks
    bounds = {float(s.labels["le"]) for family in text_string_to_metric_families(text) for s in family.samples
              if s.name == "balloon_guest_ack_latency_seconds_bucket"}
    assert min(bounds) <= 1e-5 and 1e-3 in bounds


def test_each_agent_has_its_own_registry():
    first, second = GuestMetrics(), GuestMetrics()
    first.reconnects.inc()
    assert first.value("balloon_guest_reconnects_total") == 1
    assert second.value("balloon_guest_reconnects_total") == 0


def test_promtool_accepts_the_guest_metrics():
    import shutil
    import subprocess

    import pytest

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make system-deps installs Debian's prometheus)")
    allocator = FakeBuddy(4096)
    metrics = GuestMetrics()
    Agent(allocator=allocator, reporting=FreePageReporting(allocator), balloon=Balloon(allocator),
          metrics=metrics, total_pages=4096)
    metrics.ack_latency.observe(0.0002)
    result = subprocess.run([promtool, "check", "metrics"], input=metrics.render(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_process_metrics_build_info_and_the_deprecated_target_name():
    from guest_agent.metrics import DEPRECATED
    from host_daemon.standard_metrics import version  # importlib.metadata's answer

    metrics = GuestMetrics()
    metrics.bind(lambda: {"balloon_target_bytes": 12 << 20})
    assert metrics.value("balloon_build_info", {"version": version()}) == 1
    assert metrics.value("process_resident_memory_bytes") > 0
    assert metrics.value("balloon_guest_target_bytes") == 12 << 20
    for old, new in DEPRECATED.items():
        assert metrics.value(f"balloon_guest_{old}") == metrics.value(f"balloon_guest_{new}")
    text = metrics.render().decode()
    assert "# HELP balloon_guest_balloon_target_bytes DEPRECATED: use balloon_guest_target_bytes." in text


async def _exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or 2 s of silence for a kept-alive connection)."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2.0):
            chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


async def test_healthz_503_unknown_path_404_post_405_head_and_keep_alive():
    healthy = [False]
    metrics = GuestMetrics()
    server = await start_http(metrics, "127.0.0.1", 0, healthy=lambda: healthy[0])
    try:
        down = await _exchange(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert down.startswith(b"HTTP/1.1 503 ") and down.endswith(b"unhealthy")
        healthy[0] = True
        # two requests on one HTTP/1.1 connection, the second says close: two answers, then EOF
        both = await _exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                                             b"GET /metrics?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
        first, _, rest = both.partition(b"\r\n\r\nok")
        assert first.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 2" in first
        assert rest.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/plain; version=" in rest
        assert b"balloon_guest_connected" in rest
        missing = await _exchange(server.port, b"GET /ui HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404 ")
        post = await _exchange(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
        assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post and b"Connection: close" in post
        head = await _exchange(server.port, b"HEAD /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # no body
        garbage = await _exchange(server.port, b"hello\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")
    finally:
        await server.close()


async def test_a_taken_port_is_an_oserror_and_close_ends_kept_alive_connections():
    import asyncio
    import errno

    import pytest

    metrics = GuestMetrics()
    server = await start_http(metrics, "127.0.0.1", 0)
    with pytest.raises(OSError) as taken:
        await start_http(metrics, "127.0.0.1", server.port)
    assert taken.value.errno == errno.EADDRINUSE
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
    assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200 ")
    await asyncio.wait_for(server.close(), 5)  # does not wait for the idle client
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


def test_the_page_parses_as_prometheus_client_reads_it_with_every_value_and_escape():
    """The guest writes the text format itself (guest_agent/metrics.py says why); the host's
    library reads it back: types, label escapes, cumulative buckets, _count and _sum."""
    metrics = GuestMetrics()
    metrics.bind(lambda: {"memory_bytes": 1 << 30, "connected": 1})
    metrics.protocol_errors.labels('odd "code"\\x\nnext').inc(2)
    metrics.pages.labels("report").inc(512)
    for seconds in (0.00002, 0.0002, 0.0002, 30.0):
        metrics.ack_latency.observe(seconds)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["balloon_guest_protocol_errors"].type == "counter"
    (error,) = families["balloon_guest_protocol_errors"].samples
    assert error.labels == {"code": 'odd "code"\\x\nnext'} and error.value == 2
    pages = {s.labels["kind"]: s.value for s in families["balloon_guest_pages"].samples}
    assert pages == {"report": 512, "reuse": 0, "inflate": 0, "deflate": 0, "hint": 0}
    histogram = families["balloon_guest_ack_latency_seconds"]
    assert histogram.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert buckets["1e-05"] == 0 and buckets["2.5e-05"] == 1 and buckets["0.00025"] == 3
    assert buckets["10.0"] == 3 and buckets["+Inf"] == 4
    totals = {s.name: s.value for s in histogram.samples if not s.name.endswith("_bucket")}
    assert totals["balloon_guest_ack_latency_seconds_count"] == 4
    assert abs(totals["balloon_guest_ack_latency_seconds_sum"] - 30.00042) < 1e-9
    assert families["balloon_guest_memory_bytes"].samples[0].value == 1 << 30
    assert families["balloon_guest_connected"].type == "gauge"
    assert families["process_cpu_seconds"].type == "counter"
    generations = {s.labels["generation"] for s in families["python_gc_collections"].samples}
    assert generations == {"0", "1", "2"}
    (info,) = families["python_info"].samples
    assert info.labels["implementation"] == "CPython" and info.value == 1


def test_counters_refuse_to_go_down_and_wrong_label_counts():
    import pytest

    metrics = GuestMetrics()
    with pytest.raises(ValueError):
        metrics.reconnects.inc(-1)
    with pytest.raises(ValueError):
        metrics.batches.labels("report", "extra")
    assert metrics.value("balloon_guest_reconnects_total") == 0

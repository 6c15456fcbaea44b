"""The guest agent runs inside the guest whose memory it reclaims: it loads only what it uses.

What ``balloon-guest`` loads must not include the host's or the tools' dependencies
(pyproject's ``host`` and ``tools`` extras: JIT, tracker sets, terminal UI, aiohttp,
prometheus_client, uvloop) nor what those used to drag in (OpenSSL through ``ssl`` and
``_hashlib``, ``http.server``, ``urllib.request``, ``importlib.metadata``, numpy.random).
Checked in fresh interpreters, so nothing imported by the test run counts, and an idle agent
connected to a host is held to its RSS budget (docs/PERFORMANCE.md "Guest agent footprint").
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shared.messages import Ack, ReceivedBatch, Welcome
from shared.protocol import HostConnection, negotiate_features

REPO = Path(__file__).resolve().parents[2]
NOT_IN_THE_GUEST = ("numba", "llvmlite", "pyroaring", "rich", "hdrh", "host_daemon", "aiohttp", "multidict",
                    "yarl", "prometheus_client", "uvloop", "qemu")
#: stdlib modules that only the above brought in, each worth hundreds of KiB to MiB of RSS
HEAVY_STDLIB = ("ssl", "_ssl", "_hashlib", "http.server", "http.client", "urllib.request", "wsgiref", "email",
                "importlib.metadata", "numpy.random")
#: MiB of VmRSS for an idle simulated 1 GiB guest, connected, after its first reporting pass
#: and a scrape (64 with aiohttp and prometheus_client). A regression guard, not the target: the target (40 MiB, issue 19) is judged by ``make bench``
#: (bench/footprint.py prints met/missed). The same idle guest measured 38.8-40.3 MiB across runs
#: and machines (page cache sharing of numpy's libraries, allocator state), so a test at exactly
#: the target fails on noise; 2 MiB above it still catches any new module in the guest's graph.
RSS_BUDGET_MIB = 42

# What balloon-guest does before it imports anything (guest_agent/entry.py), then the sim
# source built, its workload stepped and the metrics page rendered: the run time's imports.
LOADED = """
import json, sys
from guest_agent import entry
for name in entry.OPENSSL_MODULES:
    sys.modules.setdefault(name, None)
from guest_agent import cli
from guest_agent.metrics import GuestMetrics
from guest_agent.settings import parse_settings

for argv in ([], ["--source", "procfs", "--memory", "64MiB"]):
    settings = parse_settings(["--connect", "unix:/nonexistent", "--memory", "64MiB", *argv], {})
    metrics = GuestMetrics()
    agent, _ = cli.build_agent(settings, metrics)
    if agent.workload is not None:
        agent.workload.step(0.0)
    metrics.render()
print(json.dumps(sorted(name for name, module in sys.modules.items() if module is not None)))
"""


def _loaded() -> set[str]:
    result = subprocess.run([sys.executable, "-c", LOADED], capture_output=True, text=True, timeout=60,
                            check=True, cwd=REPO)
    return set(json.loads(result.stdout))


def test_the_guest_loads_none_of_the_host_or_tool_dependencies():
    loaded = _loaded()
    top = {name.split(".")[0] for name in loaded}
    assert not top & set(NOT_IN_THE_GUEST), sorted(top & set(NOT_IN_THE_GUEST))
    heavy = {name for name in HEAVY_STDLIB if name in loaded}
    assert not heavy, sorted(heavy)
    assert {"msgpack", "numpy", "shared", "guest_agent.httpd"} <= loaded | top  # and it did build the agent


def test_the_entry_point_keeps_openssl_out_before_asyncio_loads():
    """balloon-guest exits 2 on a bad setting after parsing: by then asyncio is imported, without ssl."""
    code = ("import sys; from guest_agent.entry import main, fix_mmap_threshold; code = main(['--memory', '3MiB']); "
            "print(sys.modules.get('ssl'), 'asyncio' in sys.modules, code, fix_mmap_threshold())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    # and glibc took the fixed mmap threshold (freed scan buffers go back to the guest)
    assert result.stdout.split() == ["None", "True", "2", "True"], result.stdout + result.stderr


def test_the_base_install_does_not_pull_the_host_dependencies():
    """``pip install .`` (what a guest installs) gets the base dependencies only."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=;\s\[]", requirement)[0].lower() for requirement in project["dependencies"]}
    assert base == {"msgpack", "numpy"}, base
    host = {re.split(r"[<>=;\s\[]", requirement)[0].lower() for requirement in project["optional-dependencies"]["host"]}
    assert {"aiohttp", "prometheus-client", "uvloop"} <= host
    assert project["scripts"]["balloon-guest"] == "guest_agent.entry:main"


def test_no_module_of_the_guest_or_shared_core_imports_aiohttp():
    pattern = re.compile(r"^\s*(import|from)\s+(aiohttp|prometheus_client|uvloop)\b", re.M)
    offenders = [str(path.relative_to(REPO)) for folder in ("guest_agent", "shared") for path in (REPO / folder).rglob("*.py")
                 if pattern.search(path.read_text())]
    # guest_agent/load is balloon-load, a tool (the tools extra): uvloop when installed
    assert [p for p in offenders if not p.startswith("guest_agent/load/")] == [], offenders


async def _scripted_host(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """WELCOME, then an ACK for every batch: the guest reports its free memory once and idles."""
    conn = HostConnection()
    while conn.hello is None:
        data = await reader.read(65536)
        if not data:
            return
        conn.receive_data(data)
        list(conn.events())
    writer.write(conn.send(Welcome(window=16, max_ranges=4096,
                                   features=negotiate_features(conn.hello.features, ("ranges52", "stats")))))
    while data := await reader.read(65536):
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, ReceivedBatch):
                writer.write(conn.send(Ack(event.seq, 0)))
        await writer.drain()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else -1.0


async def _get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    body = (await reader.read()).decode()
    writer.close()
    return body


@pytest.mark.slow
async def test_an_idle_connected_guest_stays_within_its_rss_budget(tmp_path):
    socket_path = str(tmp_path / "host.sock")
    server = await asyncio.start_unix_server(_scripted_host, socket_path)
    log = tmp_path / "guest.log"
    with open(log, "w") as stderr:
        guest = subprocess.Popen([sys.executable, "-m", "guest_agent", "--connect", f"unix:{socket_path}", "--id", "fp",
                                  "--memory", "1GiB", "--http", "127.0.0.1:0"], cwd=REPO, stderr=stderr,
                                 stdout=subprocess.DEVNULL)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        port = None
        page = ""
        while loop.time() < deadline:
            if port is None and (found := re.search(r"127\.0\.0\.1:(\d+)/metrics", log.read_text())):
                port = int(found.group(1))
            if port is not None:
                page = await _get(port, "/metrics")
                # the first pass reported everything reportable and nothing is isolated or in flight
                if (_metric(page, "balloon_guest_reported_bytes") > 0 and _metric(page, "balloon_guest_isolated_bytes") == 0
                        and _metric(page, "balloon_guest_inflight_batches") == 0):
                    break
            await asyncio.sleep(0.2)
        else:
            pytest.fail(f"the guest did not settle: {page[-300:]} {log.read_text()[-500:]}")
        await _get(port, "/metrics")  # a scrape, as Prometheus would
        status = Path(f"/proc/{guest.pid}/status").read_text()
        rss_mib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
        assert rss_mib <= RSS_BUDGET_MIB, f"idle guest agent VmRSS {rss_mib:.1f} MiB > {RSS_BUDGET_MIB} MiB"
    finally:
        guest.terminate()
        guest.wait(10)
        server.close()
        await server.wait_closed()

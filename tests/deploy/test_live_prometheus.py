"""A real Prometheus (Debian's binary) on 127.0.0.1, scraping a running balloon-host and two
guests with the shipped scrape config (targets rewritten to this test's ports, 1 s intervals) and
the shipped rule files; then every dashboard query, every recording rule and every alert's watched
series is evaluated through the HTTP API and must return data.

Alerts are quiet on a healthy stack, so "the alert expression returns data" would be the wrong
bar. Instead each alert expression must evaluate without error, and every series it compares
(the operands left of its threshold, found by `threshold_operands`) must return data. The one
alert the test provokes on purpose — a rogue client sends garbage, the host counts a protocol
error — must really be firing.

make test runs this with a short history (a few scrapes); make deploy-test sets
BALLOON_LIVE_SCRAPES for a longer one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from deployfiles import (
    VENV_BIN,
    daemons_available,
    dashboard_queries,
    free_port,
    http_get,
    label_values_as_promql,
    load_rules,
    load_stack,
    referenced_balloon_metrics,
    scrape,
    threshold_operands,
    tool,
    unavailable,
    variable_queries,
    wait_for,
)

from shared.messages import Ack, Bye, Report, Welcome
from shared.protocol import GuestConnection
from shared.ranges import encode_ranges

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# "localhost" is scraped as localhost:PORT with no explicit guest label, so the shipped config's
# fallback relabelling (guest := host part of the address) is what names it.
GUESTS = {"g1": "idle", "g2": "churn", "localhost": "burst"}
UNLABELLED = "localhost"
ROGUE = "rogue"
SCRAPES = int(os.environ.get("BALLOON_LIVE_SCRAPES", "3"))
# What Grafana would use for $__rate_interval at a 1 s scrape interval is 4 s; a wider window keeps
# counters that moved at start-up visible for the whole test.
RATE_INTERVAL = "30s"
DATA_TIMEOUT = 45.0


@dataclass
class Stack:
    tmp: Path
    host_url: str
    guest_urls: dict[str, str]
    prometheus_url: str
    rogue_error_code: str
    rogue_rejected_pages: int
    processes: list = field(default_factory=list)

    def query(self, expr: str) -> list[dict]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = json.loads(http_get(url))
        except OSError as error:  # HTTP 400 for a bad expression: read Prometheus' reason
            detail = getattr(error, "read", lambda: b"")().decode(errors="replace")
            raise AssertionError(f"query failed: {expr}\n{error} {detail}") from None
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def query_range(self, expr: str, seconds: int = 60) -> list[dict]:
        """As a Grafana time series panel asks: the last minute at a 1 s step."""
        import time

        now = time.time()
        params = {"query": expr, "start": now - seconds, "end": now, "step": "1s"}
        url = f"{self.prometheus_url}/api/v1/query_range?" + urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(url))
        except OSError as error:
            detail = getattr(error, "read", lambda: b"")().decode(errors="replace")
            raise AssertionError(f"range query failed: {expr}\n{error} {detail}") from None
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def api(self, path: str) -> dict:
        body = json.loads(http_get(f"{self.prometheus_url}{path}"))
        assert body["status"] == "success", body
        return body["data"]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("wb")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _recv_messages(sock: socket.socket, connection: GuestConnection, want: type):
    """Read until a message of type ``want`` arrives (or fail on EOF)."""
    while True:
        for message in connection.events():
            if isinstance(message, want):
                return message
        data = sock.recv(65536)
        assert data, f"host closed the connection before sending {want.__name__}"
        connection.receive_data(data)


class RogueGuest:
    """A protocol-correct guest whose REPORT lies past its RAM: the host skips and counts it.

    Split in two so Prometheus can scrape the guest's fresh series (all zero) between the
    handshake and the bad report: rate() only sees an increase between two samples.
    """

    pages = 1024

    def __init__(self, socket_path: Path):
        self.connection = GuestConnection(ROGUE, pages=self.pages)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(socket_path))
        self.sock.sendall(self.connection.hello())
        _recv_messages(self.sock, self.connection, Welcome)

    def report_out_of_range(self) -> int:
        payload = encode_ranges(np.array([self.pages + 100], dtype=np.uint64), np.array([8], dtype=np.uint64))
        self.sock.sendall(self.connection.send(Report(payload=payload)))
        ack = _recv_messages(self.sock, self.connection, Ack)
        self.sock.sendall(self.connection.send(Bye(reason="test done")))
        self.sock.close()
        return ack.rejected_pages


def _rogue_garbage(socket_path: Path) -> str:
    """Bytes that are not msgpack: the host answers ERROR [15, code, detail] and closes."""
    import msgpack

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(socket_path))
        sock.sendall(b"\xc1" * 16)  # 0xc1 is never used by msgpack
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            data = sock.recv(65536)
            assert data, "host closed without an ERROR"
            unpacker.feed(data)
            for message in unpacker:
                if message[0] == 15:
                    return message[1]


def _prometheus_config(tmp: Path, host_port: int, guest_ports: dict[str, int]) -> Path:
    """The shipped scrape config with this test's targets, 1 s intervals, and the shipped rules
    (what `make stack` runs, at a faster interval)."""
    guests = [(f"{UNLABELLED}:{port}", None) if guest == UNLABELLED else (f"127.0.0.1:{port}", guest)
              for guest, port in guest_ports.items()]
    config = load_stack().prometheus_config(f"127.0.0.1:{host_port}", guests, interval="1s")
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = daemons_available()
    if reason:
        unavailable(f"daemons not runnable: {reason}")
    prometheus = tool("prometheus")
    tmp = tmp_path_factory.mktemp("live")
    shm = Path("/dev/shm")
    ram = Path(tempfile.mkdtemp(prefix="balloon-live-", dir=shm if os.access(shm, os.W_OK) else tmp))
    processes: list[subprocess.Popen] = []
    try:
        socket_path = tmp / "host.sock"
        host_port = free_port()
        host_url = f"http://127.0.0.1:{host_port}"
        processes.append(_start([str(VENV_BIN / "balloon-host"), "--listen", f"unix:{socket_path}",
                                 "--http", f"127.0.0.1:{host_port}", "--ram-dir", str(ram),
                                 "--log-format", "json",
                                 # an automatic policy (so BalloonPolicyStarved's series exist) with
                                 # a budget far above the guests: it has no reason to move a balloon
                                 "--policy", "balance", "--guest-memory-budget", "64GiB",
                                 # the rogue guest ends with BYE; an open guest that said BYE is
                                 # forgotten after --forget-after (10 s by default), and the long
                                 # run (make deploy-test) still queries its series after that
                                 "--forget-after", "10m"], tmp / "host.log"))
        wait_for(lambda: http_get(f"{host_url}/readyz"), 30, "balloon-host /readyz")
        guest_ports = {guest: free_port() for guest in GUESTS}
        for guest, workload in GUESTS.items():
            processes.append(_start([str(VENV_BIN / "balloon-guest"), "--connect", f"unix:{socket_path}",
                                     "--id", guest, "--memory", "128MiB", "--workload", workload, "--shared-ram",
                                     "--http", f"127.0.0.1:{guest_ports[guest]}"], tmp / f"{guest}.log"))
        guest_urls = {guest: f"http://127.0.0.1:{port}" for guest, port in guest_ports.items()}
        for guest, url in guest_urls.items():
            wait_for(lambda url=url: http_get(f"{url}/healthz"), 30, f"{guest} /healthz")

        prometheus_port = free_port()
        processes.append(_start([prometheus, f"--config.file={_prometheus_config(tmp, host_port, guest_ports)}",
                                 f"--storage.tsdb.path={tmp / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
                                tmp / "prometheus.log"))
        live = Stack(tmp, host_url, guest_urls, f"http://127.0.0.1:{prometheus_port}", "", 0, processes)
        wait_for(lambda: http_get(f"{live.prometheus_url}/-/ready"), 60, "prometheus /-/ready")

        def all_targets_up():
            targets = live.api("/api/v1/targets")["activeTargets"]
            return len(targets) == 1 + len(GUESTS) and all(t["health"] == "up" for t in targets)

        wait_for(all_targets_up, 60, "every scrape target up")
        # Only now misbehave: a counter must be scraped before and after it moves for rate() to see it.
        rogue = RogueGuest(socket_path)
        wait_for(lambda: live.query(f'balloon_rejected_pages_total{{guest="{ROGUE}"}}'), 30,
                 "the rogue guest's series scraped before its bad report")
        live.rogue_rejected_pages = rogue.report_out_of_range()
        live.rogue_error_code = _rogue_garbage(socket_path)
        # History: at least SCRAPES samples of every target (a poll on Prometheus' own data).
        wait_for(lambda: len(live.query(f"count_over_time(up[1m]) >= {SCRAPES}")) == 1 + len(GUESTS),
                 SCRAPES * 3 + 30, f"{SCRAPES} scrapes of every target")
        yield live
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(ram, ignore_errors=True)
        for log in sorted(tmp.glob("*.log")):
            tail = log.read_text(errors="replace")[-1500:]
            print(f"--- {log.name} ---\n{tail}")


def _all_return_data(stack: Stack, queries: dict[str, str], as_range: bool = False) -> None:
    """Poll until every query returns at least one series; report those that never did."""
    pending = dict(queries)
    run = stack.query_range if as_range else stack.query

    def done():
        for key, expr in list(pending.items()):
            if run(expr):
                del pending[key]
        return not pending

    try:
        wait_for(done, DATA_TIMEOUT, "queries to return data", interval=1.0)
    except pytest.fail.Exception:
        pytest.fail("no data for:\n" + "\n".join(f"  {key}: {expr}" for key, expr in pending.items()))


def _guest_values(stack: Stack) -> list[str]:
    (query,) = variable_queries().values()
    return sorted(series["metric"]["guest"] for series in stack.query(label_values_as_promql(query)))


def test_the_guest_variable_lists_every_guest(stack):
    assert set(_guest_values(stack)) >= set(GUESTS) | {ROGUE}


def _expand(expr: str, all_guests: list[str], guest: str | None = None) -> str:
    """Substitute Grafana's variables the way Grafana would for this query."""
    assert all(re.fullmatch(r"[\w-]+", g) for g in all_guests)
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    if guest is not None:
        expr = expr.replace('"$guest"', f'"{guest}"')
    return expr.replace("$guest", "(" + "|".join(all_guests) + ")")


def test_every_dashboard_query_returns_data(stack):
    """As range queries over the last minute, the way Grafana's panels ask."""
    guests = _guest_values(stack)
    queries = {}
    for query in dashboard_queries():
        if 'guest="$guest"' in query.expr:
            # A panel of the repeated per-guest row: once per guest that runs an agent.
            for guest in GUESTS:
                queries[f"{query.panel} [{query.ref}] guest={guest}"] = _expand(query.expr, guests, guest)
        else:
            queries[f"{query.panel} [{query.ref}]"] = _expand(query.expr, guests)
    assert len(queries) >= 30
    _all_return_data(stack, queries, as_range=True)


def test_every_recording_rule_returns_data_and_is_recorded(stack):
    queries = {}
    for rule in load_rules():
        if rule.kind == "record":
            queries[f"{rule.name} (expression)"] = rule.expr
            queries[f"{rule.name} (recorded)"] = rule.name
    _all_return_data(stack, queries)


def test_every_alert_is_valid_and_the_series_it_watches_exist(stack):
    queries = {}
    for rule in load_rules():
        if rule.kind != "alert":
            continue
        stack.query(rule.expr)  # valid PromQL against real data (raises with Prometheus' reason)
        operands = threshold_operands(rule.expr)
        assert operands, rule.name
        for index, operand in enumerate(operands):
            queries[f"{rule.name} operand {index}"] = operand
    _all_return_data(stack, queries)


def test_every_rule_evaluates_without_error(stack):
    def evaluated():
        rules = [rule for group in stack.api("/api/v1/rules")["groups"] for rule in group["rules"]]
        if any(rule["lastEvaluation"].startswith("0001") for rule in rules):
            return None  # not evaluated yet
        return rules

    rules = wait_for(evaluated, 30, "every rule evaluated once")
    assert len(rules) == len(load_rules())
    bad = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not bad


def test_reported_and_reclaimed_memory_reach_prometheus(stack):
    """Not only series but real numbers: the fleet reports memory and the kernel gave it back."""
    wait_for(lambda: stack.query("sum(balloon_reported_bytes) > 0") and stack.query("sum(balloon_reclaimed_bytes) > 0"),
             DATA_TIMEOUT, "reported and reclaimed bytes above 0 in Prometheus")


def test_the_provoked_protocol_error_alert_fires(stack):
    assert stack.rogue_rejected_pages == 8

    def firing():
        alerts = stack.api("/api/v1/alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "BalloonProtocolErrors" and a["state"] == "firing"]

    (alert,) = wait_for(firing, 30, "BalloonProtocolErrors firing")
    assert alert["labels"]["code"] == stack.rogue_error_code
    assert alert["annotations"]["runbook_url"].endswith("#balloonprotocolerrors")
    # The rogue's out-of-range pages reached the rejected-pages rate the dashboard shows.
    rejected = stack.query(f'guest_reason:balloon_rejected_pages:rate5m{{guest="{ROGUE}"}} > 0')
    assert rejected and rejected[0]["metric"]["reason"]


def test_guest_series_are_labelled_with_the_guest_id(stack):
    """Explicit `guest` labels and the address fallback both name the guest; instance follows."""
    for series in stack.query('up{job="balloon-guest"}'):
        assert series["metric"]["instance"] == series["metric"]["guest"]
    labelled = {s["metric"]["guest"] for s in stack.query('balloon_guest_reported_bytes{job="balloon-guest"}')}
    assert labelled == set(GUESTS)


def test_every_balloon_metric_named_by_dashboard_or_rules_is_exposed(stack):
    exposed = set(scrape(f"{stack.host_url}/metrics"))
    for url in stack.guest_urls.values():
        exposed |= set(scrape(f"{url}/metrics"))
    missing = {name: sorted(uses) for name, uses in referenced_balloon_metrics().items() if name not in exposed}
    assert not missing, f"named by deploy/ but exposed by neither daemon: {missing}"

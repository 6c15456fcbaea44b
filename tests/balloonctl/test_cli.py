"""balloonctl against a real balloon-host subprocess (guests made with balloon-load): what each
command prints and its exit code."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _poll(condition, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError(what)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=0.5) as response:
            return response.status == 200
    except OSError:
        return False


class Host:
    def __init__(self, tmp_path: Path, *extra: str) -> None:
        self.sock = tmp_path / "host.sock"
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.process = subprocess.Popen(
            [str(BIN / "balloon-host"), "--listen", f"unix:{self.sock}", "--http", self.url[7:],
             "--log-level", "warning", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _poll(lambda: self.process.poll() is not None or _ready(self.url), what="balloon-host")
        assert self.process.poll() is None
        self.address = f"unix:{self.sock}"

    def load(self, *args: str, background: bool = False):
        command = [str(BIN / "balloon-load"), "--connect", self.address, "--quiet", *args]
        if background:
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def host(tmp_path):
    if not (Path(__file__).parents[2] / "host_daemon" / "cli.py").exists():
        pytest.skip("balloon-host is not there yet")
    token = tmp_path / "admin.token"
    token.write_text("s3cret-admin-token\n")
    made = Host(tmp_path, "--admin-token-file", str(token))
    made.token_file = token
    yield made
    made.stop()


def ctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "balloonctl"), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_status_table_and_json(host):
    host.load("--guests", "2", "--batches", "20")
    table = ctl("--host", host.url, "status")
    assert table.returncode == 0, table.stderr
    assert "load-0" in table.stdout and "load-1" in table.stdout
    assert "0 guests up (2 down)" in table.stdout  # balloon-load's guests said BYE: not in the totals
    answer = ctl("status", "--json", env={"BALLOON_CTL_HOST": host.url})  # the env var names the host
    guests = {g["id"]: g for g in json.loads(answer.stdout)["guests"]}
    assert set(guests) == {"load-0", "load-1"}
    assert guests["load-0"]["reported_bytes"] > 0 and guests["load-0"]["batches"]["report"] == 20
    one = json.loads(ctl("--host", host.url, "status", "load-1", "--json").stdout)
    assert one["id"] == "load-1"


def test_unknown_guest_and_unreachable_host_fail_in_one_line(host):
    missing = ctl("--host", host.url, "status", "nobody")
    assert missing.returncode == 1 and "404" in missing.stderr and "Traceback" not in missing.stderr
    down = ctl("--host", f"http://127.0.0.1:{_free_port()}", "status")
    assert down.returncode == 1
    assert down.stderr.count("\n") == 1 and "cannot reach the host" in down.stderr
    assert ctl("--host", host.url, "target", "x", "lots").returncode == 2  # not a size


def test_target_needs_the_admin_token(host):
    host.load("--batches", "5")
    refused = ctl("--host", host.url, "target", "load-0", "128MiB")  # this host reads --admin-token-file
    assert refused.returncode == 1 and "no admin token at" in refused.stderr and "--token-file" in refused.stderr
    wrong = host.token_file.parent / "wrong.token"
    wrong.write_text("not-the-admin-token\n")
    refused = ctl("--host", host.url, "target", "load-0", "128MiB", "--token-file", str(wrong))
    assert refused.returncode == 1 and "403" in refused.stderr and "wrong admin token" in refused.stderr
    done = ctl("--host", host.url, "target", "load-0", "128MiB", "--token-file", str(host.token_file))
    assert done.returncode == 0, done.stderr
    assert "32768 pages" in done.stdout
    too_big = ctl("--host", host.url, "target", "load-0", "2GiB", "--token-file", str(host.token_file))
    assert too_big.returncode == 2 and too_big.stderr.count("\n") == 1
    assert "a balloon of 2GiB exceeds the guest's 1GiB of memory" in too_big.stderr
    guest = json.loads(ctl("--host", host.url, "status", "load-0", "--json").stdout)
    assert guest["target_bytes"] == 128 << 20


def test_top_shows_rates_from_successive_polls(host):
    load = host.load("--guests", "2", "--rate", "200", "--duration", "20s", background=True)
    try:
        _poll(lambda: len(json.loads(ctl("--host", host.url, "status", "--json").stdout)["guests"]) == 2,
              what="two guests")
        lines = ctl("--host", host.url, "top", "--iterations", "2", "--interval", "0.5s", "--json")
        assert lines.returncode == 0, lines.stderr
        first, second = (json.loads(line) for line in lines.stdout.splitlines())
        assert all(g["batches_per_s"] is None for g in first["guests"])  # no rate from one poll
        rates = [g["batches_per_s"] for g in second["guests"]]
        assert len(rates) == 2 and all(rate > 0 for rate in rates)
        assert all(g["report_bytes_per_s"] > 0 for g in second["guests"])
        table = ctl("--host", host.url, "top", "--iterations", "1")
        assert table.returncode == 0 and "load-0" in table.stdout and "batches/s" in table.stdout
        assert table.stdout.endswith("\n") and "\x1b" not in table.stdout  # plain text in a pipe
        narrow = ctl("--host", host.url, "top", "--iterations", "1", env={"COLUMNS": "80"})
        lines = narrow.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), lines
        rows = [line for line in lines if line.startswith("load-")]
        assert [row.split()[0] for row in rows] == ["load-0", "load-1"]
        assert all("MiB" in row or "GiB" in row for row in rows)  # their numbers too
    finally:
        load.terminate()
        load.wait(timeout=10)


def test_hint_starts_a_command_on_a_hinting_guest(host):
    load = host.load("--kind", "hint", "--rate", "50", "--duration", "20s", background=True)
    try:
        _poll(lambda: ctl("--host", host.url, "status", "load-0", "--json").returncode == 0, what="guest")
        started = ctl("--host", host.url, "hint", "load-0", "--token-file", str(host.token_file), "--json")
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["cmd_id"] >= 1

        def hinted() -> bool:  # the load guest tags its next hints with the new cmd_id
            answer = ctl("--host", host.url, "status", "load-0", "--json")
            return json.loads(answer.stdout).get("hinted_pages", 0) > 0

        _poll(hinted, what="hints for the new command")
    finally:
        load.terminate()
        load.wait(timeout=10)


def test_top_keeps_running_while_the_host_is_down_and_says_so():
    down = ctl("--host", f"http://127.0.0.1:{_free_port()}", "top", "--iterations", "2", "--interval", "100ms")
    assert down.returncode == 1, down.stderr  # a script sees that the host was not there
    frames = [line for line in down.stdout.splitlines() if line]
    assert len(frames) == 2 and all("host unreachable, retrying every 0.1s" in f for f in frames)
    narrow = ctl("--host", f"http://127.0.0.1:{_free_port()}", "top", "--iterations", "1", env={"COLUMNS": "60"})
    lines = [line for line in narrow.stdout.splitlines() if line]
    assert len(lines) > 1 and all(len(line) <= 60 for line in lines) and "…" not in narrow.stdout
    assert "Connection refused" in " ".join(lines)  # wrapped, not cut: the reason is still there
    as_json = ctl("--host", f"http://127.0.0.1:{_free_port()}", "top", "--iterations", "1", "--json")
    assert json.loads(as_json.stdout)["guests"] is None and "error" in json.loads(as_json.stdout)


def test_setmem_sets_the_memory_the_guest_keeps(host):
    host.load("--batches", "5")  # load-0 announces 1GiB
    done = ctl("--host", host.url, "setmem", "load-0", "768M", "--token-file", str(host.token_file))
    assert done.returncode == 0, done.stderr
    assert "keeps 768MiB of 1GiB (balloon target 256MiB" in done.stdout
    guest = json.loads(ctl("--host", host.url, "status", "load-0", "--json").stdout)
    assert guest["target_bytes"] == 256 << 20 and guest["target_actual_bytes"] == 768 << 20
    assert guest["actual_bytes"] == guest["memory_bytes"] - guest["inflated_bytes"]
    too_much = ctl("--host", host.url, "setmem", "load-0", "2G", "--token-file", str(host.token_file))
    assert too_much.returncode == 2 and too_much.stderr.count("\n") == 1 and "cannot keep 2GiB" in too_much.stderr
    for nothing in ("0", "8MiB"):  # no guest can keep that: a typo, not a request
        refused = ctl("--host", host.url, "setmem", "load-0", nothing, "--token-file", str(host.token_file))
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "no guest runs in less than 16MiB" in refused.stderr
    whole = ctl("--host", host.url, "target", "load-0", "1GiB", "--token-file", str(host.token_file))
    assert whole.returncode == 2 and "would keep 0B" in whole.stderr
    ambiguous = ctl("--host", host.url, "setmem", "load-0", "512MB")
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr and ambiguous.stderr.count("\n") == 1


def test_policy_shows_each_decision_with_its_reason(tmp_path):
    host = Host(tmp_path, "--policy", "mom", "--policy-interval", "0.2s")
    try:
        host.load("--guests", "2", "--batches", "5", "--rate", "20", background=True)
        _poll(lambda: len(json.loads(ctl("--host", host.url, "policy", "--json").stdout)["decisions"]) == 2,
              what="two decisions")
        table = ctl("--host", host.url, "policy")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].startswith("policy mom (meminfo, every 0.2s): host available")
        assert lines[1].split()[:2] == ["guest", "decision"] and "reason" in lines[1]
        # load guests send no STATS (and end after their batches): the policy refuses to act blind
        assert all(line.split()[1] == "hold" and "rail:freeze" in line for line in lines[2:]), table.stdout
        one = json.loads(ctl("--host", host.url, "policy", "load-0", "--json").stdout)
        assert [d["guest"] for d in one["decisions"]] == ["load-0"]
        missing = ctl("--host", host.url, "policy", "nope")
        assert missing.returncode == 1 and "no decision for guest 'nope'" in missing.stderr
    finally:
        host.stop()


def test_load_guests_say_bye_and_the_host_forgets_them_soon(host):
    """Item 7: balloon-load ends every guest with BYE; an open guest that said BYE is forgotten
    after the host's --forget-after (10 s by default), not kept for --retention."""
    host.load("--guests", "4", "--batches", "20")
    guests = json.loads(ctl("--host", host.url, "status", "--json").stdout)["guests"]
    assert {g["id"] for g in guests} <= {f"load-{i}" for i in range(4)}
    assert not any(g["connected"] for g in guests)
    _poll(lambda: json.loads(ctl("--host", host.url, "status", "--json").stdout)["guests"] == [], timeout=30,
          what="the host forgets the load guests")

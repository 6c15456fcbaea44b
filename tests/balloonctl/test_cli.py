"""balloonctl against a real balloon-host subprocess (guests made with balloon-load)."""

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

from balloonctl.cli import RateTracker, human_bytes, human_seconds, render_table

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


def test_rate_tracker_and_formatting():
    tracker = RateTracker()
    guest = {"id": "g", "batches": {"report": 10}, "pages_total": {"report": 100, "inflate": 0}}
    assert tracker.update([guest], 1.0)["g"]["batches_per_s"] is None
    guest = {"id": "g", "batches": {"report": 30}, "pages_total": {"report": 300, "inflate": 50}}
    rates = tracker.update([guest], 3.0)["g"]
    assert rates["batches_per_s"] == 10.0
    assert rates["report_bytes_per_s"] == 100 * 4096 and rates["inflate_bytes_per_s"] == 25 * 4096
    assert human_bytes(3 << 30) == "3GiB" and human_bytes(None) == "-"
    assert human_seconds(250e-6) == "250µs" and human_seconds(0.0123) == "12.30ms"


def test_a_p99_is_shown_as_the_bucket_edge_it_is():
    from balloonctl.cli import human_bound

    assert [human_bound(v) for v in (25e-6, 250e-6, 2.5e-3, 0.5, 1.0, None)] == [
        "<=25µs", "<=250µs", "<=2.5ms", "<=500ms", "<=1s", "-"]


def test_totals_count_connected_guests_and_titles_wrap_whole():
    """A finished balloon-load guest stays listed (retention) but its memory is not in the totals;
    the title is wrapped between words at 120 columns, never cut with an ellipsis."""
    from balloonctl.cli import status_title, wrap

    guests = [_guest("a"), _guest("gone", connected=False)]
    title = status_title(guests, "http://127.0.0.1:9470")
    assert title == "balloon-host 127.0.0.1:9470: 1 guest up (1 down); memory 256MiB, actual 192MiB, reported 150MiB"
    long = "12:00:00 " + title + "; 12.5 batches/s (every 1s, q quits)" + " and more words" * 5
    lines = wrap(long, 120)
    assert len(lines) >= 2 and all(len(line) <= 120 for line in lines)
    assert " ".join(part.strip() for part in lines) == long


def _guest(gid: str, **extra) -> dict:
    return {"id": gid, "connected": True, "memory_bytes": 256 << 20, "actual_bytes": 192 << 20,
            "inflated_bytes": 64 << 20, "target_bytes": 64 << 20, "target_state": "reached",
            "reported_bytes": 150 << 20, "unused_bytes": 170 << 20, "stats_age_seconds": 2.0,
            "reclaimed_bytes": None, "window": {"size": 16, "in_use": 0}, "apply_seconds_p99": 2e-5,
            "apply_seconds_p99_recent": 2.5e-5, "usable_bytes": 180 << 20, "batches": {"report": 7}, "rejected_pages": {}, "errors": 0, "last_message_at": None, **extra}


@pytest.mark.parametrize("width", [80, 60, 40])
def test_narrow_terminals_drop_whole_columns_never_ids_or_digits(width):
    guests = [_guest("a-rather-long-guest-name-01"), _guest("burst"),
              _guest("churn", target_state="unreachable", target_bytes=250 << 20)]
    rates = {"burst": {"batches_per_s": 12.5, "report_bytes_per_s": 4 << 20, "inflate_bytes_per_s": 0}}
    lines = render_table(guests, rates, width)
    assert all(len(line) <= width for line in lines if not line.startswith("a-rather")), lines
    body = lines[1:4]
    assert [line.split()[0] for line in body] == ["a-rather-long-guest-name-01", "burst", "churn"]
    header = lines[0].split()
    if width >= 80:  # the numbers that matter: kept at 80 columns
        assert {"guest", "actual", "balloon", "reported", "memory", "target"} <= set(header)
        assert "usable" in render_table(guests[1:], rates, width)[0]  # short ids leave room for more
        assert "250MiB!" in body[2] and "192MiB" in body[0]
    assert any(line.startswith("(hidden for width:") for line in lines)
    assert "…" not in "".join(body)
    assert render_table(guests, rates, None)[0].split()[:3] == ["guest", "up", "memory"]  # pipe: all columns
    assert len(render_table(guests, rates, None)[0].split()) > len(header)



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


def test_render_policy_drops_columns_on_narrow_terminals():
    from balloonctl.cli import render_policy

    answer = {"policy": "balance", "source": "budget", "guest_memory_budget": 1 << 30, "interval_s": 5.0,
              "last_tick_age_s": 1.0, "host": {"available_bytes": 1 << 28, "total_bytes": 1 << 30,
                                               "free_ratio": 0.25, "pressure_some": 0.0, "pressure_full": 0.0},
              "decisions": [{"guest": "vm-with-a-long-name", "direction": "hold", "target_bytes": 0,
                             "previous_bytes": 0, "reason": "blocked", "rule": "rail:blocker",
                             "detail": {"blocked_for_s": 42.0, "wanted": "inflate", "available_bytes": 1 << 29,
                                        "floor_bytes": 1 << 28, "balloon_bytes": 0}}]}
    wide = render_policy(answer, None)
    assert "inflate held 42s more" in wide[2] and "budget 1GiB" in wide[0]
    answer["decisions"][0]["detail"].update(backoff_s=200.0, emergencies=2)
    assert "inflate held 42s more (backoff 3m after 2 emergency deflates)" in render_policy(answer, None)[2]
    narrow = render_policy(answer, 40)
    header = next(i for i, line in enumerate(narrow) if line.startswith("guest"))  # after the wrapped title
    assert header > 1 and all(len(line) <= 40 for line in narrow[:header])
    row = narrow[header + 1]
    assert "vm-with-a-long-name" in row and "blocked" in row and "note" not in narrow[header]


def test_load_guests_say_bye_and_the_host_forgets_them_soon(host):
    """Item 7: balloon-load ends every guest with BYE; an open guest that said BYE is forgotten
    after the host's --forget-after (10 s by default), not kept for --retention."""
    host.load("--guests", "4", "--batches", "20")
    guests = json.loads(ctl("--host", host.url, "status", "--json").stdout)["guests"]
    assert {g["id"] for g in guests} <= {f"load-{i}" for i in range(4)}
    assert not any(g["connected"] for g in guests)
    _poll(lambda: json.loads(ctl("--host", host.url, "status", "--json").stdout)["guests"] == [], timeout=30,
          what="the host forgets the load guests")


def test_status_shows_the_driver_and_the_vmm_link():
    from balloonctl.cli import render_table

    base = {"memory_bytes": 1 << 30, "actual_bytes": 1 << 30, "inflated_bytes": 0, "reported_bytes": 0}
    guests = [
        {**base, "id": "agent1", "connected": True, "driver": "agent", "vmm": None},
        {**base, "id": "stock1", "connected": False, "driver": "virtio-balloon",
         "vmm": {"state": "connected", "discard_blocked": None}},
        {**base, "id": "vm3", "connected": True, "driver": "agent",
         "vmm": {"state": "connected", "discard_blocked": "migration"}},
        {**base, "id": "vm4", "connected": False, "driver": None, "vmm": {"state": "unreachable"}},
    ]
    lines = render_table(guests, None, None)
    header = lines[0].split()
    rows = {line.split()[0]: dict(zip(header, line.split(), strict=False)) for line in lines[1:]}
    assert rows["agent1"]["up"] == "up" and rows["agent1"]["vmm"] == "-" and rows["agent1"]["driver"] == "agent"
    assert rows["stock1"]["up"] == "vmm" and rows["stock1"]["vmm"] == "ok" and rows["stock1"]["driver"] == "virtio"
    assert rows["vm3"]["vmm"] == "held:migration"
    assert rows["vm4"]["up"] == "down" and rows["vm4"]["vmm"] == "down"

"""balloon-load end to end: a real subprocess against a bare host, a broken host and the real host."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from guest_agent.load.report import JSON_KEYS

BIN = Path(sys.executable).parent


def wait_for(condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def load_json(path):
    return json.loads(path.read_text())


def check_sane(data: dict, guests: int) -> None:
    for key in JSON_KEYS:
        assert key in data, key
    assert data["guests"] == guests
    assert data["batches"] > 0 and data["batches_per_s"] > 0
    assert data["ranges_per_s"] > data["batches_per_s"]  # several ranges per batch
    assert data["pages_per_s"] >= data["ranges_per_s"] and data["wire_bytes_per_s"] > 0
    latency = data["latency_s"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p999"] <= latency["max"]
    assert data["duration_s"] > 0 and data["window_stall_s"] >= 0


def test_closed_loop_against_a_bare_host(bare_host, load_cli, tmp_path):
    address = bare_host()
    out, plot = tmp_path / "out.json", tmp_path / "plot.png"
    result = load_cli("--connect", address, "--guests", "4", "--duration", "1.5s", "--json", str(out),
                      "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    data = load_json(out)
    check_sane(data, 4)
    assert data["errors"] == {} and data["reconnects"] == 0 and data["offered_rate"] is None
    assert "Ack latency" in result.stdout and "batches/s" in result.stdout
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    # mean, stdev and the full HdrHistogram distribution; when and with what
    latency = data["latency_s"]
    assert latency["min"] <= latency["mean"] <= latency["max"] and latency["stdev"] >= 0
    distribution = data["latency_distribution"]
    assert distribution[0]["percentile"] == 0 and distribution[-1]["percentile"] == 100
    assert [row["value_s"] for row in distribution] == sorted(row["value_s"] for row in distribution)
    assert distribution[-1]["count"] == data["batches"] and distribution[-1]["value_s"] == latency["max"]
    assert data["timestamp"].endswith("+00:00") and data["version"] not in ("", None)
    assert "Ack latency distribution (HdrHistogram)" in result.stdout and "stdev" in result.stdout
    # the last second of a 1.5 s run is half a second: its rate is over what it covered
    last = data["timeline"][-1]
    assert 0 < last["seconds"] < 1 and last["batches_per_s"] == last["batches"] / last["seconds"]
    assert all(row["seconds"] == 1 for row in data["timeline"][:-1])


def test_batches_per_guest_are_exact_and_processes_merge(bare_host, load_cli, tmp_path):
    address = bare_host()
    out = tmp_path / "out.json"
    result = load_cli("--connect", address, "--guests", "4", "--processes", "2", "--batches", "300",
                      "--batch-ranges", "8", "--json", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    data = load_json(out)
    check_sane(data, 4)
    assert data["batches"] == data["sent"] == 4 * 300  # both processes' counts added
    assert data["ranges"] == 4 * 300 * 8
    assert sum(row["batches"] for row in data["timeline"]) == 1200  # and their timelines merged
    assert data["sessions"] == 4


def test_open_loop_offers_the_rate(bare_host, load_cli, tmp_path):
    address = bare_host()
    out = tmp_path / "out.json"
    result = load_cli("--connect", address, "--guests", "2", "--rate", "100", "--batches", "30",
                      "--json", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    data = load_json(out)
    assert data["offered_rate"] == 200
    assert data["batches"] == 60
    # scheduled at 100/s, not as fast as possible: 30 sends take at least 29 intervals (a
    # lower bound holds on a loaded machine; an upper one would only measure the machine)
    assert data["duration_s"] >= 0.29


def test_thresholds_set_the_exit_code(bare_host, load_cli):
    address = bare_host()
    failed = load_cli("--connect", address, "--batches", "50", "--max-p99", "1us", "--quiet")
    assert failed.returncode == 1 and "--max-p99" in failed.stderr
    passed = load_cli("--connect", address, "--batches", "50", "--max-p99", "60s", "--max-errors", "0",
                      "--quiet")
    assert passed.returncode == 0, passed.stderr


def test_errors_from_a_host_that_sends_error_are_counted(bare_host, load_cli, tmp_path):
    address = bare_host("--error-after", "20", "--error-code", "internal")
    out = tmp_path / "out.json"
    result = load_cli("--connect", address, "--batches", "60", "--json", str(out), "--max-errors", "0",
                      "--quiet")
    assert result.returncode == 1
    data = load_json(out)
    assert data["errors"]["internal"] >= 1
    assert data["reconnects"] >= 1  # it came back for another session
    assert data["batches"] >= 20


def test_a_host_that_drops_the_connection_is_counted(bare_host, load_cli, tmp_path):
    address = bare_host("--close-after", "10")
    out = tmp_path / "out.json"
    result = load_cli("--connect", address, "--duration", "1s", "--json", str(out), "--quiet")
    assert result.returncode == 0  # no threshold given: errors are reported, not fatal
    data = load_json(out)
    assert data["errors"]["connection-lost"] >= 1 and data["reconnects"] >= 1


def test_unreachable_host_exits_3_with_the_reason(load_cli, tmp_path):
    result = load_cli("--connect", f"unix:{tmp_path}/nothing.sock", "--batches", "5", "--quiet")
    assert result.returncode == 3
    assert "no batch was acknowledged" in result.stderr


def test_bad_arguments_exit_2(load_cli):
    assert load_cli("--connect", "unix:/x").returncode == 2  # neither --duration nor --batches
    assert load_cli("--connect", "pigeon:1", "--batches", "1").returncode == 2
    assert load_cli("--connect", "unix:/x", "--batches", "1", "--fragmentation", "2").returncode == 2
    assert load_cli("--connect", "unix:/x", "--batches", "1", "--id-prefix", "../evil").returncode == 2
    assert "Exit codes" in load_cli("--help").stdout


@pytest.mark.parametrize("kind, extra", [("report", ()), ("report", ("--reuse",)), ("inflate", ()),
                                         ("report", ("--encoding", "pfn32"))])
def test_against_the_real_host(real_host, load_cli, tmp_path, kind, extra):
    address, _url, _process = real_host()
    out = tmp_path / "out.json"
    # a batch count, not a duration: on a loaded machine 1 s may end before a guest is connected
    result = load_cli("--connect", address, "--guests", "3", "--batches", "40", "--kind", kind, *extra,
                      "--json", str(out), "--max-errors", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    data = load_json(out)
    check_sane(data, 3)
    assert data["batches"] == 120 and data["errors"] == {}
    assert data["rejected_pages"] == 0  # every generated range lies inside the guest's RAM


def test_hint_kind_against_the_real_host(real_host, load_cli, tmp_path):
    address, _url, _process = real_host()
    out = tmp_path / "out.json"
    result = load_cli("--connect", address, "--batches", "200", "--kind", "hint", "--json", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert load_json(out)["batches"] == 200


def test_tokens_from_the_hosts_token_file(real_host, load_cli, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# guest-id token\nload-0 first-secret-token\nload-1 second-secret-token\n")
    address, _url, _process = real_host("--token-file", str(tokens))
    out = tmp_path / "out.json"
    result = load_cli("--connect", address, "--guests", "2", "--batches", "20", "--token-file", str(tokens),
                      "--json", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert load_json(out)["batches"] == 40
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-right-token\n")  # one token for every guest
    refused = load_cli("--connect", address, "--batches", "5", "--token-file", str(wrong), "--json", str(out),
                       "--quiet")
    assert refused.returncode == 3
    assert load_json(out)["errors"]["auth-failed"] >= 1


@pytest.mark.parametrize("signum, processes", [(signal.SIGINT, "1"), (signal.SIGTERM, "2")])
def test_interrupt_stops_gracefully_and_still_reports(real_host, tmp_path, signum, processes):
    address, url, _process = real_host()
    out = tmp_path / "out.json"
    load = subprocess.Popen([str(BIN / "balloon-load"), "--connect", address, "--guests", "2", "--processes",
                             processes, "--duration", "60s", "--json", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def acked() -> bool:
            try:
                with urllib.request.urlopen(url + "/api/v1/guests", timeout=1) as response:
                    guests = json.loads(response.read())["guests"]
            except OSError:
                return False
            return len(guests) == 2 and all(sum(g["batches"].values()) > 0 for g in guests)

        wait_for(acked, what="both load guests acked")
        load.send_signal(signum)
        assert load.wait(timeout=30) == 0, load.stderr.read().decode()
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    data = load_json(out)
    assert data["batches"] > 0 and data["duration_s"] < 30 and data["errors"] == {}

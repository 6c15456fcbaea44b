"""The balloon-host command: option layering and validation, and real subprocesses (SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from hostkit import ACK, BYE, RawGuest, sample

from host_daemon import cli, loops
from host_daemon.listeners import ListenError, prepare_unix_path, unix_socket
from host_daemon.settings import SettingsError, parse_settings
from shared.runtime.addresses import Address


def host_command() -> list[str]:
    script = Path(sys.executable).parent / "balloon-host"
    return [str(script)] if script.exists() else [sys.executable, "-m", "host_daemon"]


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(host_command() + list(args), capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_help_explains_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--listen", "--http", "--window", "--max-ranges", "--max-message-bytes", "--max-guests",
                 "--handshake-timeout", "--idle-timeout", "--retention", "--token-file",
                 "--admin-token-file", "--admin-token-dir", "--ram-dir", "--vm-ram-dirs", "--debug-apply-delay", "--config", "--log-format",
                 "--log-level", "BALLOON_HOST_"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("args, message", [
    (["--listen", "carrier-pigeon:1"], "unknown transport"),
    (["--listen", "unix:/tmp/x.sock", "--window", "0"], "--window"),
    (["--listen", "unix:/tmp/x.sock", "--max-ranges", "100000"], "--max-message-bytes"),
    (["--listen", "unix:/tmp/x.sock", "--idle-timeout", "soon"], "duration"),
    (["--listen", "unix:/tmp/x.sock", "--token-file", "/nonexistent/tokens"], "--token-file"),
    (["--listen", "unix:/tmp/x.sock", "--ram-dir", "relative/dir"], "absolute"),
    (["--listen", "unix:/tmp/x.sock", "--vm-ram-dirs", "relative/dir"], "--vm-ram-dirs"),
    (["--listen", "unix:/tmp/x.sock", "--vm-ram-dirs", "/nonexistent/vm-ram"], "not an existing directory"),
    (["--listen", "unix:/tmp/x.sock", "--admin-token-dir", "relative/dir"], "--admin-token-dir"),
])
def test_bad_options_exit_2_with_a_clear_message(args, message, capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("BALLOON_HOST_")]:
        monkeypatch.delenv(name)
    try:
        status = cli.main(args)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_token_file_exits_2(tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text("g1 short\n")
    assert cli.main(["--listen", f"unix:{tmp_path}/s", "--token-file", str(tokens)]) == 2
    assert "shorter than 8" in capsys.readouterr().err


def test_layering_flag_over_env_over_file(tmp_path):
    config = tmp_path / "host.toml"
    config.write_text('[host]\nlisten = ["unix:/run/a.sock"]\nwindow = 4\nmax-guests = 7\nidle-timeout = "90s"\n')
    env = {"BALLOON_HOST_WINDOW": "8", "BALLOON_HOST_RETENTION": "1m"}
    settings = parse_settings(["--config", str(config), "--max-guests", "9"], env)
    assert settings.listen == (Address("unix", path="/run/a.sock"),)
    assert (settings.window, settings.max_guests, settings.idle_timeout, settings.retention) == (8, 9, 90.0, 60.0)
    config.write_text("windw = 4\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--config", str(config), "--listen", "unix:/x"], {})
    assert exit_info.value.code == 2
    with pytest.raises(SettingsError):
        parse_settings(["--listen", "unix:/x", "--max-message-bytes", "100"], {})


def test_loop_choice():
    unix = Address("unix", path="/s")
    assert loops.loop_name([unix, Address("vsock", cid=3, port=1)]) == "asyncio"
    assert loops.loop_name([unix]) == ("uvloop" if loops.uvloop_available() else "asyncio")


def test_unix_socket_file_handling(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a killed host leaves the file behind
    sock = unix_socket(path)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o660)
        with pytest.raises(ListenError, match="another process"):
            prepare_unix_path(path)  # live: never stolen
    finally:
        sock.close()
    regular = tmp_path / "notes.txt"
    regular.write_text("precious")
    with pytest.raises(ListenError, match="not a socket"):
        unix_socket(str(regular))
    assert regular.read_text() == "precious"


class HostProcess:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(host_command() + ["--log-format", "json", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self.ready = self.wait_for("host ready")
        http = self.ready["http"]
        self.url = f"http://{http}"

    def wait_for(self, message: str, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"host exited ({self.proc.poll()}) before {message!r}: {self.lines}")
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            self.lines.append(entry)
            if entry.get("msg") == message:
                return entry
        raise AssertionError(f"no {message!r} within {timeout}s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self.proc.stderr.close()


@pytest.fixture
def host_process():
    started = []

    def start(*args: str) -> HostProcess:
        host = HostProcess(*args)
        started.append(host)
        return host

    yield start
    for host in started:
        host.kill()


async def test_sigterm_sends_bye_and_exits_0(host_process, tmp_path):
    sock = tmp_path / "host.sock"
    host = host_process("--listen", f"unix:{sock}", "--http", "127.0.0.1:0")
    guests = []
    for name in ("t1", "t2"):
        guest = await RawGuest.connect(str(sock))
        await guest.hello(name, 4096)
        assert (await guest.report([(0, 64)]))[0] == ACK
        guests.append(guest)
    async with aiohttp.ClientSession() as http, http.get(f"{host.url}/metrics") as response:
        assert sample(await response.text(), "balloon_guests_connected") == 2
    started = time.monotonic()
    host.proc.send_signal(signal.SIGTERM)
    for guest in guests:
        seen = await guest.closed(timeout=5)
        assert seen and seen[-1][0] == BYE, seen
    assert await asyncio.to_thread(host.proc.wait, 10) == 0
    assert time.monotonic() - started < 5
    assert not sock.exists()  # the host removes its own socket file
    ends = [entry for entry in host.lines + [json.loads(x) for x in host.proc.stderr.read().splitlines() if x.startswith("{")]
            if entry.get("msg") == "session end"]
    assert sorted(e["guest"] for e in ends) == ["t1", "t2"]
    assert all(e["reason"] == "shutdown" and "duration_s" in e and e["address"].startswith("unix:") for e in ends)


async def test_promtool_accepts_live_metrics(make_host, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing: apt-get install -y --no-install-recommends prometheus")
    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    await guest.hello("prom1", 4096)
    await guest.report([(0, 64), (5000, 1)])  # one rejected range too
    from hostkit import scrape

    text = await scrape(host.url)
    await guest.close()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
    for name in ("balloon_guests_connected", "balloon_sessions_total", "balloon_batches_total",
                 "balloon_ranges_total", "balloon_pages_total", "balloon_rejected_pages_total",
                 "balloon_protocol_errors_total", "balloon_received_bytes_total", "balloon_guest_memory_bytes",
                 "balloon_reported_bytes", "balloon_inflated_bytes", "balloon_inflight_batches",
                 "balloon_batch_apply_seconds_bucket", "balloon_target_bytes", "balloon_hinted_bytes"):
        assert f"\n{name}" in text, name
    assert 'le="1e-05"' in text and 'le="1.0"' in text


async def test_vsock_listener_when_the_kernel_has_it():
    """vsock forces the stock loop; exercised for real only where vsock loopback exists."""
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    from host_daemon.listeners import vsock_socket

    try:
        sock = vsock_socket(1, 0xFFFFFFFF)  # VMADDR_CID_LOCAL, any port
    except ListenError as error:
        pytest.skip(f"vsock loopback unavailable here: {error}")
    port = sock.getsockname()[1]
    server = await asyncio.start_server(lambda r, w: w.close(), sock=sock)
    try:
        client = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        client.settimeout(2)
        try:
            await asyncio.to_thread(client.connect, (1, port))
        except OSError as error:
            pytest.skip(f"vsock loopback cannot connect here: {error}")
        finally:
            client.close()
    finally:
        server.close()


def test_without_listen_the_host_uses_the_one_default_socket_path(monkeypatch):
    from guest_agent.settings import parse_settings as guest_settings
    from shared.runtime.addresses import default_address

    for name in [n for n in os.environ if n.startswith(("BALLOON_HOST_", "BALLOON_GUEST_"))]:
        monkeypatch.delenv(name)
    host = parse_settings([], environ={})
    assert [str(a) for a in host.listen] == [default_address()]
    assert str(guest_settings(["--id", "g1"], environ={}).connect) == default_address()

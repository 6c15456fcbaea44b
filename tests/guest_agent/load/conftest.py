"""Hosts for the load tests: the real balloon-host and a bare (optionally broken) host, as subprocesses."""

from __future__ import annotations

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return response.status == 200
    except OSError:
        return False


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def real_host(tmp_path):
    """Factory: a balloon-host subprocess on a Unix socket; returns (address, http_url, process)."""
    if not (Path(__file__).parents[3] / "host_daemon" / "cli.py").exists():
        pytest.skip("balloon-host is not there yet")
    started = []

    def start(*extra: str):
        sock = tmp_path / f"host{len(started)}.sock"
        port = free_port()
        process = subprocess.Popen(
            [str(BIN / "balloon-host"), "--listen", f"unix:{sock}", "--http", f"127.0.0.1:{port}",
             "--log-level", "warning", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: process.poll() is not None or (sock.exists() and _ready(url + "/readyz")),
                 what="balloon-host")
        assert process.poll() is None, process.stderr.read().decode()
        return f"unix:{sock}", url, process

    yield start
    for process in started:
        stop(process)


def _accepts(path) -> bool:
    """True once a Unix socket at ``path`` takes a connection."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.fixture
def bare_host(tmp_path):
    """Factory: the bare host of guest_agent.load.bare (can be told to misbehave)."""
    started = []

    def start(*extra: str) -> str:
        sock = tmp_path / f"bare{len(started)}.sock"
        process = subprocess.Popen([sys.executable, "-m", "guest_agent.load.bare", "serve", f"unix:{sock}", *extra],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        # The socket file appears at bind(), a moment before listen(): wait until it accepts,
        # or the first guests would be refused and counted as reconnects.
        wait_for(lambda: process.poll() is not None or _accepts(sock), what="bare host")
        assert process.poll() is None
        return f"unix:{sock}"

    yield start
    for process in started:
        stop(process)


@pytest.fixture
def load_cli():
    """balloon-load as a user runs it (a subprocess): ``load_cli(*args) -> CompletedProcess``."""

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "balloon-load"), *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "COLUMNS": "120"})

    return run

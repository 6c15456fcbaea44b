"""Real balloon-host / balloon-guest processes for end-to-end tests, and their /metrics.

Every process started through :class:`Daemons` is killed in teardown; ports come from
binding port 0; sockets live in a short temporary folder (AF_UNIX paths are limited).
Waiting is always a poll of a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_for(condition, deadline: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    last_error = None
    while time.monotonic() < end:
        try:
            result = condition()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError) as error:
            last_error = error
        time.sleep(interval)
    if callable(what):  # describe the state at the moment of failure
        try:
            what = what()
        except Exception as error:  # noqa: BLE001 - best effort description
            what = f"(could not describe: {error})"
    raise AssertionError(f"timed out after {deadline}s waiting for {what} (last error: {last_error})")


def post_json(url: str, body: dict, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if token is not None:  # the admin token: every POST/PUT/DELETE needs it
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=2) as response:
        return json.load(response)


class Process:
    def __init__(self, name: str, argv: list[str], log: Path, url: str) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.url = url
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def metrics(self) -> dict:
        return scrape(f"{self.url}/metrics")

    @property
    def admin_token(self) -> str:
        """A host's generated admin token (Daemons.host puts it in the run's folder)."""
        port = self.url.rsplit(":", 1)[1]
        return (self.log.parent / f"admin-{port}.token").read_text().strip()

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
        if sig in (signal.SIGKILL,):
            self.popen.wait(10)


class Daemons:
    """Starts hosts and guests for one test and kills them all at the end."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="g2e-", dir="/tmp"))
        self.socket = self.folder / "host.sock"
        self.processes: list[Process] = []

    def host(self, *extra: str, http_port: int | None = None) -> Process:
        port = http_port or free_port()
        argv = [sys.executable, "-m", "host_daemon", "--listen", f"unix:{self.socket}",
                "--http", f"127.0.0.1:{port}", "--admin-token-dir", str(self.folder), *extra]
        process = Process("host", argv, self.folder / "host.log", f"http://127.0.0.1:{port}")
        self.processes.append(process)
        wait_for(lambda: self._ready(process, "/readyz"), 20, f"host ready\n{process.tail()}")
        return process

    def restart(self, process: Process) -> Process:
        """Start the same command again (same socket, same port)."""
        again = Process(process.name, process.argv, process.log, process.url)
        self.processes.append(again)
        wait_for(lambda: self._ready(again, "/readyz" if process.name == "host" else "/healthz"), 20,
                 f"{process.name} ready again\n{again.tail()}")
        return again

    def guest(self, guest_id: str, *extra: str, memory: str = "256MiB") -> Process:
        port = free_port()
        argv = [sys.executable, "-m", "guest_agent", "--connect", f"unix:{self.socket}", "--id", guest_id,
                "--memory", memory, "--http", f"127.0.0.1:{port}", "--report-delay", "200ms",
                "--reconnect-max", "1s", *extra]
        process = Process(f"guest-{guest_id}", argv, self.folder / f"guest-{guest_id}.log",
                          f"http://127.0.0.1:{port}")
        self.processes.append(process)
        wait_for(lambda: self._ready(process, "/healthz"), 20, f"guest {guest_id} ready\n{process.tail()}")
        return process

    @staticmethod
    def _ready(process: Process, path: str) -> bool:
        if process.popen.poll() is not None:
            raise AssertionError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        with urllib.request.urlopen(f"{process.url}{path}", timeout=1) as response:
            return response.status == 200

    def close(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not running anything
    with contextlib.suppress(OSError):
        if " Z " in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]:
            return False
    return True

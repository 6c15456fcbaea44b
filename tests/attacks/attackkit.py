"""A real ``balloon-host`` process to attack, a healthy guest beside it, and raw attacker sockets.

Loopback only: Unix sockets in a private temporary folder, TCP and HTTP on 127.0.0.1.
Everything is bounded: each attack has a loop count or a deadline, each socket a timeout,
and every process is killed in teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack

HELLO, WELCOME, REPORT, ACK, REUSE, INFLATE, STATS, ERROR, BYE = 1, 2, 3, 4, 5, 6, 13, 15, 17
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: The host's RSS may grow by at most this much over a whole attack run (docs/OPERATIONS.md).
RSS_BUDGET = 96 << 20
P99_LIMIT = 0.050
MIN_WINDOW = 2.0
#: seconds of structured fuzzing (``make attacks-long`` raises it)
FUZZ_SECONDS = float(os.environ.get("BALLOON_ATTACK_FUZZ_SECONDS", "12"))
VM1_PAGES = 16384  # the provisioned guest: 64 MiB
OPEN_CAP = 1 << 30  # --max-guest-memory of the attacked host


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def words(ranges) -> bytes:
    out = []
    for pfn, count in ranges:
        out.append(struct.pack("<Q", (pfn << 12) | count) if 1 <= count <= 4095 else struct.pack("<QQ", pfn << 12, count))
    return b"".join(out)


def hello(guest: str, pages: int, features=("ranges52",), token=None) -> bytes:
    body = {"version": 1, "guest": guest, "page_size": 4096, "pages": pages, "features": list(features)}
    if token is not None:
        body["token"] = token
    return msgpack.packb([HELLO, body], use_bin_type=True)


class Raw:
    """A blocking attacker socket with a deadline on every read."""

    def __init__(self, address, timeout: float = 5.0) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self):
        """The next message, or None once the host closed the connection."""
        while True:
            for message in self.unpacker:
                if message[0] == 14:  # PING: answer, keep waiting
                    self.send(msgpack.packb([16, message[1]]))
                    continue
                return message
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            self.unpacker.feed(data)

    def hello(self, guest: str, pages: int, **kw):
        self.send(hello(guest, pages, **kw))
        return self.recv()

    def until_closed(self) -> list:
        seen = []
        while (message := self.recv()) is not None:
            seen.append(message)
        return seen

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def fingerprint(path: str) -> tuple[int, str]:
    """Size and content hash of a file (a guest's RAM must not change under an attack)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return os.path.getsize(path), digest.hexdigest()


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class AttackedHost:
    """balloon-host with a provisioned guest vm1 (own listener + RAM file), a shared Unix and TCP
    listener, a RAM dir for open-mode guests, and a healthy guest measuring its ACK latency."""

    def __init__(self, *extra: str, rlimit_nofile: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="balloon-attack-", dir="/tmp"))
        shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else self.dir
        self.shm = Path(tempfile.mkdtemp(prefix="balloon-attack-", dir=shm))
        self.ram_dir = self.shm / "open"
        self.ram_dir.mkdir()
        self.sock = str(self.dir / "host.sock")
        self.vm1_sock = str(self.dir / "vm1.sock")
        self.vm1_ram = str(self.shm / "vm1.ram")
        self.admin_token = "attack-admin-token"
        (self.dir / "admin.token").write_text(self.admin_token + "\n")
        self.tcp = ("127.0.0.1", free_port())
        self.http = f"http://127.0.0.1:{free_port()}"
        (self.dir / "guests.toml").write_text(
            f'[guest.vm1]\nmemory = "{VM1_PAGES * 4}KiB"\nlisten = "unix:{self.vm1_sock}"\n'
            f'ram_file = "{self.vm1_ram}"\n')
        self.make_vm1_ram()
        self.log_path = self.dir / "host.log"
        argv = [sys.executable, "-m", "host_daemon", "--listen", f"unix:{self.sock}",
                "--listen", f"tcp:{self.tcp[0]}:{self.tcp[1]}", "--http", self.http[7:],
                "--guests", str(self.dir / "guests.toml"), "--ram-dir", str(self.ram_dir),
                "--vm-ram-dirs", str(self.shm),
                "--admin-token-file", str(self.dir / "admin.token"),
                "--max-guest-memory", f"{OPEN_CAP >> 20}MiB", "--max-guests", "16",
                "--retention", "30s", "--forget-after", "0.2s", "--handshake-timeout", "2s",
                "--idle-timeout", "3s", "--log-format", "text", *extra]

        def limits():
            if rlimit_nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (rlimit_nofile, rlimit_nofile))

        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=limits)
        self.wait_ready()
        self.healthy_out = self.dir / "healthy.txt"
        self.healthy = subprocess.Popen([sys.executable, str(HERE / "healthy.py"), self.sock,
                                         str(self.healthy_out)], cwd=ROOT)
        deadline = time.monotonic() + 20
        while len(self.latencies()) < 50:
            assert self.healthy.poll() is None, "the healthy guest died"
            assert time.monotonic() < deadline, "the healthy guest got no ACKs"
            time.sleep(0.05)
        self.rss_start = self.rss()
        #: test name -> (healthy p99 s, ACKs in its window, host RSS growth so far), for the summary
        self.figures: dict[str, tuple[float, int, int]] = {}

    def make_vm1_ram(self) -> None:
        """What QEMU does with memory-backend-file: create, size and fill the VM's RAM file."""
        with open(self.vm1_ram, "wb") as handle:
            handle.truncate(VM1_PAGES * 4096)
            for page in range(0, VM1_PAGES, 16):
                handle.seek(page * 4096)
                handle.write(struct.pack("<Q", page) * 512)

    def wait_ready(self, deadline: float = 60) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log_text()[-3000:]
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.http}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.05)
        raise AssertionError("balloon-host never became ready")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        with urllib.request.urlopen(f"{self.http}/healthz", timeout=2) as response:
            return response.status == 200

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def latencies(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        try:
            lines = self.healthy_out.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            parts = line.split()
            if len(parts) == 2 and since <= float(parts[0]) <= until:
                out.append(float(parts[1]))
        return out

    def api(self, method: str, path: str, body=None, raw: bytes | None = None, token: bool = True):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.http + path, data=data, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {self.admin_token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def close(self) -> None:
        for proc in (getattr(self, "healthy", None), self.proc):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.shm, ignore_errors=True)


class Window:
    """The time span of one attack, to judge the healthy guest's ACKs and the host inside it."""

    def __init__(self, host: AttackedHost) -> None:
        self.host = host

    def __enter__(self) -> Window:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        # at least MIN_WINDOW: enough healthy ACKs to judge, and an attack's after-effects inside
        time.sleep(max(0.0, self.start + MIN_WINDOW - time.monotonic()))
        self.end = time.monotonic()

    def assert_healthy(self, settle: float = 0.3) -> None:
        """The host is up, and the healthy guest's p99 ACK latency inside the window < 50 ms."""
        host = self.host
        time.sleep(settle)  # ACKs sent near the end of the window are still in flight
        assert host.alive(), host.log_text()[-3000:]
        assert host.healthy.poll() is None, "the healthy guest lost its session"
        latencies = host.latencies(self.start, self.end)
        assert len(latencies) >= 5, f"the healthy guest got only {len(latencies)} ACKs in the window"
        worst = p99(latencies)
        name = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
        host.figures[name] = (worst, len(latencies), host.rss() - host.rss_start)
        assert worst < P99_LIMIT, f"healthy p99 ACK latency {worst * 1000:.1f} ms over {len(latencies)} ACKs"

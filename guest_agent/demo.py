"""``make demo``: one balloon-host and three simulated guests (idle, churn, burst), live.

Everything lives in one temporary folder (the Unix socket, the logs, the RAM files when
shared RAM is available) and on free loopback ports, so two demos never clash. The demo
shows ``balloonctl top`` when it exists (a rich table of the host's admin API otherwise);
without a terminal (CI) it prints a plain status line every few seconds instead. It runs
until Ctrl-C, or for ``DEMO_SECONDS`` seconds, and always cleans up: every child is
stopped (SIGTERM, then SIGKILL), the folder removed — also when a child dies early.

So that something happens without typing, the demo moves a balloon itself: ``balloonctl
setmem idle 160MiB`` 5 s in (a 96 MiB balloon), ``setmem idle 256MiB`` (none) 30 s later,
again every minute — the same command a person would type, shown with its answer in a
footer under the live view, with the dashboard URL and the hint to try it by hand.

``DEMO_POLICY=balance`` (or ``mom``) runs the host with that balloon policy under a
``DEMO_BUDGET`` (384MiB) guest-memory budget and the guests without free page reporting,
so the balloons are what keeps their resident memory under it (docs/POLICY.md); watch it
with ``balloonctl policy`` and raise the budget with ``POST /api/v1/policy``.
"""

from __future__ import annotations

import contextlib
import importlib.util
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

from shared.runtime.admin_token import admin_token_path  # where the host writes its admin token

GUESTS = (
    ("idle", ["--workload", "idle"]),
    ("churn", ["--workload", "churn", "--utilization", "0.5"]),
    ("burst", ["--workload", "burst"]),
)
MEMORY = "256MiB"
#: ``DEMO_POLICY=balance make demo``: knobs sized for three 256 MiB guests, so the policy's moves
#: show within a minute (the defaults, 5 s ticks and 100 s blocks, are for real hosts).
DEMO_POLICY_CONFIG = """[policy]
interval = "1s"
guest_floor = "32MiB"
block_low = "10s"
block_high = "3s"
max_step_ratio = 0.1
"""
DEMO_BUDGET = "384MiB"  # half of the three guests' combined 768 MiB and below what they touch
#: The demo's own balloon moves (manual mode): (seconds into each minute, guest, memory it keeps).
SCRIPT_PERIOD = 60.0
SCRIPT = ((5.0, "idle", "160MiB"), (35.0, "idle", MEMORY))  # idle uses ~10 %: the balloon gets there


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch_json(url: str, timeout: float = 1.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def _mib(value) -> str:
    return "-" if value is None else f"{value / (1 << 20):.0f}"


class Demo:
    def __init__(self, seconds: float | None, out=sys.stdout, policy: str | None = None,
                 budget: str = DEMO_BUDGET) -> None:
        self.seconds = seconds
        self.policy = policy  # None: manual (targets only from balloonctl)
        self.budget = budget
        self.out = out
        self.folder = Path(tempfile.mkdtemp(prefix="balloon-demo-"))
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.logs: dict[str, Path] = {}
        self.host_port = free_port()
        self.host_url = f"http://127.0.0.1:{self.host_port}"
        self.guest_ports: dict[str, int] = {}
        self.shared_ram = importlib.util.find_spec("guest_agent.memory.ram") is not None
        self.footer_path = self.folder / "footer.txt"
        self.script_log: list[str] = []  # one line per scripted balloonctl command and its answer
        self._script_next = 0  # index into the endless SCRIPT sequence
        self._script_running: tuple[str, subprocess.Popen] | None = None
        self._shown_at: float | None = None

    # -- processes -----------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_path = self.folder / f"{name}.log"
        self.logs[name] = log_path
        with open(log_path, "wb") as log:
            # Own session: the terminal's Ctrl-C reaches the demo only, which then stops
            # the children in order (guests say BYE before the host goes).
            child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.children.append((name, child))
        return child

    def start(self) -> None:
        socket_path = self.folder / "host.sock"
        host = [sys.executable, "-m", "host_daemon", "--listen", f"unix:{socket_path}",
                "--http", f"127.0.0.1:{self.host_port}", "--retention", "30s"]
        if self.shared_ram:
            ram_dir = self.folder / "ram"
            ram_dir.mkdir()
            host += ["--ram-dir", str(ram_dir)]
        guest_extra = []
        if self.policy:
            config = self.folder / "policy.toml"
            config.write_text(DEMO_POLICY_CONFIG)
            host += ["--policy", self.policy, "--guest-memory-budget", self.budget, "--policy-config", str(config)]
            # without free page reporting only a balloon gives touched memory back: the policy's job
            guest_extra = ["--no-reporting", "--stats-interval", "1s"]
        self._spawn("host", host)
        self._wait_ready()
        for name, extra in GUESTS:
            port = free_port()
            self.guest_ports[name] = port
            argv = [sys.executable, "-m", "guest_agent", "--connect", f"unix:{socket_path}", "--id", name,
                    "--memory", MEMORY, "--http", f"127.0.0.1:{port}", "--seed", "1", *extra, *guest_extra]
            if self.shared_ram:
                argv.append("--shared-ram")
            self._spawn(f"guest-{name}", argv)

    def wait_guests(self, deadline: float = 60.0) -> None:
        """The demo's clock starts once every guest is connected: on a busy machine starting three
        Python processes takes seconds, and a demo that ends before its guests arrive shows nothing."""
        names = {name for name, _ in GUESTS}
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            self.check_children()
            if names <= {g.get("id") for g in self.guests() if g.get("connected")}:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the guests did not connect within {deadline:g}s")

    def _wait_ready(self, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            self.check_children()
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.host_url}/readyz", timeout=0.5) as response:
                    if response.status == 200:
                        return
            time.sleep(0.1)
        raise RuntimeError("the host did not become ready in time")

    def check_children(self) -> None:
        for name, child in self.children:
            if child.poll() is not None:
                raise ChildDied(name, child.returncode, self._tail(name))

    def _tail(self, name: str, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """Guests first (they send BYE), then the host; SIGKILL whatever lingers; remove the folder."""
        if self._script_running is not None and self._script_running[1].poll() is None:
            self._script_running[1].kill()
            self._script_running[1].wait()
        for group in (lambda n: n != "host", lambda n: n == "host"):
            members = [(n, c) for n, c in self.children if group(n) and c.poll() is None]
            for _, child in members:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
            end = time.monotonic() + 5.0
            for _, child in members:
                try:
                    child.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- showing -------------------------------------------------------------------------

    def print_urls(self) -> None:
        p = lambda *a: print(*a, file=self.out, flush=True)  # noqa: E731
        p(f"balloon-hints demo in {self.folder}")
        p(f"  host    metrics {self.host_url}/metrics   admin API {self.host_url}/api/v1/guests")
        p(f"  host    dashboard {self.host_url}/ui/")
        for name, port in self.guest_ports.items():
            p(f"  guest {name:<6} metrics http://127.0.0.1:{port}/metrics")
        p(f"  shared RAM with canaries: {'on' if self.shared_ram else 'off'}")
        if self.policy:
            p(f"  policy {self.policy} under a {self.budget} guest-memory budget: "
              f".venv/bin/balloonctl --host {self.host_url} policy")
            token = admin_token_path(self.host_port)
            p(f"  raise the budget: curl -H \"Authorization: Bearer $(cat {token})\" "
              f"-d '{{\"guest_memory_budget\": \"1GiB\"}}' {self.host_url}/api/v1/policy")
        p("  pids: " + " ".join(f"{name}={child.pid}" for name, child in self.children))
        p(f"  try, in another terminal of this folder: .venv/bin/balloonctl --host {self.host_url} setmem churn 192MiB")
        p("Ctrl-C stops the demo" + (f" (or after {self.seconds:g}s)" if self.seconds else ""))
        self.write_footer()

    def footer_lines(self) -> list[str]:
        """What stays under the live view: where to look, what the demo did, what to try."""
        lines = [f"dashboard {self.host_url}/ui/   metrics {self.host_url}/metrics"]
        if self.policy:
            lines.append(f"policy {self.policy} sizes the balloons under {self.budget}: "
                         f".venv/bin/balloonctl --host {self.host_url} policy")
        else:
            at, guest, size = SCRIPT[0]
            lines.append(f"the demo runs balloonctl setmem {guest} {size} {at:g}s into every minute "
                         f"and gives it back at {SCRIPT[1][0]:g}s; last: "
                         + (self.script_log[-1] if self.script_log else "not yet"))
        lines.append(f"try: .venv/bin/balloonctl --host {self.host_url} setmem burst 192MiB   "
                     "(in another terminal of this folder)   Ctrl-C stops the demo")
        return lines

    def write_footer(self) -> None:
        with contextlib.suppress(OSError):
            tmp = self.footer_path.with_suffix(".tmp")
            tmp.write_text("\n".join(self.footer_lines()) + "\n")
            tmp.replace(self.footer_path)  # balloonctl top never reads half a footer

    def step_script(self) -> str | None:
        """Run the next scripted ``balloonctl setmem`` when it is due (never two at once); the
        line saying what it did once it finished, else None."""
        if self.policy or self._shown_at is None:
            return None
        if self._script_running is not None:
            command, child = self._script_running
            if child.poll() is None:
                return None
            self._script_running = None
            output = (child.stdout.read() if child.stdout else "").strip().splitlines()
            answer = output[-1] if output else f"exit status {child.returncode}"
            line = f"{time.strftime('%H:%M:%S')} {command} -> {answer}"
            self.script_log.append(line)
            self.write_footer()
            return line
        cycle, index = divmod(self._script_next, len(SCRIPT))
        at, guest, size = SCRIPT[index]
        if time.monotonic() - self._shown_at < cycle * SCRIPT_PERIOD + at:
            return None
        self._script_next += 1
        argv = [sys.executable, "-m", "balloonctl", "--host", self.host_url, "setmem", guest, size]
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 text=True)
        self._script_running = (f"balloonctl setmem {guest} {size}", child)
        return None

    def guests(self) -> list[dict]:
        try:
            return fetch_json(f"{self.host_url}/api/v1/guests").get("guests", [])
        except (OSError, urllib.error.URLError, ValueError):
            return []

    def status_line(self) -> str:
        parts = []
        for g in sorted(self.guests(), key=lambda g: g.get("id", "")):
            parts.append(f"{g.get('id')}: {'up' if g.get('connected') else 'down'} "
                         f"reported={_mib(g.get('reported_bytes'))}MiB "
                         f"inflated={_mib(g.get('inflated_bytes'))}MiB "
                         f"reclaimed={_mib(g.get('reclaimed_bytes'))}MiB")
        line = time.strftime("%H:%M:%S ") + (" | ".join(parts) if parts else "no guests yet")
        if self.policy:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                host = fetch_json(f"{self.host_url}/api/v1/policy").get("host") or {}
                line += f" | host available={_mib(host.get('available_bytes'))}MiB of budget"
        return line

    def table(self):
        from rich.table import Table

        table = Table(title=f"balloon-host {self.host_url}  (Ctrl-C to stop)", caption="\n".join(self.footer_lines()))
        for column in ("guest", "conn", "memory MiB", "reported MiB", "inflated MiB", "target MiB",
                       "reclaimed MiB", "window", "batches"):
            table.add_column(column, justify="right" if column != "guest" else "left")
        for g in sorted(self.guests(), key=lambda g: g.get("id", "")):
            window = g.get("window") or {}
            table.add_row(str(g.get("id")), "yes" if g.get("connected") else "no", _mib(g.get("memory_bytes")),
                          _mib(g.get("reported_bytes")), _mib(g.get("inflated_bytes")),
                          _mib(g.get("target_bytes")), _mib(g.get("reclaimed_bytes")),
                          f"{window.get('in_use', 0)}/{window.get('size', 0)}",
                          str(sum((g.get("batches") or {}).values())))
        return table

    def _until(self):
        return None if not self.seconds else time.monotonic() + self.seconds

    def _time_left(self, until) -> bool:
        return until is None or time.monotonic() < until

    def show(self) -> None:
        until = self._until()
        self._shown_at = time.monotonic()
        if not self.out.isatty():
            next_line = 0.0
            while self._time_left(until):
                self.check_children()
                done = self.step_script()
                if done:
                    print(done, file=self.out, flush=True)
                if time.monotonic() >= next_line:
                    print(self.status_line(), file=self.out, flush=True)
                    next_line = time.monotonic() + 2.0
                time.sleep(0.1)
            return
        if importlib.util.find_spec("balloonctl") is not None:
            top = subprocess.Popen([sys.executable, "-m", "balloonctl", "--host", self.host_url, "top",
                                    "--footer-file", str(self.footer_path)])
            self.children.append(("balloonctl", top))
            try:
                while self._time_left(until) and top.poll() is None:
                    self.check_children_except("balloonctl")
                    self.step_script()
                    time.sleep(0.1)
            finally:
                if top.poll() is None:
                    top.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        top.wait(3)
            return
        from rich.live import Live

        with Live(self.table(), refresh_per_second=2, transient=False) as live:
            while self._time_left(until):
                self.check_children()
                self.step_script()
                live.update(self.table())
                time.sleep(0.5)

    def check_children_except(self, skip: str) -> None:
        for name, child in self.children:
            if name != skip and child.poll() is not None:
                raise ChildDied(name, child.returncode, self._tail(name))


class ChildDied(RuntimeError):
    def __init__(self, name: str, code: int, tail: str) -> None:
        super().__init__(f"{name} exited early with status {code}")
        self.tail = tail


def _seconds_from_env(name: str = "DEMO_SECONDS") -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"{name} must be a number of seconds, not {text!r}") from None
    return value if value > 0 else None


def run(demo: Demo, name: str = "demo") -> int:
    """Start, show until the time is up or Ctrl-C, always stop; 1 if anything failed (also
    ``make stack``, whose Stack is a Demo with a Prometheus)."""
    # SIGTERM (e.g. from CI) ends the demo like Ctrl-C, through the same cleanup.
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    status = 0
    try:
        demo.start()
        demo.print_urls()
        demo.wait_guests()
        demo.show()
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    except ChildDied as error:
        print(f"{name}: {error}\n{error.tail}", file=sys.stderr)
        status = 1
    except RuntimeError as error:
        print(f"{name}: {error}", file=sys.stderr)
        status = 1
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            demo.stop()
    print(f"{name} stopped; every process and file it made is gone", file=sys.stderr)
    return status


def _policy_from_env() -> str | None:
    policy = os.environ.get("DEMO_POLICY", "").strip().lower()
    if policy in ("", "manual"):
        return None
    if policy not in ("mom", "balance"):
        raise SystemExit(f"DEMO_POLICY must be balance, mom or manual, not {policy!r}")
    return policy


def main() -> int:
    return run(Demo(_seconds_from_env(), policy=_policy_from_env(),
                    budget=os.environ.get("DEMO_BUDGET", "").strip() or DEMO_BUDGET))


if __name__ == "__main__":
    raise SystemExit(main())

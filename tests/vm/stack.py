"""A host daemon and one real guest wired together, as an operator would run them.

The VM is a provisioned guest (docs/OPERATIONS.md "Real VMs"): the host's inventory
(``balloon-host --guests DIR/guests.toml``) says ``[guest.vm1] memory``, its own listener
``listen = "unix:DIR/vm1.sock"`` — whoever connects there *is* vm1, as QEMU's chardev does —
and ``ram_file = "DIR/vm1.ram"``, the file QEMU created as the guest's RAM, which the host
opens but never creates, resizes or removes. The agent in the guest announces what it can
see of its RAM; the host's size is the one that counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.e2e.daemons import wait_for as poll  # noqa: F401 - the suite's poll

from . import harness
from .machine import Machine, short_folder

AGENT_LOG = "/tmp/agent.log"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    def __init__(self, *, memory_mib: int = 1024, prealloc: bool = True, name: str = "vm1",
                 host_args: tuple[str, ...] = (), lifetime: float = 900, **machine) -> None:
        self.artifacts = harness.ensure()
        self.folder = short_folder()
        self.name = name
        self.socket = self.folder / f"{name}.sock"
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.host_args = host_args
        self.host: subprocess.Popen | None = None
        self.host_log = self.folder / "host.log"
        self.vm = Machine(self.artifacts, self.folder, memory_mib=memory_mib, socket_path=self.socket,
                          prealloc=prealloc, lifetime=lifetime, name=name, **machine)

    # -- the host daemon -----------------------------------------------------------------

    def inventory(self) -> Path:
        path = self.folder / "guests.toml"
        qmp = self.vm.host_qmp_path
        path.write_text(f'[guest.{self.name}]\nmemory = "{self.vm.memory_mib}MiB"\n'
                        f'listen = "unix:{self.socket}"\nram_file = "{self.vm.ram_file}"\n'
                        + (f'qmp = "unix:{qmp}"\n' if qmp is not None else ""))
        return path

    def start_host(self) -> None:
        # --listen: the host wants one shared listener; --max-guests 0 admits no open guest on it.
        # --vm-ram-dirs: QEMU's RAM file is the only file the host may punch; the admin token
        # goes to this run's folder (admin_headers), not to the machine's default directory.
        argv = [sys.executable, "-m", "host_daemon", "--guests", str(self.inventory()), "--max-guests", "0",
                "--listen", f"unix:{self.folder}/shared.sock", "--vm-ram-dirs", str(self.vm.ram_file.parent),
                "--admin-token-dir", str(self.folder),
                "--http", f"127.0.0.1:{self.http_port}", *self.host_args]
        with open(self.host_log, "ab") as out:
            self.host = subprocess.Popen(["timeout", "-s", "KILL", "1200", *argv], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        poll(self._ready, 30, lambda: f"host ready\n{self.host_tail()}")

    def _ready(self) -> bool:
        if self.host.poll() is not None:
            raise AssertionError(f"host exited with {self.host.returncode}:\n{self.host_tail()}")
        with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
            return response.status == 200

    def kill_host(self) -> None:
        if self.host is not None and self.host.poll() is None:
            os.killpg(self.host.pid, signal.SIGKILL)
            self.host.wait(10)

    def host_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.host_log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def guest(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v1/guests/{self.name}", timeout=2) as response:
            return json.load(response)

    def metric(self, name: str) -> float | None:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name) and f'guest="{self.name}"' in line:
                    return float(line.rsplit(" ", 1)[1])
        return None

    def admin_headers(self) -> dict:
        """What a POST to the admin API needs: the token the host generated into this folder."""
        token = (self.folder / f"admin-{self.http_port}.token").read_text().strip()
        return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    def target(self, mib: int) -> None:
        body = json.dumps({"bytes": mib << 20}).encode()
        request = urllib.request.Request(f"{self.url}/api/v1/guests/{self.name}/target", data=body,
                                         method="POST", headers=self.admin_headers())
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 202, response.status

    def wait_connected(self, timeout: float = 60, sessions_above: int = 0) -> dict:
        def connected():
            record = self.guest()
            return record if record["connected"] and self._sessions() > sessions_above else None
        return poll(connected, timeout, lambda: f"{self.name} connected\n{self.agent_log()}\n{self.host_tail()}")

    def _sessions(self) -> int:
        value = self.metric("balloon_sessions_total") or self.metric("balloon_guest_sessions_total")
        return int(value) if value is not None else 1

    def wait_inflated(self, mib: int, timeout: float = 120) -> dict:
        pages = mib << 8

        def settled():  # and every batch acked: the host's view counts a batch before its punch ends
            record = self.guest()
            done = record["connected"] and record["inflated_pages"] == pages and record["window"]["in_use"] == 0
            return record if done else None
        return poll(settled, timeout, lambda: f"{mib} MiB inflated: {self.guest()}\n{self.agent_log()}")

    # -- the agent in the guest ------------------------------------------------------------

    def start_agent(self, *options: str, log: str = AGENT_LOG) -> None:
        self.vm.spawn(self.vm.agent_command(*options), log)

    def agent_pids(self) -> list[int]:
        return self.vm.pid_of("bin/balloon-guest")

    def kill_agent(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.agent_pids():
            self.vm.run(f"kill -{int(sig)} {pid}", check=False)
        poll(lambda: not self.agent_pids(), 30, "the agent to exit")

    def agent_log(self, log: str = AGENT_LOG) -> str:
        if not self.vm.alive():
            return "(guest not running)"
        try:
            return self.vm.run(f"tail -n 25 /mnt/tmp/{Path(log).name} 2>/dev/null || tail -n 25 {log}",
                               timeout=10, check=False)
        except AssertionError as error:
            return f"(no agent log: {error})"

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self.start_host()
            self.vm.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.vm.close()
        self.kill_host()
        shutil.rmtree(self.folder, ignore_errors=True)

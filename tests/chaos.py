"""Crash test (issue 5, ``make chaos``): no guest page is ever lost, whatever crashes when.

One ``balloon-host --ram-dir`` (a tmpfs folder) and four churning ``balloon-guest
--shared-ram`` processes, whose every allocated page carries a canary (PFN + generation)
that the guest checks on free and on sampling sweeps. Then, N times, at a random moment:
resize some balloons through the admin API, sometimes SIGKILL and restart a guest, and
SIGKILL and restart the host. One more guest leaves for good early on, so its RAM file
must be forgotten after ``--retention`` even though the host that knew it has died.

Checked at the end (each one can fail):

* zero canary failures, from the guests' metrics and from every incarnation's log
  (a guest killed between scrapes still logged what it found);
* after the crashes, every guest's view converges with the host's: reported bytes,
  inflated bytes (the last balloon target), nothing in flight; the host's reclaimed
  bytes equal what the kernel says of the RAM file (st_blocks), and cover at least the
  reported + inflated bytes once the guests are quiet (restarted idle on the same file);
* the guest that left has no RAM file, no admin entry and no metric series;
* every process started is gone after teardown.

    python -m tests.chaos --crashes 20            # make chaos
    python -m tests.chaos --crashes 2 --seed 7    # what tests/test_chaos_smoke.py runs

Randomness is seeded; every wait is a poll with a deadline, so the run is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

try:  # pytest puts tests/e2e on sys.path (tests/conftest.py); `python -m` runs from the root
    from daemons import Daemons, Process, free_port, pid_alive, post_json, value, wait_for
except ModuleNotFoundError:
    from tests.e2e.daemons import Daemons, Process, free_port, pid_alive, post_json, value, wait_for

MIB = 1 << 20
PAGE = 4096


@dataclass
class Summary:
    crashes: int = 0
    guest_restarts: int = 0
    resizes: int = 0
    pages_checked: int = 0
    pages_lost: int = 0
    converge_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        verdict = "OK" if not self.problems else "FAIL"
        return (
            f"chaos {verdict}: crashes={self.crashes} guest_restarts={self.guest_restarts} "
            f"resizes={self.resizes} pages_checked={self.pages_checked} "
            f"pages_lost={self.pages_lost} converged_in={self.converge_s:.1f}s"
        )


class Chaos:
    def __init__(self, args) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.memory = args.memory_mib * MIB
        self.daemons = Daemons()
        self.ram_dir = Path(tempfile.mkdtemp(prefix="balloon-chaos-", dir=args.ram_base))
        self.summary = Summary()
        self.guests: dict[str, Process] = {}
        self.targets: dict[str, int] = {}
        self.checked: dict[str, float] = {}  # per guest: checked pages of finished incarnations
        self.every_pid: list[int] = []
        self.host: Process | None = None
        self.t0 = time.monotonic()

    # -- processes ------------------------------------------------------------------------

    def start_host(self) -> None:
        self.host = self.daemons.host(
            "--ram-dir",
            str(self.ram_dir),
            "--retention",
            f"{self.args.retention}s",
            "--log-format",
            "json",
            "--log-level",
            "warning",
        )
        self.every_pid.append(self.host.pid)

    def restart_host(self) -> None:
        self.host = self.daemons.restart(self.host)
        self.every_pid.append(self.host.pid)

    def start_guests(self, ids: list[str], workload: str = "churn", seeds=None) -> list[Process]:
        """Start guests side by side (one Python start-up each), then wait for all of them."""
        started = []
        for index, guest_id in enumerate(ids):
            seed = seeds[index] if seeds else 0
            extra = [
                "--workload",
                workload,
                "--shared-ram",
                "--seed",
                str(seed),
                "--log-format",
                "json",
            ]
            if workload == "churn":
                extra += ["--utilization", "0.5", "--rate", str(self.args.rate)]
            port = free_port()
            argv = [
                sys.executable,
                "-m",
                "guest_agent",
                "--connect",
                f"unix:{self.daemons.socket}",
                "--id",
                guest_id,
                "--memory",
                f"{self.args.memory_mib}MiB",
                "--http",
                f"127.0.0.1:{port}",
                "--report-delay",
                "200ms",
                "--reconnect-max",
                "1s",
                *extra,
            ]
            process = Process(
                f"guest-{guest_id}",
                argv,
                self.daemons.folder / f"guest-{guest_id}.log",
                f"http://127.0.0.1:{port}",
            )
            self.daemons.processes.append(process)
            self.every_pid.append(process.pid)
            started.append(process)
        for process in started:
            wait_for(
                lambda p=process: self.daemons._ready(p, "/healthz"), 30, f"{process.name} ready"
            )
        return started

    def start_guest(self, guest_id: str, workload: str = "churn", seed: int = 0) -> Process:
        return self.start_guests([guest_id], workload, [seed])[0]

    def guest_metric(self, guest: Process, name: str) -> float:
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            return value(guest.metrics(), name) or 0.0
        return 0.0

    def kill_guest(self, guest_id: str) -> None:
        guest = self.guests[guest_id]
        self.checked[guest_id] = self.checked.get(guest_id, 0.0) + self.guest_metric(
            guest, "balloon_guest_canary_pages_checked_total"
        )
        guest.kill(signal.SIGKILL)

    def log(self, what: str) -> None:
        if self.args.verbose:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {what}", flush=True)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> Summary:
        args, rng = self.args, self.rng
        started = time.monotonic()
        self.start_host()
        names = [f"c{i}" for i in range(args.guests)]
        seeds = [args.seed * 100 + index for index in range(len(names) + 1)]
        *churners, gone = self.start_guests([*names, "leaver"], seeds=seeds)
        self.guests.update(zip(names, churners, strict=True))
        self.log(f"host and {len(names) + 1} guests up")
        wait_for(
            lambda: self.guest_metric(gone, "balloon_guest_connected") == 1, 20, "leaver connected"
        )
        wait_for(lambda: (self.ram_dir / "leaver.ram").exists(), 20, "leaver's RAM file")
        for crash in range(args.crashes):
            if time.monotonic() - started > args.deadline:
                self.summary.problems.append(
                    f"deadline of {args.deadline}s reached after {crash} crashes"
                )
                break
            time.sleep(rng.uniform(0.05, args.max_gap))  # a random moment, not a synchronisation
            for name in rng.sample(names, rng.randint(0, len(names))):
                self.resize(name)
            if crash == 0:
                gone.kill(
                    signal.SIGKILL
                )  # leaves for good; the host learns it only as a disconnect
            if rng.random() < args.guest_kill_rate:
                victim = rng.choice(names)
                self.kill_guest(victim)
                self.guests[victim] = self.daemons.restart(self.guests[victim])
                self.every_pid.append(self.guests[victim].pid)
                self.summary.guest_restarts += 1
            self.host.kill(signal.SIGKILL)
            self.restart_host()
            self.summary.crashes += 1
            self.log(f"crash {crash + 1}: host restarted")
        self.settle(names)
        self.log("settled")
        self.check_leaver()
        self.log("leaver checked")
        return self.summary

    def resize(self, name: str, size: int | None = None) -> None:
        """A new balloon target: 0 .. 40% of the guest, in 4 MiB steps."""
        if size is None:
            size = self.rng.randint(0, int(self.memory * 0.4) // (4 * MIB)) * 4 * MIB
        with contextlib.suppress(OSError, urllib.error.URLError):
            post_json(f"{self.host.url}/api/v1/guests/{name}/target", {"bytes": size}, self.host.admin_token)
            self.targets[name] = size
            self.summary.resizes += 1

    # -- checks ---------------------------------------------------------------------------

    def views(self, name: str, guest: Process) -> tuple | None:
        try:
            g = guest.metrics()
            h = self.host.metrics()
        except (OSError, urllib.error.URLError, ValueError):
            return None
        return (
            value(h, "balloon_reported_bytes", guest=name),
            value(g, "balloon_guest_reported_bytes"),
            value(h, "balloon_inflated_bytes", guest=name),
            value(g, "balloon_guest_inflated_bytes"),
            value(g, "balloon_guest_inflight_batches"),
            value(g, "balloon_guest_connected"),
        )

    def converged(self, name: str, guest: Process, minimum: int = 0) -> bool:
        """Both sides agree, nothing is in flight, and (idle) at least ``minimum`` bytes are
        reported or inflated — so that "both still at zero" right after a start is no match."""
        view = self.views(name, guest)
        if view is None or view[0] is None:
            return False
        host_reported, guest_reported, host_inflated, guest_inflated, inflight, connected = view
        target = self.targets.get(name, 0)
        return (
            connected == 1
            and inflight == 0
            and host_reported == guest_reported
            and host_inflated == guest_inflated == target
            and host_reported + host_inflated >= minimum
        )

    def settle(self, names: list[str]) -> None:
        """Quiet: the churning guests must meet the host's view, then idle ones exactly."""
        start = time.monotonic()
        self.restate_targets(names)
        for name in names:
            guest = self.guests[name]
            try:
                wait_for(
                    lambda n=name, g=guest: self.converged(n, g),
                    self.args.converge_timeout,
                    f"{name} converging with the host",
                )
            except AssertionError:
                self.summary.problems.append(
                    f"{name} (churn) did not converge: {self.views(name, guest)}"
                )
        self.summary.converge_s = time.monotonic() - start
        self.log("churning guests converged")
        # Quiet guests: restart each one idle on the same RAM file; nothing touches freed
        # pages any more, so every reported or inflated page must be a hole in the file.
        for name in names:
            self.account(name, self.guests[name])
            self.guests[name].kill(signal.SIGTERM)
        for name in names:
            self.guests[name].popen.wait(20)
        idle = self.start_guests(names, workload="idle")
        self.guests.update(zip(names, idle, strict=True))
        self.log("guests restarted idle")
        self.restate_targets(names)
        for name in names:
            guest = self.guests[name]
            try:
                wait_for(
                    lambda n=name, g=guest: self.converged(n, g, self.memory // 2),
                    self.args.converge_timeout,
                    f"{name} (idle) converging with the host",
                )
            except AssertionError:
                self.summary.problems.append(
                    f"{name} (idle) did not converge: {self.views(name, guest)}"
                )
                continue
            self.check_reclaim(name)
        for name in names:
            self.account(name, self.guests[name])

    def restate_targets(self, names: list[str]) -> None:
        """A restarted host knows no targets (the guests keep their balloons) and a
        restarted guest starts with an empty one: state the final targets once more.

        (A host that kept running sends a restarted guest its known target right after
        WELCOME; targets do not survive a host restart, so the admin call covers that.)
        """
        for name in names:
            wait_for(
                lambda n=name: (self.views(n, self.guests[n]) or (None,))[0] is not None,
                self.args.converge_timeout,
                f"{name} known to the host",
            )
            self.resize(name, self.targets.get(name, 0))

    def account(self, name: str, guest: Process) -> None:
        metrics = {}
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            metrics = guest.metrics()
        self.summary.pages_checked += int(
            self.checked.pop(name, 0.0)
            + (value(metrics, "balloon_guest_canary_pages_checked_total") or 0)
        )
        self.summary.pages_lost += int(value(metrics, "balloon_guest_canary_failures_total") or 0)

    def check_reclaim(self, name: str) -> None:
        path = self.ram_dir / f"{name}.ram"
        h = self.host.metrics()
        reclaimed = value(h, "balloon_reclaimed_bytes", guest=name)
        given = (value(h, "balloon_reported_bytes", guest=name) or 0) + (
            value(h, "balloon_inflated_bytes", guest=name) or 0
        )
        stat = path.stat()
        kernel = stat.st_size - stat.st_blocks * 512
        self.log(
            f"{name}: reclaimed {reclaimed:.0f} (kernel {kernel}) >= reported+inflated {given:.0f}"
        )
        if reclaimed != kernel:
            self.summary.problems.append(
                f"{name}: host says {reclaimed} reclaimed, the kernel {kernel}"
            )
        if kernel < given:
            self.summary.problems.append(
                f"{name}: {given} bytes reported+inflated but only {kernel} are holes"
            )

    def check_leaver(self) -> None:
        try:
            wait_for(
                lambda: not (self.ram_dir / "leaver.ram").exists(),
                self.args.retention + 20,
                "the leaver's RAM file to be removed after the retention",
            )
        except AssertionError as error:
            self.summary.problems.append(str(error).splitlines()[0])
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{self.host.url}/api/v1/guests", timeout=2) as response:
                ids = {guest["id"] for guest in json.load(response)["guests"]}
            if "leaver" in ids:
                self.summary.problems.append("the host still lists the guest that left")
            if any(dict(labels).get("guest") == "leaver" for _, labels in self.host.metrics()):
                self.summary.problems.append(
                    "the host still exports series for the guest that left"
                )

    def logged_losses(self) -> int:
        """Pages every guest incarnation logged as lost (canary check failed)."""
        lost = 0
        for log in self.daemons.folder.glob("guest-*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if "canary check failed" in line:
                    try:
                        lost += int(json.loads(line).get("pages", 1))
                    except ValueError:
                        lost += 1
        return lost

    def close(self) -> None:
        self.summary.pages_lost = max(self.summary.pages_lost, self.logged_losses())
        if self.summary.pages_lost:
            self.summary.problems.append(f"{self.summary.pages_lost} guest pages lost their canary")
        self.daemons.close()
        leaked = [pid for pid in self.every_pid if pid_alive(pid)]
        if leaked:
            self.summary.problems.append(f"processes still running: {leaked}")
        shutil.rmtree(self.ram_dir, ignore_errors=True)


def run(argv=None) -> Summary:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crashes", type=int, default=20, help="host SIGKILLs (default 20)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--guests", type=int, default=4, help="churning guests (default 4)")
    parser.add_argument("--memory-mib", type=int, default=64, help="memory of each guest")
    parser.add_argument("--rate", type=int, default=1500, help="churn allocations per second")
    parser.add_argument("--retention", type=float, default=3.0, help="host --retention, seconds")
    parser.add_argument("--max-gap", type=float, default=2.0, help="longest pause between crashes")
    parser.add_argument(
        "--guest-kill-rate", type=float, default=0.3, help="chance a guest dies too"
    )
    parser.add_argument("--converge-timeout", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=900.0, help="stop crashing after this")
    parser.add_argument("--verbose", action="store_true", help="print progress with timestamps")
    parser.add_argument(
        "--ram-base",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where the RAM folder goes (a tmpfs)",
    )
    args = parser.parse_args(argv)
    chaos = Chaos(args)
    try:
        chaos.run()
    except AssertionError as error:  # a wait_for that could not be absorbed
        chaos.summary.problems.append(str(error).splitlines()[0])
    finally:
        chaos.close()
    return chaos.summary


def main(argv=None) -> int:
    summary = run(argv)
    print(summary.line())
    for problem in summary.problems:
        print(f"  problem: {problem}")
    return 0 if not summary.problems else 1


if __name__ == "__main__":
    sys.exit(main())

"""``make stack``: the demo's host and three guests plus a real Prometheus, no containers.

Prometheus is Debian's ``prometheus`` binary (``make stack`` apt-installs the package when it
is missing and it can) running deploy/prometheus/prometheus.yml as shipped except for three
things: the targets are this run's loopback ports, scrape and rule intervals are 5 s (so the
first evaluation comes quickly), and the rule files are deploy/'s by absolute path. Once
Prometheus reports every target up (``/api/v1/targets``) and every rule evaluated healthy
(``/api/v1/rules``), the stack says so and shows the demo's live view; at the end it checks
both again and exits 1 if either went bad. ``STACK_SECONDS=N`` stops it by itself, Ctrl-C
or SIGTERM any time; everything it made (processes, the temporary folder with the RAM
files and Prometheus' TSDB) is gone afterwards.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from guest_agent.demo import Demo, _seconds_from_env, free_port, run

PROMETHEUS_DIR = Path(__file__).resolve().parent / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted(p for p in PROMETHEUS_DIR.glob("*rules*.yml") if "test" not in p.name)
INTERVAL = "5s"
HEALTHY_DEADLINE = 90.0


def prometheus_config(host_target: str, guest_targets: list[tuple[str, str | None]],
                      interval: str = INTERVAL) -> dict:
    """deploy/'s scrape config pointed at these targets.

    ``guest_targets`` are (address, guest label); a label of None leaves the target
    unlabelled, so the shipped relabelling takes the guest id from the address.
    """
    config = yaml.safe_load(CONFIG.read_text())
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    config["rule_files"] = [str(path) for path in RULE_FILES]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["balloon-host"]["static_configs"] = [{"targets": [host_target]}]
    jobs["balloon-guest"]["static_configs"] = [
        {"targets": [address], **({"labels": {"guest": guest}} if guest else {})}
        for address, guest in guest_targets]
    return config


def get_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise ValueError(f"{url}: {body}")
    return body["data"]


class Health:
    """What Prometheus says about its targets and rules at one moment."""

    def __init__(self, targets: list[dict], groups: list[dict]) -> None:
        self.targets = targets
        self.rules = [rule for group in groups for rule in group["rules"]]

    def problems(self, expected_targets: int) -> list[str]:
        found = []
        if len(self.targets) != expected_targets:
            found.append(f"{len(self.targets)} of {expected_targets} targets known")
        found += [f"target {t['labels'].get('job')}/{t['labels'].get('instance')}: {t['health']} "
                  f"{t.get('lastError') or ''}".rstrip() for t in self.targets if t["health"] != "up"]
        found += [f"rule {r['name']}: {r['health']} {r.get('lastError') or ''}".rstrip()
                  for r in self.rules if r["health"] != "ok"]
        if not self.rules:
            found.append("no rules loaded")
        return found

    def summary(self) -> str:
        jobs: dict[str, int] = {}
        for target in self.targets:
            jobs[target["labels"]["job"]] = jobs.get(target["labels"]["job"], 0) + 1
        recording = sum(1 for r in self.rules if r["type"] == "recording")
        firing = [r["name"] for r in self.rules if r["type"] == "alerting" and r.get("state") == "firing"]
        return (f"{len(self.targets)} targets up ({', '.join(f'{job} {n}' for job, n in sorted(jobs.items()))}); "
                f"{len(self.rules)} rules healthy ({recording} recording, {len(self.rules) - recording} alerting"
                f"{', firing: ' + ' '.join(firing) if firing else ', none firing'})")


class Stack(Demo):
    def __init__(self, seconds: float | None, prometheus: str, out=sys.stdout) -> None:
        super().__init__(seconds, out)
        self.prometheus = prometheus
        self.prometheus_url = f"http://127.0.0.1:{free_port()}"

    def start(self) -> None:
        super().start()
        guests = [(f"127.0.0.1:{port}", name) for name, port in self.guest_ports.items()]
        config_path = self.folder / "prometheus.yml"
        config = prometheus_config(f"127.0.0.1:{self.host_port}", guests)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn("prometheus", [self.prometheus, f"--config.file={config_path}",
                                   f"--storage.tsdb.path={self.folder / 'tsdb'}",
                                   f"--web.listen-address={self.prometheus_url.removeprefix('http://')}",
                                   "--log.level=warn"])
        health = self.wait_healthy()
        print(f"prometheus: {health.summary()}", file=self.out, flush=True)

    def health(self) -> Health:
        targets = get_json(f"{self.prometheus_url}/api/v1/targets?state=active")["activeTargets"]
        groups = get_json(f"{self.prometheus_url}/api/v1/rules")["groups"]
        return Health(targets, groups)

    def wait_healthy(self, deadline: float = HEALTHY_DEADLINE) -> Health:
        """Poll Prometheus until every target is up and every rule evaluated without error."""
        end = time.monotonic() + deadline
        problems = ["prometheus not answering yet"]
        while time.monotonic() < end:
            self.check_children()
            try:
                health = self.health()
            except (OSError, urllib.error.URLError, ValueError) as error:
                problems = [f"prometheus: {error}"]
            else:
                problems = health.problems(1 + len(self.guest_ports))
                if not problems:
                    return health
            time.sleep(0.5)
        raise RuntimeError(f"not healthy after {deadline:g}s: " + "; ".join(problems))

    def print_urls(self) -> None:
        print(f"prometheus {self.prometheus_url}/targets   {self.prometheus_url}/rules   "
              f"{self.prometheus_url}/alerts", file=self.out, flush=True)
        super().print_urls()

    def show(self) -> None:
        super().show()
        health = self.health()  # once more at the end: still scraping, still evaluating
        problems = health.problems(1 + len(self.guest_ports))
        if problems:
            raise RuntimeError("unhealthy at the end: " + "; ".join(problems))
        print(f"prometheus at the end: {health.summary()}", file=self.out, flush=True)


def main() -> int:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        print("stack: prometheus is not installed: apt-get install prometheus "
              "(`make stack` does it when run as root)", file=sys.stderr)
        return 1
    return run(Stack(_seconds_from_env("STACK_SECONDS"), prometheus), name="stack")


if __name__ == "__main__":
    raise SystemExit(main())

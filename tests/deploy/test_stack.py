"""`make stack` (deploy/stack.py) as a user runs it: a few seconds, then it stops by itself,
having seen every target up and every rule healthy in Prometheus, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from deployfiles import ROOT, STACK, daemons_available, load_stack, tool, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(")", 1)[1].split()[0] != "Z"


def test_stack_scrapes_both_daemons_with_every_rule_healthy_and_cleans_up():
    reason = daemons_available()
    if reason:
        unavailable(f"daemons not runnable: {reason}")
    tool("prometheus")
    result = subprocess.run([sys.executable, str(STACK)], cwd=ROOT, env={**os.environ, "STACK_SECONDS": "3"},
                            capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    first = re.search(r"^prometheus: 4 targets up \(balloon-guest 3, balloon-host 1\); (\d+) rules healthy", out,
                      flags=re.MULTILINE)
    last = re.search(r"^prometheus at the end: 4 targets up .*; (\d+) rules healthy", out, flags=re.MULTILINE)
    assert first and last, out
    assert int(first.group(1)) == int(last.group(1)) >= 15, out  # every rule of deploy/ loaded
    assert "/ui/" in out and "stack stopped" in out
    folder = Path(re.search(r"^balloon-hints demo in (\S+)$", out, flags=re.MULTILINE).group(1))
    assert not folder.exists(), f"{folder} left behind"
    pids = [int(pid) for pid in re.findall(r"=(\d+)", re.search(r"^  pids: (.*)$", out, flags=re.MULTILINE).group(1))]
    assert len(pids) == 5  # host, three guests, prometheus
    assert [pid for pid in pids if _alive(pid)] == []


def test_health_names_each_down_target_and_broken_rule():
    Health = load_stack().Health
    targets = [{"labels": {"job": "balloon-host", "instance": "h:1"}, "health": "up"},
               {"labels": {"job": "balloon-guest", "instance": "g1"}, "health": "down", "lastError": "refused"}]
    groups = [{"rules": [{"name": "a:b:c", "health": "ok", "type": "recording"},
                         {"name": "BalloonX", "health": "err", "lastError": "bad expr", "type": "alerting"}]}]
    problems = Health(targets, groups).problems(expected_targets=3)
    assert problems == ["2 of 3 targets known", "target balloon-guest/g1: down refused", "rule BalloonX: err bad expr"]
    assert Health(targets[:1], groups[:0]).problems(1) == ["no rules loaded"]

"""Every benchmark script runs in its quick mode, so none of them can rot unnoticed.

Only that they run and print is checked here — speed is measured by `make bench`, never
asserted in a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: scripts whose quick mode starts daemons for several seconds
SLOW = {"scale", "channel", "inflate", "sessions"}
SCRIPTS = sorted(path.stem for path in (ROOT / "bench").glob("*.py")
                 if path.stem not in ("__init__", "common", "run_all", "tracker_alternatives"))


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                  for name in SCRIPTS])
def test_quick_mode_exits_0(name):
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick"], cwd=ROOT, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


def test_encodings_markdown_says_where_each_encoding_wins():
    result = subprocess.run([sys.executable, "-m", "bench.encodings", "--quick", "--markdown", "--no-real"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "|---|" in result.stdout and "Where each encoding wins" in result.stdout
    for encoding in ("pfn32", "bitmap", "ranges52", "pairs16"):
        assert f"| {encoding} |" in result.stdout

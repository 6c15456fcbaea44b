"""bench/channel.py in quick mode, so the benchmark cannot rot (no speed is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_channel_bench_quick(tmp_path):
    out = tmp_path / "channel.json"
    result = subprocess.run([sys.executable, "-m", "bench.channel", "--quick", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio daemon/bare" in result.stdout
    summary = json.loads(out.read_text())
    for guest in ("raw", "protocol"):
        table = summary["guests"][guest]
        for host in ("daemon", "shell", "bare"):
            assert table[host]["best_batches_per_s"] > 0
            assert table[host]["host_cpu_us_per_batch"] > 0
        assert table["ratio"] == table["daemon"]["best_batches_per_s"] / table["bare"]["best_batches_per_s"]

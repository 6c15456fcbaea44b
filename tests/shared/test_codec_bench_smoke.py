"""bench/codec.py must keep running (make bench relies on it); only its shape is checked.

Speed is measured in bench/, never asserted in unit tests: this runs the quick mode as a
subprocess and checks that it exits 0 and prints every ratio row, not the values.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^(encode|decode) \((reporting|mixed)\)\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+[\d.]+\s+[\d.]+x\s+[\d.]+\s+\d+x\s+copy ")


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "bench.codec", "--quick", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quick_run_prints_every_ratio_row(tmp_path):
    out = run("--json", str(tmp_path / "codec.json"))
    rows = [line for line in out.splitlines() if ROW.match(line)]
    assert sorted(line.split(")")[0] for line in rows) == sorted(
        f"{op} ({mix}" for op in ("encode", "decode") for mix in ("reporting", "mixed"))
    assert "ratio vs copy" in out and "speedup vs loop" in out
    figures = json.loads((tmp_path / "codec.json").read_text())
    assert set(figures["codec"]["rows"]) == {"encode (reporting)", "decode (reporting)",
                                             "encode (mixed)", "decode (mixed)"}
    for row in figures["codec"]["rows"].values():
        assert row["codec_s"] > 0 and row["loop_s"] > 0 and row["copy_payload_s"] > 0
    assert figures["machine"]["nproc"]


def test_markdown_table():
    out = run("--markdown", "--no-batch")
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| op | codec ms | copy ms | ratio vs copy")
    assert len(table) == 2 + 4

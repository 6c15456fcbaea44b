"""bench/run_all.py rewrites only what lies between its markers and keeps the prose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.run_all import ROOT, replace_section

DOC = """# Performance

Intro prose.

## Codec

Prose about the codec.

<!-- bench:codec:start -->
old table
<!-- bench:codec:end -->

More prose after the table.

## Channel

Channel prose, no markers yet.

## Notes

Closing words.
"""


def test_replaces_between_markers_and_keeps_prose():
    out = replace_section(DOC, "codec", "Codec", "| new | table |")
    assert "old table" not in out and "| new | table |" in out
    for prose in ("Intro prose.", "Prose about the codec.", "More prose after the table.", "Closing words."):
        assert prose in out
    assert replace_section(out, "codec", "Codec", "| new | table |") == out  # idempotent


def test_adds_markers_at_the_end_of_an_existing_section():
    out = replace_section(DOC, "channel", "Channel", "figures")
    section = out.split("## Channel", 1)[1].split("## Notes", 1)[0]
    assert section.index("Channel prose") < section.index("<!-- bench:channel:start -->\nfigures\n")
    assert "<!-- bench:channel:end -->" in section and "Closing words." in out
    again = replace_section(out, "channel", "Channel", "newer")
    assert "figures" not in again and again.count("bench:channel:start") == 1


def test_appends_a_missing_section():
    out = replace_section(DOC, "scale", "Scale", "many guests")
    assert out.startswith(DOC.rstrip("\n"))
    assert out.endswith("## Scale\n\n<!-- bench:scale:start -->\nmany guests\n<!-- bench:scale:end -->\n")


def test_run_all_writes_a_section_of_a_copy(tmp_path: Path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(DOC)
    result = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick", "--only", "encodings",
                             "--doc", str(doc)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = doc.read_text()
    assert "Prose about the codec." in text and "old table" in text  # other sections untouched
    generated = text.split("<!-- bench:encodings:start -->", 1)[1].split("<!-- bench:encodings:end -->")[0]
    assert "`python -m bench.encodings --markdown --quick`" in generated
    assert "| layout | encoding |" in generated and "Where each encoding wins" in generated


def test_make_bench_prints_every_claim_with_its_target_and_a_verdict(tmp_path: Path):
    from bench.run_all import claims_of, put_summary, summary_table

    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(DOC)
    result = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick", "--only", "codec", "--doc", str(doc)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    out = doc.read_text()
    claims = claims_of(out)
    assert {c["claim"] for _, c in claims} >= {"codec encode (reporting): time vs a numpy copy",
                                              "codec decode (mixed): speedup vs a per-range loop"}
    assert all(c["target"] and c["measured"] for _, c in claims)
    # the terminal gets the table; the doc gets it under its title, once
    assert "Summary (" in result.stdout and "claims met" in result.stdout
    for _, c in claims:
        assert c["claim"] in result.stdout
        line = next(line for line in result.stdout.splitlines() if c["claim"] in line)
        assert line.rstrip().endswith("met" if c["met"] else "MISSED") and c["target"] in line
    assert out.index("## Summary") < out.index("## Codec") and out.count("<!-- bench:summary:start -->") == 1
    again = put_summary(out, summary_table(claims, "here"))
    assert again.count("bench:summary:start") == 1 and "on here" in again
    missed = summary_table([("load", {"claim": "c", "target": ">= 0.8", "measured": "0.2", "met": False})], "m")
    assert "| load | c | >= 0.8 | 0.2 | **MISSED** |" in missed and "0 of 1 claims met" in missed

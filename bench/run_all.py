"""Run every benchmark and rewrite the generated tables of docs/PERFORMANCE.md (``make bench``).

Each benchmark is a module ``bench/<name>.py`` run as a subprocess with ``--markdown``
(plus ``--quick`` when run_all has it); its stdout — markdown tables and short lines — is
placed in its section of docs/PERFORMANCE.md between the markers

    <!-- bench:NAME:start -->
    <!-- bench:NAME:end -->

under the heading ``## Title``, with one line in front saying when, where and with what
command it was measured. Everything outside the markers (the prose people wrote) is kept.
A section with a heading but no markers gets them at its end; a missing section is
appended. A script that does not know ``--markdown`` is run without it and its output is
kept as a code block. A benchmark module that does not exist is skipped; one that fails
leaves its previous figures in place, is reported, and makes run_all exit 1.

The ``load`` section is measured here: balloon-load against balloon-host next to a bare
asyncio + msgpack channel (issue 6: at least 0.8 of bare's batches/s, bar 0.5), at the
same time on the same machine.

    python -m bench.run_all                      # everything, rewrite docs/PERFORMANCE.md
    python -m bench.run_all --quick --only codec --doc /tmp/perf.md
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import claim, machine_line

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PERFORMANCE.md"
#: (marker name, section title, module); order = order of sections appended to a new doc
SECTIONS = (
    ("codec", "Codec", "bench.codec"),
    ("tracker", "Tracker", "bench.tracker"),
    ("channel", "Channel", "bench.channel"),
    ("allocator", "Allocator", "bench.allocator"),
    ("inflate", "Inflate", "bench.inflate"),
    ("encodings", "Encodings", "bench.encodings"),
    ("sessions", "Hot path", "bench.sessions"),
    ("scale", "Scale", "bench.scale"),
    ("footprint", "Guest agent footprint", "bench.footprint"),
    ("load", "Load", None),  # measured by this module
)
TIMEOUT_S = 1800
#: what bench.common.claim writes into a section
CLAIM = re.compile(r"<!-- claim: (\{.*?\}) -->")


def start_marker(name: str) -> str:
    return f"<!-- bench:{name}:start -->"


def end_marker(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def replace_section(doc: str, name: str, title: str, body: str) -> str:
    """Put ``body`` between the markers of ``name``, adding markers (or the section) if missing."""
    block = f"{start_marker(name)}\n{body.strip()}\n{end_marker(name)}"
    start, end = start_marker(name), end_marker(name)
    if start in doc and end in doc and doc.index(start) < doc.index(end):
        before, rest = doc.split(start, 1)
        _, after = rest.split(end, 1)
        return before + block + after
    heading = re.search(rf"^## {re.escape(title)}[ \t]*$", doc, flags=re.MULTILINE)
    if heading is None:
        return doc.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    following = re.search(r"^## ", doc[heading.end():], flags=re.MULTILINE)
    cut = heading.end() + following.start() if following else len(doc)
    section = doc[:cut].rstrip("\n")
    return section + f"\n\n{block}\n" + ("\n" + doc[cut:] if following else "")


def run_script(module: str, quick: bool) -> tuple[bool, str, str, float]:
    """Run one benchmark; returns (ok, markdown, command, seconds)."""
    args = [sys.executable, "-m", module, "--markdown"] + (["--quick"] if quick else [])
    started = time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT_S)
    markdown = True
    if result.returncode == 2 and "--markdown" in result.stderr:  # the script has no --markdown
        args.remove("--markdown")
        result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT_S)
        markdown = False
    seconds = time.monotonic() - started
    command = "python -m " + " ".join(args[2:])
    if result.returncode != 0:
        return False, result.stderr.strip()[-2000:], command, seconds
    text = result.stdout.strip()
    return True, text if markdown else f"```\n{text}\n```", command, seconds


# -- the load section -------------------------------------------------------------------------


def _run_json(args: list[str], timeout: float = 600) -> dict:
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(args[:4])} ... failed ({result.returncode}): {result.stderr[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1] if args[-1] != "-" else result.stdout)


def _bare_host(workdir: Path):
    """The bare host of bench/channel.py when it has one (same yardstick), else balloon-load's."""
    sock = workdir / f"bare-{time.monotonic_ns()}.sock"
    channel = ROOT / "bench" / "channel.py"
    if channel.exists() and "--bare-host" in channel.read_text():
        command = [sys.executable, "-m", "bench.channel", "--bare-host", str(sock)]
    else:
        command = [sys.executable, "-m", "guest_agent.load.bare", "serve", f"unix:{sock}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the bare host did not start")
        time.sleep(0.02)
    return process, f"unix:{sock}"


def _stop(process) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure_load(quick: bool) -> str:
    """balloon-load vs the bare channel, alternating, best of N, then the 32-guest run."""
    from bench.scale import Host

    batches = 5000 if quick else 100_000
    runs = 1 if quick else 3
    load = [sys.executable, "-m", "guest_agent.load"]
    single = ["--guests", "1", "--batches", str(batches), "--batch-ranges", "32", "--quiet", "--json", "-"]
    best = {"bare": 0.0, "load-bare": 0.0, "load-host": 0.0}
    p99 = {}
    with tempfile.TemporaryDirectory(prefix="balloon-bench-") as tmp:
        workdir = Path(tmp)
        for _ in range(runs):
            bare, bare_address = _bare_host(workdir)
            try:
                figure = _run_json([sys.executable, "-m", "guest_agent.load.bare", "client", bare_address,
                                    "--batches", str(batches), "--batch-ranges", "32"])
                best["bare"] = max(best["bare"], figure["batches_per_s"])
                figure = _run_json(load + ["--connect", bare_address, *single])
                if figure["batches_per_s"] > best["load-bare"]:
                    best["load-bare"], p99["load-bare"] = figure["batches_per_s"], figure["latency_s"]["p99"]
            finally:
                _stop(bare)
            host = Host(workdir, max_guests=1024)
            try:
                figure = _run_json(load + ["--connect", f"unix:{host.sock}", *single])
                if figure["batches_per_s"] > best["load-host"]:
                    best["load-host"], p99["load-host"] = figure["batches_per_s"], figure["latency_s"]["p99"]
            finally:
                host.stop()
        host = Host(workdir, max_guests=1024)
        try:
            many_args = ["--guests", "32", "--duration", "1s" if quick else "5s"]
            many = _run_json(load + ["--connect", f"unix:{host.sock}", *many_args, "--quiet", "--json", "-"])
        finally:
            host.stop()
    bare = best["bare"]
    verdict = best["load-host"] / bare if bare else 0.0
    rows = [
        ("bare channel: bare client → bare host (no validation, no tracking)",
         f"python -m guest_agent.load.bare client ADDR --batches {batches}", bare, None, 1.0),
        ("balloon-load → bare host (the load generator's own ceiling)",
         f"balloon-load --connect ADDR {' '.join(single[:6])}", best["load-bare"], p99.get("load-bare"),
         best["load-bare"] / bare if bare else None),
        ("**balloon-load → balloon-host** (issue 19: ≥ 0.5 of bare; issue 6: 0.8)",
         f"balloon-load --connect ADDR {' '.join(single[:6])}", best["load-host"], p99.get("load-host"), verdict),
        ("balloon-load, 32 guests → balloon-host (closed loop)",
         f"balloon-load --connect ADDR {' '.join(many_args)}", many["batches_per_s"], many["latency_s"]["p99"],
         many["batches_per_s"] / bare if bare else None),
    ]
    lines = ["| measurement | command | batches/s | ack p99 ms | vs bare |", "|---|---|---|---|---|"]
    for label, command, rate, latency, ratio in rows:
        lines.append(f"| {label} | `{command}` | {rate:,.0f} | "
                     f"{'—' if latency is None else f'{latency * 1e3:.2f}'} | "
                     f"{'—' if ratio is None else f'{ratio:.3f}'} |")
    lines += ["", f"Best of {runs} alternating run(s) of {batches:,} batches of 32 ranges, window 16; "
                  f"32-guest run: {many['batches']:,} batches, errors {sum(many['errors'].values())}, "
                  f"window stall {many['window_stall_s']:.1f} guest-s.",
              f"Ratio to bare: **{verdict:.3f}** — "
              + ("meets the 0.8 target." if verdict >= 0.8 else
                 "meets the 0.5 bar, not the 0.8 target." if verdict >= 0.5 else
                 "below the 0.5 bar: the host's per-batch work (validation, decode, tracker, "
                 "metrics) costs more than the bare loop's framing; see ## Channel and ## Hot path.")
              + (f" balloon-load itself reaches {ceiling:.3f} of the bare channel against the bare host, so "
                 "no host can lift this ratio above that here." if bare and (ceiling := best["load-bare"] / bare) < 0.5
                 else ""),
              claim("load: ranges52, one guest, closed loop: balloon-load → balloon-host vs the bare channel",
                    ">= 0.5 of bare (issue 19; 0.8 issue 6)", f"{verdict:.3f}", verdict >= 0.5)]
    return "\n".join(lines)


# -- the summary ---------------------------------------------------------------------------


def claims_of(doc: str) -> list[tuple[str, dict]]:
    """(section name, claim) for every claim line inside a section's markers, in doc order."""
    found = []
    for name, _, _ in SECTIONS:
        start, end = start_marker(name), end_marker(name)
        if start in doc and end in doc:
            body = doc.split(start, 1)[1].split(end, 1)[0]
            found += [(name, json.loads(match)) for match in CLAIM.findall(body)]
    return found


def summary_table(claims: list[tuple[str, dict]], machine: str) -> str:
    """Every claim, its target, what was measured and met/MISSED, as markdown."""
    if not claims:
        return "No benchmark declared a claim."
    met = sum(1 for _, c in claims if c["met"])
    lines = [f"{met} of {len(claims)} claims met on {machine}. Ratios (vs a copy, a loop, the bare "
             "channel, the legacy mode) are what carries over to another CPU; absolute times do not.", "",
             "| section | claim | target | measured | verdict |", "|---|---|---|---|---|"]
    for name, c in claims:
        lines.append(f"| {name} | {c['claim']} | {c['target']} | {c['measured']} | "
                     f"{'met' if c['met'] else '**MISSED**'} |")
    return "\n".join(lines)


def put_summary(doc: str, table: str) -> str:
    """The summary goes right under the document's title (markers added the first time)."""
    start, end = start_marker("summary"), end_marker("summary")
    block = f"{start}\n{table}\n{end}"
    if start in doc and end in doc:
        before, rest = doc.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    title, sep, rest = doc.partition("\n")
    return f"{title}{sep}\n## Summary\n\n{block}\n{rest}"


def plain_table(claims: list[tuple[str, dict]]) -> str:
    """The summary for the terminal: aligned columns, one claim a line."""
    rows = [("section", "claim", "target", "measured", "verdict")]
    rows += [(name, c["claim"], c["target"], c["measured"], "met" if c["met"] else "MISSED") for name, c in claims]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke test)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[s[0] for s in SECTIONS],
                        help="run only these sections")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document to rewrite (default docs/PERFORMANCE.md)")
    parser.add_argument("--dry-run", action="store_true", help="print the sections instead of writing the doc")
    args = parser.parse_args(argv)

    new_doc = "# Performance\n\nEvery figure below is rewritten by `make bench` (`python -m bench.run_all`).\n"
    failed = []
    printed = []  # --dry-run: the sections as printed
    for name, title, module in SECTIONS:
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        if module is None:
            try:
                ok, body, command = True, measure_load(args.quick), "python -m bench.run_all --only load" + (
                    " --quick" if args.quick else "")
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as error:
                ok, body, command = False, str(error), "python -m bench.run_all --only load"
            seconds = time.monotonic() - started
        else:
            if not (ROOT / (module.replace(".", "/") + ".py")).exists():
                print(f"{name}: {module} does not exist yet, skipped", file=sys.stderr)
                continue
            print(f"{name}: running {module} ...", file=sys.stderr, flush=True)
            try:
                ok, body, command, seconds = run_script(module, args.quick)
            except subprocess.TimeoutExpired:
                ok, body, command, seconds = False, f"timed out after {TIMEOUT_S} s", module, TIMEOUT_S
        if not ok:
            failed.append(name)
            print(f"{name}: FAILED ({seconds:.0f} s)\n{body}", file=sys.stderr)
            continue
        stamp = f"_Generated by `make bench`: `{command}` on {machine_line()} ({seconds:.0f} s)._"
        section = f"{stamp}\n\n{body}"
        print(f"{name}: done in {seconds:.0f} s", file=sys.stderr)
        if args.dry_run:
            print(f"## {title}\n\n{section}\n")
            printed.append(f"{start_marker(name)}\n{section}\n{end_marker(name)}")
        else:
            # read-modify-write per section: edits made meanwhile (by people) are kept, and a
            # later failure keeps what was measured so far
            doc = args.doc.read_text() if args.doc.exists() else new_doc
            args.doc.write_text(replace_section(doc, name, title, section))
    doc = "\n".join(printed) if args.dry_run else (args.doc.read_text() if args.doc.exists() else "")
    claims = claims_of(doc)
    if not args.dry_run and claims:
        args.doc.write_text(put_summary(doc, summary_table(claims, machine_line())))
    print(f"\nSummary ({sum(1 for _, c in claims if c['met'])} of {len(claims)} claims met; "
          f"figures and commands in {args.doc}):\n{plain_table(claims)}")
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

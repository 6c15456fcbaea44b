"""balloon-load: load-test a balloon host the way wrk and vegeta load-test HTTP servers.

Exit codes:
  0  the run completed and every threshold held
  1  a threshold failed (--max-p99 or --max-errors)
  2  bad command line
  3  nothing was acknowledged at all (host unreachable, or it failed every session)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from shared.runtime.addresses import default_address, parse_address
from shared.vocabulary import HINT, INFLATE, RANGES52, REPORT

from .payloads import ENCODINGS
from .report import plot, render_text, summary
from .stats import latency_summary
from .worker import LoadConfig, run_load

EXIT_OK, EXIT_THRESHOLD, EXIT_USAGE, EXIT_NOTHING = 0, 1, 2, 3
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """``5``, ``5s``, ``250ms``, ``1us``, ``2m`` -> seconds."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (try 5s, 10ms, 1us)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def read_tokens(path: str) -> dict[str, str]:
    """A file holding one token for every guest, or the host's ``guest-id token`` lines."""
    tokens: dict[str, str] = {}
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
    lines = [line for line in lines if line]
    if len(lines) == 1 and len(lines[0].split()) == 1:
        return {"*": lines[0]}
    for line in lines:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}: expected 'guest-id token' lines or a single token")
        tokens[parts[0]] = parts[1]
    return tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balloon-load",
        description="Drive many protocol guests against a balloon host and report throughput and "
                    "ack latency (HdrHistogram), like wrk/vegeta.",
        epilog=__doc__.split("\n", 2)[2] + "\nExample: balloon-load --connect unix:/run/balloon/host.sock "
               "--guests 32 --duration 10s --json out.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("target")
    target.add_argument("--connect", default=default_address(), type=address, metavar="ADDR",
                        help="host address: unix:/path, tcp:HOST:PORT or vsock:CID:PORT (default "
                             f"{default_address()}, balloon-host's default --listen)")
    target.add_argument("--token-file", metavar="FILE",
                        help="a token for every guest, or the host's 'guest-id token' lines")
    target.add_argument("--id-prefix", default="load", metavar="NAME",
                        help="guest ids are NAME-0 .. NAME-(N-1) (default load); use distinct prefixes "
                             "for runs against the same host at the same time")
    shape = parser.add_argument_group("load shape")
    shape.add_argument("--guests", type=positive_int, default=1, metavar="N", help="guests (connections), default 1")
    shape.add_argument("--processes", type=positive_int, default=1, metavar="P",
                       help="spread the guests over P processes to use more cores (default 1)")
    shape.add_argument("--duration", type=duration, metavar="S",
                       help="run for S (e.g. 10s); with --batches, whichever comes first")
    shape.add_argument("--batches", type=positive_int, metavar="N", help="batches per guest, then stop")
    shape.add_argument("--rate", type=positive_float, metavar="R",
                       help="open loop: R batches/s per guest at a constant rate; latency counts from the "
                            "intended send time (wrk2). Default: closed loop, the window kept full")
    shape.add_argument("--ramp", type=duration, default=0.0, metavar="S",
                       help="start the guests evenly over S instead of all at once (rates cover the whole run, ramp included)")
    batch = parser.add_argument_group("batches")
    batch.add_argument("--kind", choices=(REPORT, INFLATE, HINT), default=REPORT,
                       help="REPORT, INFLATE or HINT batches (default report)")
    batch.add_argument("--reuse", action="store_true",
                       help="report kind: follow every REPORT with a REUSE of the same ranges, so the "
                            "host's tracker churns instead of saturating")
    batch.add_argument("--encoding", choices=ENCODINGS, default=RANGES52,
                       help="ranges52 (the seed's 64-bit words, default) or pfn32 (legacy, <=256 PFNs)")
    batch.add_argument("--batch-ranges", type=positive_int, default=32, metavar="K",
                       help="ranges per batch (pfn32: PFNs per batch, at most 256); default 32")
    batch.add_argument("--fragmentation", type=fraction, default=0.1, metavar="F",
                       help="free memory layout the ranges come from: 0 contiguous blocks .. 1 scattered "
                            "single pages (default 0.1)")
    batch.add_argument("--guest-pages", type=positive_int, default=262144, metavar="N",
                       help="RAM each load guest announces in HELLO, in 4 KiB pages (default 262144 = 1 GiB); "
                            "every range lies inside it")
    output = parser.add_argument_group("output and gates")
    output.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' for stdout)")
    output.add_argument("--plot", metavar="FILE.png",
                        help="PNG of acked batches/s and ack latency (p50, p99, max) per second of the run "
                             "(matplotlib: the 'plot' extra); a last partial second under 0.25 s is left out, "
                             "a longer one is scaled to a full second")
    output.add_argument("--max-p99", type=duration, metavar="DURATION",
                        help="exit 1 when the p99 ack latency exceeds DURATION (e.g. 10ms)")
    output.add_argument("--max-errors", type=int, metavar="N", help="exit 1 when more than N errors happened")
    output.add_argument("--quiet", action="store_true", help="no progress bar and no text report")
    return parser


class Progress:
    """A rich progress bar with the last second's rate and p99 (only on a terminal)."""

    def __init__(self, total: float, by_time: bool) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.by_time = by_time
        self.total = total
        self.done = 0
        self.progress = Progress(TextColumn("[bold]balloon-load"), BarColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[p99]}"),
                                 TextColumn("{task.fields[errors]}"), transient=True)
        self.task = self.progress.add_task("load", total=total, rate="", p99="", errors="")
        self.errors = 0
        self.seconds: dict[int, tuple[int, int]] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def tick(self, slot: dict) -> None:
        # with several processes a second's slot arrives once per worker, growing each time
        self.seconds[slot["second"]] = (slot["batches"], slot["errors"])
        self.done = sum(batches for batches, _ in self.seconds.values())
        self.errors = sum(errors for _, errors in self.seconds.values())
        p99 = latency_summary(slot["histogram"])["p99"]
        completed = slot["second"] + 1 if self.by_time else self.done
        self.progress.update(self.task, completed=min(completed, self.total),
                             rate=f"{slot['batches']:,} batches/s",
                             p99="p99 -" if p99 is None else f"p99 {p99 * 1e3:.2f} ms",
                             errors=f"errors {self.errors}" if self.errors else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration is None and args.batches is None:
        parser.error("give --duration or --batches")
    tokens: dict[str, str] = {}
    if args.token_file:
        try:
            tokens = read_tokens(args.token_file)
        except (OSError, ValueError) as error:
            parser.error(f"--token-file: {error}")
    config = LoadConfig(connect=args.connect, guests=args.guests, processes=args.processes,
                        duration=args.duration, batches=args.batches, rate=args.rate,
                        batch_ranges=args.batch_ranges, fragmentation=args.fragmentation, kind=args.kind,
                        reuse=args.reuse, encoding=args.encoding, ramp=args.ramp, id_prefix=args.id_prefix,
                        tokens=tokens, guest_pages=args.guest_pages)
    if args.reuse and args.kind != REPORT:
        parser.error("--reuse goes with --kind report")
    try:
        _check_id(f"{args.id_prefix}-{args.guests - 1}")
    except ValueError as error:
        parser.error(str(error))

    show = sys.stdout.isatty() and not args.quiet and args.json != "-"
    try:
        if show:
            by_time = args.duration is not None
            total = args.duration if by_time else args.batches * args.guests
            with Progress(total, by_time) as progress:
                result = run_load(config, progress.tick)
        else:
            result = run_load(config)
    except KeyboardInterrupt:
        print("balloon-load: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError) as error:
        print(f"balloon-load: {error}", file=sys.stderr)
        return EXIT_NOTHING

    data = summary(result)
    if not args.quiet and args.json != "-":
        print(render_text(data))
    if args.json == "-":
        try:
            json.dump(data, sys.stdout, indent=2)
            print()
        except BrokenPipeError:  # `balloon-load --json - | head`
            sys.stderr.close()
    elif args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.plot:
        plot(data, args.plot)
    return verdict(data, args.max_p99, args.max_errors)


def verdict(data: dict, max_p99: float | None, max_errors: int | None) -> int:
    """The exit code: thresholds first, then 'nothing acked at all'."""
    code = EXIT_OK
    p99 = data["latency_s"]["p99"]
    if max_p99 is not None and (p99 is None or p99 > max_p99):
        print(f"balloon-load: p99 {'-' if p99 is None else f'{p99 * 1e3:.3f} ms'} exceeds "
              f"--max-p99 {max_p99 * 1e3:.3f} ms", file=sys.stderr)
        code = EXIT_THRESHOLD
    errors = sum(data["errors"].values())
    if max_errors is not None and errors > max_errors:
        print(f"balloon-load: {errors} errors exceed --max-errors {max_errors}", file=sys.stderr)
        code = EXIT_THRESHOLD
    if data["batches"] == 0:
        print("balloon-load: no batch was acknowledged", file=sys.stderr)
        return EXIT_NOTHING
    return code


def _check_id(guest_id: str) -> None:
    from shared.messages import valid_guest_id

    if not valid_guest_id(guest_id):
        raise ValueError(f"--id-prefix gives invalid guest ids such as {guest_id!r}")


if __name__ == "__main__":
    sys.exit(main())

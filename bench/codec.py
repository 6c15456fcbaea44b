"""Benchmark the range codec (shared/ranges.py) against a Python loop and a plain copy.

The bar (docs/PERFORMANCE.md, "Codec"): pack and unpack of the 52/12 range words within 3x of a plain
numpy copy of the same bytes, and at least 50x a per-range Python loop. All three are
timed in one run on the same ranges, best of N:

- ``codec``: ``encode_ranges(pfns, counts) -> bytes`` and ``decode_ranges(bytes) -> (pfns, counts)``;
- ``loop``: the same codec written per range with ``struct`` (what a straightforward
  port of the C driver looks like), producing the same bytes and the same arrays;
- ``copy``: ``ndarray.copy()`` of the payload's words (8 bytes per range word), and, as
  a second yardstick, of the (pfn, count) arrays the codec reads or writes (16 bytes
  per range).

Two mixes of sorted ranges, each timed: ``reporting`` — buddy blocks of order 0..10
(1..1024 pages), what free page reporting sends, never escaped — and ``mixed`` — the same
plus 3% coalesced runs of >= 4096 pages that take the escape, half of those an exact
multiple of 4096 (a count word whose low 12 bits are 0, the decoder's hard case).

    .venv/bin/python -m bench.codec                  # 1M ranges
    .venv/bin/python -m bench.codec --markdown       # the table for docs/PERFORMANCE.md
    .venv/bin/python -m bench.codec --quick          # seconds; make test runs this
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import best_of, claim, machine_info, machine_line  # noqa: E402
from shared.ranges import decode_ranges, encode_ranges  # noqa: E402

COPY_TARGET = 3.0
LOOP_TARGET = 50.0
BATCH_RANGES = 4096  # the seed's 32 KiB buffer


def realistic_ranges(n: int, escaped_share: float, seed: int = 2016) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, non-touching ranges: buddy blocks plus a few long coalesced runs."""
    rng = np.random.default_rng(seed)
    orders = np.minimum(rng.geometric(0.35, n) - 1, 10)
    counts = (np.uint64(1) << orders.astype(np.uint64)).astype(np.uint64)
    long_runs = rng.random(n) < escaped_share
    k = int(long_runs.sum())
    lengths = rng.integers(4096, 1 << 20, k).astype(np.uint64)
    multiples = rng.random(k) < 0.5
    lengths[multiples] = (lengths[multiples] >> np.uint64(12)) << np.uint64(12)
    counts[long_runs] = lengths
    gaps = rng.integers(1, 64, n).astype(np.uint64)
    pfns = np.cumsum(counts + gaps) - counts
    return pfns.astype(np.uint64), counts


# -- the per-range loop the codec is measured against ------------------------------------

_WORD = struct.Struct("<Q")


def loop_encode(pfns: np.ndarray, counts: np.ndarray) -> bytes:
    pack = _WORD.pack
    out = bytearray()
    for pfn, count in zip(pfns.tolist(), counts.tolist(), strict=True):
        if count < 4096:
            out += pack((pfn << 12) | count)
        else:
            out += pack(pfn << 12)
            out += pack(count)
    return bytes(out)


def loop_decode(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(data) % 8:
        raise ValueError("not whole words")
    pfns: list[int] = []
    counts: list[int] = []
    escaped_pfn = None
    for (word,) in _WORD.iter_unpack(data):
        if escaped_pfn is not None:
            if not word:
                raise ValueError("escaped zero")
            pfns.append(escaped_pfn)
            counts.append(word)
            escaped_pfn = None
            continue
        count = word & 0xFFF
        if count:
            pfns.append(word >> 12)
            counts.append(count)
        else:
            escaped_pfn = word >> 12
    if escaped_pfn is not None:
        raise ValueError("trailing escape")
    return np.array(pfns, dtype=np.uint64), np.array(counts, dtype=np.uint64)


# -- measurement -------------------------------------------------------------------------


MIXES = {
    # Free page reporting sends buddy blocks of order <= 10 (1024 pages): never escaped.
    "reporting": 0.0,
    # Coalesced runs (inflate, long free stretches): a few percent take the escape.
    "mixed": 0.03,
}


def measure(n: int, repeats: int, loop_repeats: int, clock: str = "cpu") -> dict:
    rows = {}
    sizes = {}
    for mix, escaped_share in MIXES.items():
        pfns, counts = realistic_ranges(n, escaped_share)
        payload = encode_ranges(pfns, counts)
        words = np.frombuffer(payload, dtype="<u8")
        # The three implementations must agree before any of them is timed.
        assert loop_encode(pfns, counts) == payload
        decoded = decode_ranges(payload)
        looped = loop_decode(payload)
        assert np.array_equal(decoded[0], pfns) and np.array_equal(decoded[1], counts)
        assert np.array_equal(looped[0], pfns) and np.array_equal(looped[1], counts)
        sizes[mix] = {"escaped_ranges": int(np.count_nonzero(counts > 4095)), "payload_bytes": len(payload),
                      "pages": int(counts.sum())}

        copy_payload = best_of(words.copy, repeats, clock=clock)
        copy_arrays = best_of(lambda: (pfns.copy(), counts.copy()), repeats, clock=clock)  # noqa: B023
        for op, codec, loop in (
            ("encode", lambda: encode_ranges(pfns, counts), lambda: loop_encode(pfns, counts)),  # noqa: B023
            ("decode", lambda: decode_ranges(payload), lambda: loop_decode(payload)),  # noqa: B023
        ):
            codec_s = best_of(codec, repeats, clock=clock)
            loop_s = best_of(loop, loop_repeats, clock=clock)
            rows[f"{op} ({mix})"] = {
                "codec_s": codec_s,
                "loop_s": loop_s,
                "copy_payload_s": copy_payload,
                "copy_arrays_s": copy_arrays,
                "vs_copy": codec_s / copy_payload,
                "vs_copy_arrays": codec_s / copy_arrays,
                "loop_speedup": loop_s / codec_s,
            }
    return {
        "ranges": n,
        "mixes": sizes,
        "repeats": repeats,
        "loop_repeats": loop_repeats,
        "clock": clock,
        "rows": rows,
    }


def per_batch(repeats: int, clock: str = "cpu") -> dict:
    """One seed-sized batch (4096 ranges): fixed per-call costs dominate here."""
    pfns, counts = realistic_ranges(BATCH_RANGES, MIXES["mixed"], seed=7)
    payload = encode_ranges(pfns, counts)
    words = np.frombuffer(payload, dtype="<u8")
    inner = 50

    def many(function):
        def run():
            for _ in range(inner):
                function()
        return best_of(run, repeats, clock=clock) / inner

    copy_s = many(words.copy)
    out = {}
    for op, codec, loop in (
        ("encode", lambda: encode_ranges(pfns, counts), lambda: loop_encode(pfns, counts)),
        ("decode", lambda: decode_ranges(payload), lambda: loop_decode(payload)),
    ):
        codec_s = many(codec)
        loop_s = best_of(loop, max(1, repeats // 2), clock=clock)
        out[op] = {"codec_s": codec_s, "loop_s": loop_s, "copy_payload_s": copy_s,
                   "vs_copy": codec_s / copy_s, "loop_speedup": loop_s / codec_s}
    return out


# -- output ------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def _verdict(row: dict) -> str:
    copy_ok = row["vs_copy"] <= COPY_TARGET
    loop_ok = row["loop_speedup"] >= LOOP_TARGET
    return f"copy {'met' if copy_ok else 'MISSED'}, loop {'met' if loop_ok else 'MISSED'}"


def render(result: dict, batch: dict | None, markdown: bool) -> str:
    mixes = "; ".join(f"{mix}: {size['escaped_ranges']:,} escaped, {size['payload_bytes']:,} payload bytes"
                      for mix, size in result["mixes"].items())
    head = (f"{result['ranges']:,} ranges per run ({mixes}); best of {result['repeats']} "
            f"(loop: best of {result['loop_repeats']}), {result['clock']} time")
    columns = ["op", "codec ms", "copy ms", "ratio vs copy", "copy 16 B/range ms",
               "ratio vs 16 B/range copy", "loop ms", "speedup vs loop", "targets (<=3x copy, >=50x loop)"]
    lines = []
    for op, row in result["rows"].items():
        lines.append([op, _ms(row["codec_s"]), _ms(row["copy_payload_s"]), f"{row['vs_copy']:.2f}x",
                      _ms(row["copy_arrays_s"]), f"{row['vs_copy_arrays']:.2f}x", _ms(row["loop_s"]),
                      f"{row['loop_speedup']:.0f}x", _verdict(row)])
    batch_columns = ["op (one 4096-range batch, mixed)", "codec µs", "copy µs", "ratio vs copy", "loop µs",
                     "speedup vs loop"]
    batch_lines = []
    if batch:
        for op, row in batch.items():
            batch_lines.append([op, _us(row["codec_s"]), _us(row["copy_payload_s"]), f"{row['vs_copy']:.2f}x",
                                _us(row["loop_s"]), f"{row['loop_speedup']:.0f}x"])
    out = []
    if markdown:
        out.append(f"{head}\n")
        out += _markdown(columns, lines)
        if batch_lines:
            out.append("")
            out += _markdown(batch_columns, batch_lines)
        for op, row in result["rows"].items():
            out.append(claim(f"codec {op}: time vs a numpy copy", f"<= {COPY_TARGET:g}x", f"{row['vs_copy']:.2f}x",
                             row["vs_copy"] <= COPY_TARGET))
            out.append(claim(f"codec {op}: speedup vs a per-range loop", f">= {LOOP_TARGET:g}x",
                             f"{row['loop_speedup']:.0f}x", row["loop_speedup"] >= LOOP_TARGET))
    else:
        out.append(machine_line())
        out.append(head)
        out += _plain(columns, lines)
        if batch_lines:
            out.append("")
            out += _plain(batch_columns, batch_lines)
    return "\n".join(out)


def _markdown(columns, lines):
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def _plain(columns, lines):
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*columns)] + [fmt.format(*line) for line in lines]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranges", type=int, default=1_000_000, help="ranges per run (default 1M)")
    parser.add_argument("--repeats", type=int, default=15, help="best of N for codec and copy (default 15)")
    parser.add_argument("--loop-repeats", type=int, default=3, help="best of N for the Python loop (default 3)")
    parser.add_argument("--quick", action="store_true", help="20k ranges, few repeats: a smoke test")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables for docs/PERFORMANCE.md")
    parser.add_argument("--no-batch", action="store_true", help="skip the one-batch (4096 ranges) table")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this thread's CPU time, robust on a shared machine (default); wall: perf_counter")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.ranges, args.repeats, args.loop_repeats = min(args.ranges, 20_000), 3, 1
    result = measure(args.ranges, args.repeats, args.loop_repeats, args.clock)
    batch = None if args.no_batch else per_batch(3 if args.quick else args.repeats, args.clock)
    print(render(result, batch, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "codec": result, "batch": batch},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

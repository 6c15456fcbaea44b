"""Encodings benchmark: bytes on the wire and encode/decode/apply time of four batch formats.

The formats, each cut into messages the way a driver fills a fixed buffer:

- **pfn32** — the legacy virtio balloon: one 32-bit PFN per 4 KiB page, at most 256 per
  message (1 KiB).
- **bitmap** — the 2016 series' v3 idea: a base PFN and a bitmap of the pages after it;
  a 32 KiB bitmap (262144 pages = 1 GiB) per message, windows without a free page skipped.
- **ranges52** — the seed: one 64-bit word per range, 52 bits of PFN and 12 of length,
  escape to a second word for 4096+ pages; the 32 KiB RangeBuffer (4096 words).
- **pairs16** — Andrea Arcangeli's question in the seed thread: plain (pfn, count) pairs of
  two 64-bit words, no bit mangling; 2048 pairs per 32 KiB message.

Layouts: a guest with half its memory free, fragmentation F from 0 (one free run) through
0.01 (runs of ~100 pages) to 1 (every other page free), see guest_agent/load/layout.py;
plus this machine's real free pages from /proc/kpageflags (guest_agent/memory/procfs.py)
when readable (root). "apply" is the host tracker (host_daemon/tracker.py) applying every
message of the stream to a fresh guest as REPORT batches.

Wire bytes include the msgpack framing of each message (``[3, seq, payload]``). Times are
best of N, in milliseconds for the whole layout.

    python -m bench.encodings               # 8 GiB guest, best of 3
    python -m bench.encodings --quick       # 1 GiB guest, best of 1 (smoke test)
    python -m bench.encodings --markdown    # tables for docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgpack
import numpy as np

from bench.common import best_of, machine_line
from guest_agent.load.layout import free_bitmap, free_layout
from shared.ranges import RangeBuffer, decode_pfn32, decode_ranges, expand_pages, pages_to_ranges
from shared.vocabulary import PFN32, RANGES52

BUFFER_BYTES = 32 * 1024
PFN32_PER_MESSAGE = 256
BITMAP_PAGES = BUFFER_BYTES * 8  # pages one bitmap message covers
PAIRS_PER_MESSAGE = BUFFER_BYTES // 16
ENCODINGS = (PFN32, "bitmap", RANGES52, "pairs16")
FRAGMENTATION = (0.0, 0.01, 0.1, 0.5, 1.0)


# -- the four encoders and decoders (stream of messages) ------------------------------------


def encode_pfn32(pages: int, pfns, counts) -> list[bytes]:
    every = expand_pages(pfns, counts).astype("<u4")
    return [every[i : i + PFN32_PER_MESSAGE].tobytes() for i in range(0, every.size, PFN32_PER_MESSAGE)]


def decode_pfn32_stream(messages):
    return [decode_pfn32(message) for message in messages]


def encode_bitmap(pages: int, pfns, counts) -> list[bytes]:
    windows = -(-pages // BITMAP_PAGES)
    bits = np.zeros(windows * BITMAP_PAGES, dtype=bool)
    bits[:pages] = free_bitmap(pages, pfns, counts)
    bits = bits.reshape(windows, BITMAP_PAGES)
    used = np.flatnonzero(bits.any(axis=1))
    packed = np.packbits(bits[used], axis=1, bitorder="little")
    header = np.empty((used.size, 2), dtype="<u8")
    header[:, 0] = used.astype(np.uint64) * np.uint64(BITMAP_PAGES)  # base PFN
    header[:, 1] = BITMAP_PAGES  # bits that follow
    return [header[i].tobytes() + packed[i].tobytes() for i in range(used.size)]


def decode_bitmap_stream(messages):
    out = []
    for message in messages:
        base, nbits = np.frombuffer(message, dtype="<u8", count=2)
        bits = np.unpackbits(np.frombuffer(message, dtype=np.uint8, offset=16), bitorder="little",
                             count=int(nbits))
        out.append(pages_to_ranges(np.flatnonzero(bits).astype(np.uint64) + base))
    return out


def encode_ranges52(pages: int, pfns, counts) -> list[bytes]:
    buffer = RangeBuffer(BUFFER_BYTES // 8)
    room = buffer.capacity  # a message never holds more ranges than words
    messages = []
    start = 0
    while start < pfns.size:
        start += buffer.extend(pfns[start : start + room], counts[start : start + room])
        messages.append(buffer.take())
    return messages


def decode_ranges52_stream(messages):
    return [decode_ranges(message) for message in messages]


def encode_pairs16(pages: int, pfns, counts) -> list[bytes]:
    pairs = np.empty((pfns.size, 2), dtype="<u8")
    pairs[:, 0] = pfns
    pairs[:, 1] = counts
    return [pairs[i : i + PAIRS_PER_MESSAGE].tobytes() for i in range(0, pfns.size, PAIRS_PER_MESSAGE)]


def decode_pairs16_stream(messages):
    out = []
    for message in messages:
        pairs = np.frombuffer(message, dtype="<u8").reshape(-1, 2)
        out.append((pairs[:, 0], pairs[:, 1]))
    return out


CODECS = {
    PFN32: (encode_pfn32, decode_pfn32_stream),
    "bitmap": (encode_bitmap, decode_bitmap_stream),
    RANGES52: (encode_ranges52, decode_ranges52_stream),
    "pairs16": (encode_pairs16, decode_pairs16_stream),
}


def wire_bytes(messages: list[bytes]) -> int:
    """Payload plus msgpack framing, as REPORT messages ``[3, seq, payload]``."""
    return sum(len(msgpack.packb([3, seq, message])) for seq, message in enumerate(messages))


def _tracker_class():
    try:
        from host_daemon.tracker import GuestTracker
    except ImportError:
        return None
    return GuestTracker


# -- measuring ---------------------------------------------------------------------------


def measure_layout(name: str, pages: int, pfns, counts, repeats: int) -> list[dict]:
    tracker_class = _tracker_class()
    free = int(counts.sum())
    rows = []
    for encoding in ENCODINGS:
        encode, decode = CODECS[encoding]
        messages = encode(pages, pfns, counts)
        decoded = decode(messages)
        got = sum(int(c.sum()) for _, c in decoded)
        if got != free:
            raise AssertionError(f"{encoding} round trip lost pages on {name}: {got} != {free}")
        row = {"layout": name, "encoding": encoding, "pages": pages, "free_pages": free,
               "ranges": int(pfns.size), "messages": len(messages), "wire_bytes": wire_bytes(messages),
               "encode_s": best_of(lambda e=encode: e(pages, pfns, counts), repeats, warmup=0),
               "decode_s": best_of(lambda d=decode, m=messages: d(m), repeats, warmup=0),
               "apply_s": None}
        if tracker_class is not None:
            def apply(batches=decoded):
                tracker = tracker_class(pages)
                for batch_pfns, batch_counts in batches:
                    tracker.apply("report", batch_pfns, batch_counts)
                if tracker.reported_pages != free:
                    raise AssertionError(f"tracker holds {tracker.reported_pages} of {free} pages")
            row["apply_s"] = best_of(apply, repeats, warmup=0)
        rows.append(row)
    return rows


def synthetic_layouts(pages: int, seed: int):
    for fragmentation in FRAGMENTATION:
        pfns, counts = free_layout(pages, 0.5, fragmentation, seed)
        yield f"F={fragmentation:g}", pages, pfns, counts


def machine_layout(limit_pages: int | None):
    """This machine's free pages, if /proc/kpageflags is readable; else None and the reason."""
    try:
        from guest_agent.memory.procfs import scan
    except ImportError:
        return None, "guest_agent/memory/procfs.py is not there"
    try:
        result = scan(limit_pages=limit_pages)
    except (OSError, ValueError) as error:
        return None, f"cannot read /proc/kpageflags ({error.__class__.__name__}: {error})"
    if not result.pfns.size:
        return None, "the procfs scan found no free pages"
    base = int(result.pfns[0]) - int(result.pfns[0]) % BITMAP_PAGES
    pfns = result.pfns - np.uint64(base)  # rebase so the bitmap starts at the first free window
    pages = int(pfns[-1] + result.counts[-1])
    label = f"this machine ({result.mode}, {result.ram_pages * 4096 >> 20} MiB RAM scanned)"
    return (label, pages, pfns, result.counts), None


def run(pages: int, repeats: int, seed: int, real: bool, limit_pages: int | None) -> dict:
    rows = []
    for name, layout_pages, pfns, counts in synthetic_layouts(pages, seed):
        rows += measure_layout(name, layout_pages, pfns, counts, repeats)
    note = None
    if real:
        layout, note = machine_layout(limit_pages)
        if layout is not None:
            rows += measure_layout(*layout, repeats)
    return {"pages": pages, "rows": rows, "real_note": note, "apply": _tracker_class() is not None}


# -- reporting ---------------------------------------------------------------------------


def _total(row: dict) -> float:
    return row["encode_s"] + row["decode_s"] + (row["apply_s"] or 0.0)


def winners(rows: list[dict]) -> list[str]:
    """One line per layout: which encoding is smallest and which is fastest end to end."""
    lines = []
    for layout in dict.fromkeys(row["layout"] for row in rows):
        group = [row for row in rows if row["layout"] == layout]
        small = min(group, key=lambda row: row["wire_bytes"])
        fast = min(group, key=_total)
        ranges52 = next(row for row in group if row["encoding"] == RANGES52)
        lines.append(
            f"- **{layout}** ({group[0]['ranges']:,} free runs): smallest **{small['encoding']}** "
            f"({small['wire_bytes'] / max(1, small['free_pages']):.3g} B per free page, ranges52 "
            f"{ranges52['wire_bytes'] / small['wire_bytes']:.2f}x of it); fastest end to end "
            f"**{fast['encoding']}** ({_total(fast) * 1e3:.1f} ms, ranges52 {_total(ranges52) / _total(fast):.2f}x).")
    return lines


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1e3:.2f}"


def render(result: dict, markdown: bool, command: str) -> str:
    header = ["layout", "encoding", "messages", "wire KiB", "B/free page", "vs ranges52", "encode ms",
              "decode ms", "apply ms", "total ms"]
    lines = []
    for row in result["rows"]:
        base = next(r for r in result["rows"] if r["layout"] == row["layout"] and r["encoding"] == RANGES52)
        lines.append([row["layout"], row["encoding"], f"{row['messages']:,}", f"{row['wire_bytes'] / 1024:,.1f}",
                      f"{row['wire_bytes'] / max(1, row['free_pages']):.3g}",
                      f"{row['wire_bytes'] / base['wire_bytes']:.2f}x",
                      _ms(row["encode_s"]), _ms(row["decode_s"]), _ms(row["apply_s"]), _ms(_total(row))])
    gib = result["pages"] * 4096 / (1 << 30)
    intro = f"Guest of {gib:g} GiB ({result['pages']:,} pages), half free."
    if not markdown:  # run_all stamps the command and the machine on the markdown itself
        intro += f" `{command}`; {machine_line()}."
    notes = []
    if not result["apply"]:
        notes.append("host_daemon/tracker.py missing: no apply column.")
    if result["real_note"]:
        notes.append(f"No real-memory row: {result['real_note']}.")
    if markdown:
        out = [intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        out += ["", "Where each encoding wins:", "", *winners(result["rows"])]
        out += ["", *notes] if notes else []
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [intro, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out += ["", *winners(result["rows"]), *notes]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 GiB guest, best of 1: a smoke test")
    parser.add_argument("--gib", type=float, default=8.0, help="guest size in GiB (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-real", action="store_true", help="skip this machine's real free pages")
    parser.add_argument("--markdown", action="store_true", help="tables for docs/PERFORMANCE.md")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    pages = int((1.0 if args.quick else args.gib) * (1 << 18))
    repeats = 1 if args.quick else args.repeats
    limit = (1 << 18) if args.quick else None  # quick: scan only the first GiB of RAM
    result = run(pages, repeats, args.seed, not args.no_real, limit)
    command = "python -m bench.encodings" + (" --quick" if args.quick else "")
    print(render(result, args.markdown, command))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

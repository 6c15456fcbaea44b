"""Runs *inside* a test guest: write memory and prove it reads back (no page was lost).

``check MIB``: map MIB of fresh memory, write a pattern unique to each 8-byte word, read it
back and print ``memcheck ok pages=N bad_words=0`` — after a deflate this is memory the host
had punched, so any page it still discarded would read zero.

``hold MIB --until FILE``: write the pattern once, then verify it every second until FILE
exists (or SIGTERM), printing a line per round — a canary that lives through inflates,
deflates and host restarts.

Exit status 0 only when every word matched.
"""

from __future__ import annotations

import argparse
import mmap
import signal
import sys
import time
from pathlib import Path

import numpy as np

WORDS_PER_PAGE = 4096 // 8


def _region(mib: int):
    area = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return area, np.frombuffer(area, dtype=np.uint64)


def _bad(words: np.ndarray, seed: int) -> int:
    bad = 0
    step = 1 << 20  # words per slice: bounded temporaries
    for start in range(0, words.size, step):
        part = words[start:start + step]
        bad += int(np.count_nonzero(part != _pattern_at(start, part.size, seed)))
    return bad


def _pattern_at(start: int, n: int, seed: int) -> np.ndarray:
    return (np.arange(start, start + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(seed)


def _fill(words: np.ndarray, seed: int) -> None:
    step = 1 << 20
    for start in range(0, words.size, step):
        n = min(step, words.size - start)
        words[start:start + n] = _pattern_at(start, n, seed)


def check(mib: int, seed: int) -> int:
    area, words = _region(mib)
    t0 = time.monotonic()
    _fill(words, seed)
    bad = _bad(words, seed)
    print(f"memcheck {'ok' if bad == 0 else 'FAILED'} pages={words.size // WORDS_PER_PAGE} bad_words={bad} "
          f"seconds={time.monotonic() - t0:.1f}", flush=True)
    del words
    area.close()
    return 0 if bad == 0 else 1


def hold(mib: int, seed: int, until: str | None) -> int:
    area, words = _region(mib)
    _fill(words, seed)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    if until:
        stop_file = Path(until)
    rounds = bad_total = 0
    print(f"memcheck holding pages={words.size // WORDS_PER_PAGE}", flush=True)
    while True:
        bad = _bad(words, seed)
        rounds += 1
        bad_total += bad
        print(f"memcheck round={rounds} bad_words={bad}", flush=True)
        if stop or (until and stop_file.exists()):
            break
        time.sleep(1.0)
    print(f"memcheck {'ok' if bad_total == 0 else 'FAILED'} rounds={rounds} bad_words={bad_total}", flush=True)
    return 0 if bad_total == 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("check", "hold"))
    parser.add_argument("mib", type=int)
    parser.add_argument("--seed", type=int, default=0x5EED)
    parser.add_argument("--until", default=None, help="hold: stop once this file exists")
    args = parser.parse_args(argv)
    if args.mode == "check":
        return check(args.mib, args.seed)
    return hold(args.mib, args.seed, args.until)


if __name__ == "__main__":
    sys.exit(main())

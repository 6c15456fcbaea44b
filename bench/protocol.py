"""In-process cost of the protocol core per batch: host receive + validate + decode + ACK.

No sockets and no event loop: a ``GuestConnection`` produces REPORT frames (32 order-9
blocks each, what mm/page_reporting.c sends), and a ``HostConnection`` is timed taking
them in — ``receive_data`` of a chunk of ``--per-chunk`` frames, ``next_event`` for each
batch, ``send(Ack(...))`` for each — exactly the calls the host session makes. The guest's
side (``send`` of the batch, ``receive_data``/``next_event`` of the ACK) is timed too.
Best of N runs, microseconds of this thread's CPU time per batch (robust on a shared machine).

    .venv/bin/python -m bench.protocol              # 5 runs of 20,000 batches
    .venv/bin/python -m bench.protocol --quick      # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.messages import Ack, Report, Welcome  # noqa: E402
from shared.protocol import GuestConnection, HostConnection  # noqa: E402
from shared.ranges import encode_ranges  # noqa: E402
from shared.vocabulary import RANGES52  # noqa: E402

BLOCK = 512
WINDOW = 64


def pair() -> tuple[GuestConnection, HostConnection]:
    guest = GuestConnection("bench", 1 << 21, features=(RANGES52,))
    host = HostConnection()
    host.receive_data(guest.hello())
    hello = host.next_event()
    guest.receive_data(host.send(Welcome(window=WINDOW, max_ranges=4096, features=hello.features)))
    guest.next_event()
    return guest, host


def payloads(count: int, ranges: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        starts = np.sort(rng.choice(4096, ranges, replace=False)).astype(np.uint64) * np.uint64(BLOCK)
        out.append(encode_ranges(starts, np.full(ranges, BLOCK, dtype=np.uint64)))
    return out


def run(batches: int, per_chunk: int, ranges: int) -> dict:
    guest, host = pair()
    pool = payloads(64, ranges)
    host_s = guest_s = 0.0
    done = 0
    while done < batches:
        t0 = time.thread_time()
        chunk = b"".join(guest.send(Report(payload=pool[(done + i) % 64])) for i in range(per_chunk))
        t1 = time.thread_time()
        host.receive_data(chunk)
        acks = []
        for _ in range(per_chunk):
            batch = host.next_event()
            acks.append(host.send(Ack(batch.seq, 0)))
        reply = b"".join(acks)
        t2 = time.thread_time()
        guest.receive_data(reply)
        for _ in range(per_chunk):
            guest.next_event()
        t3 = time.thread_time()
        host_s += t2 - t1
        guest_s += (t1 - t0) + (t3 - t2)
        done += per_chunk
    return {"host_us": host_s / done * 1e6, "guest_us": guest_s / done * 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ranges", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.runs = 512, 1
    rows = []
    for per_chunk in (1, 8):
        results = [run(args.batches, per_chunk, args.ranges) for _ in range(args.runs)]
        rows.append({"per_chunk": per_chunk, "ranges": args.ranges,
                     "host_us": min(r["host_us"] for r in results),
                     "guest_us": min(r["guest_us"] for r in results)})
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['ranges']} ranges/batch, {row['per_chunk']} batch(es)/chunk: host receive+ACK "
                  f"{row['host_us']:.2f} us/batch, guest send+ACK {row['guest_us']:.2f} us/batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

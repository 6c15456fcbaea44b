"""Channel benchmark: one guest → host over a Unix socket, the full daemon vs a bare loop.

Both hosts run as subprocesses on the same event loop (uvloop when installed) and get the
same bytes from the same guest, in alternating runs, best of N:

- **daemon**: ``balloon-host`` itself (``python -m host_daemon``): sans-IO validation of
  every message, range decoding, the window, tracker apply, metrics bookkeeping, the
  writer task.
- **bare**: an asyncio + msgpack loop that answers HELLO with a WELCOME and every batch
  with ``[4, seq, 0]`` — no validation, no decoding, no tracking (docs/PERFORMANCE.md, "Channel").

The guest is deliberately minimal (pre-encoded payloads, one ``packb`` per frame) so the
host side is what the figure measures. It keeps ``window`` batches in flight (closed
loop); a batch is ``--batch-ranges`` order-9 blocks (512 pages, what mm/page_reporting.c
reports) scattered over an 8 GiB guest, alternating REPORT of one group of blocks and
REUSE of another, so the daemon's tracker holds ~2000 ranges and does real work.
Besides batches/s the host's CPU time per batch is read from /proc.

    python -m bench.channel                 # 5 runs of 3 s per host
    python -m bench.channel --quick         # 1 run of 0.3 s per pair (smoke test)
    python -m bench.channel --markdown      # table for docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from bench.common import claim
from shared.vocabulary import RANGES52

REPORT, REUSE, ACK, HELLO, WELCOME, ERROR, BYE = 3, 5, 4, 1, 2, 15, 17
BLOCK = 512  # order-9 block, in pages
GUEST_PAGES = 2 * 1024 * 1024  # 8 GiB
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the bare host ---------------------------------------------------------------------


async def _bare_connection(reader, writer, window: int, max_ranges: int) -> None:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=2 << 20)
    packb = msgpack.packb
    while True:
        data = await reader.read(65536)
        if not data:
            break
        unpacker.feed(data)
        out = []
        for message in unpacker:
            kind = message[0]
            if kind == HELLO:
                out.append(packb([WELCOME, {"version": 1, "window": window, "max_ranges": max_ranges,
                                            "features": []}]))
            elif kind == BYE:
                writer.close()
                return
            else:
                out.append(packb([ACK, message[1], 0]))
        if out:
            writer.write(b"".join(out))
            await writer.drain()
    writer.close()


async def _bare_host(path: str, window: int, max_ranges: int) -> None:
    async def handle(reader, writer):
        await _bare_connection(reader, writer, window, max_ranges)

    server = await asyncio.start_unix_server(handle, path=path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def _loop_factory():
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:
        return asyncio.new_event_loop


# -- the guest -------------------------------------------------------------------------


def make_payloads(batch_ranges: int, seed: int = 1) -> list[tuple[int, bytes]]:
    """Alternating (REPORT group g, REUSE group g + half) over shuffled order-9 blocks."""
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(GUEST_PAGES // BLOCK).astype(np.uint64) * np.uint64(BLOCK)
    groups = blocks[: (blocks.size // batch_ranges) * batch_ranges].reshape(-1, batch_ranges)
    groups.sort(axis=1)
    words = [(group << np.uint64(12)) | np.uint64(BLOCK) for group in groups]
    payloads = [w.astype("<u8").tobytes() for w in words]
    half = len(payloads) // 2
    cycle = []
    for g in range(len(payloads)):
        cycle.append((REPORT, payloads[g]))
        cycle.append((REUSE, payloads[(g + half) % len(payloads)]))
    return cycle


async def drive(path: str, guest: str, window: int, cycle, duration: float) -> tuple[int, float]:
    """Closed loop with ``window`` batches in flight; returns (batches acked, seconds)."""
    reader, writer = await asyncio.open_unix_connection(path)
    packb = msgpack.packb
    unpacker = msgpack.Unpacker(raw=False)
    writer.write(packb([HELLO, {"version": 1, "guest": guest, "page_size": 4096, "pages": GUEST_PAGES,
                                "features": [RANGES52]}]))
    welcome = None
    while welcome is None:
        unpacker.feed(await reader.read(65536))
        for message in unpacker:
            if message[0] != WELCOME:
                raise RuntimeError(f"no WELCOME: {message}")
            welcome = message[1]
    window = min(window, welcome["window"])
    size = len(cycle)
    seq = 0

    def frames(count: int) -> bytes:
        nonlocal seq
        parts = []
        for _ in range(count):
            kind, payload = cycle[seq % size]
            parts.append(packb([kind, seq, payload], use_bin_type=True))
            seq += 1
        return b"".join(parts)

    acked = 0
    expected = 0
    writer.write(frames(window))
    start = time.perf_counter()
    deadline = start + duration
    while True:
        data = await reader.read(65536)
        if not data:
            raise RuntimeError("host closed the connection")
        unpacker.feed(data)
        got = 0
        for message in unpacker:
            if message[0] == ACK:
                if message[1] != expected:
                    raise RuntimeError(f"ACK {message[1]} out of order (expected {expected})")
                expected += 1
                got += 1
            elif message[0] == ERROR:
                raise RuntimeError(f"host sent ERROR {message[1]}: {message[2]}")
        acked += got
        now = time.perf_counter()
        if now >= deadline:
            break
        if got:
            writer.write(frames(got))
    elapsed = time.perf_counter() - start
    writer.write(packb([BYE, "bench done"]))
    writer.close()
    return acked, elapsed


async def drive_protocol(path: str, guest: str, window: int, cycle, duration: float) -> tuple[int, float]:
    """The same closed loop through ``shared.protocol.GuestConnection``: every batch is
    encoded from numpy arrays and every ACK checked against the window, as any real guest
    (guest_agent, balloon-load) must do."""
    from shared.messages import Ack, Error, Report, Reuse
    from shared.protocol import GuestConnection
    from shared.ranges import decode_ranges, encode_ranges

    arrays = [(Report if kind == REPORT else Reuse, *decode_ranges(payload)) for kind, payload in cycle]
    conn = GuestConnection(guest, GUEST_PAGES, features=(RANGES52,))
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(conn.hello())
    while conn.welcome is None:
        conn.receive_data(await reader.read(65536))
        for _ in conn.events():
            pass
    size = len(arrays)
    index = 0

    def frames(count: int) -> bytes:
        nonlocal index
        parts = []
        for _ in range(count):
            cls, pfns, counts = arrays[index % size]
            parts.append(conn.send(cls(encode_ranges(pfns, counts))))
            index += 1
        return b"".join(parts)

    acked = 0
    writer.write(frames(min(window, conn.window.size)))
    start = time.perf_counter()
    deadline = start + duration
    while True:
        data = await reader.read(65536)
        if not data:
            raise RuntimeError("host closed the connection")
        conn.receive_data(data)
        got = 0
        for event in conn.events():
            if isinstance(event, Ack):
                got += 1
            elif isinstance(event, Error):
                raise RuntimeError(f"host sent ERROR {event.code}: {event.detail}")
        acked += got
        if time.perf_counter() >= deadline:
            break
        if got:
            writer.write(frames(got))
    elapsed = time.perf_counter() - start
    writer.close()
    return acked, elapsed


GUESTS = {"raw": drive, "protocol": drive_protocol}


def _shell_host(path: str, window: int, max_ranges: int) -> None:
    """balloon-host with a tracker that does nothing: the shell's own cost (breakdown only)."""
    from host_daemon import registry
    from host_daemon.server import HostServer
    from host_daemon.settings import HostSettings
    from host_daemon.tracker import ApplyResult
    from shared.runtime.addresses import Address

    class NoTracker:
        reported_pages = inflated_pages = hinted_pages = 0

        def __init__(self, pages: int) -> None:
            pass

        def apply(self, kind, pfns, counts, cmd_id=None):
            return ApplyResult(kind=kind, ranges=len(pfns))

        def set_hint_command(self, cmd_id) -> None:
            pass

    registry.GuestTracker = NoTracker

    async def serve() -> None:
        server = HostServer(HostSettings(listen=(Address("unix", path=path),), http=None, window=window,
                                         max_ranges=max_ranges, idle_timeout=600))
        await server.start()
        await server.wait_warm()
        print("ready", flush=True)
        await server.wait_stopped()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve())


# -- orchestration ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Host:
    def __init__(self, name: str, command: list[str], path: str, ready: str | None) -> None:
        self.name = name
        self.path = path
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        while ready is not None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} host exited: {self.proc.poll()}")
            if ready in line:
                break
        # Keep reading the pipe so a chatty host never blocks on a full pipe.
        import threading

        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for _ in self.proc.stdout:
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_hosts(tmp: str, window: int, max_ranges: int, shell: bool) -> dict[str, Host]:
    python = sys.executable
    daemon_sock = os.path.join(tmp, "daemon.sock")
    bare_sock = os.path.join(tmp, "bare.sock")
    daemon = Host("daemon", [python, "-m", "host_daemon", "--listen", f"unix:{daemon_sock}", "--http", "off",
                             "--window", str(window), "--max-ranges", str(max_ranges), "--log-level", "warning",
                             "--idle-timeout", "600s"],
                  daemon_sock, None)
    bare = Host("bare", [python, "-m", "bench.channel", "--bare-host", bare_sock, "--window", str(window),
                         "--max-ranges", str(max_ranges)], bare_sock, "ready")
    hosts = {"daemon": daemon, "bare": bare}
    if shell:
        shell_sock = os.path.join(tmp, "shell.sock")
        hosts["shell"] = Host("shell", [python, "-m", "bench.channel", "--shell-host", shell_sock, "--window",
                                        str(window), "--max-ranges", str(max_ranges)], shell_sock, "ready")
    return hosts


def wait_for_socket(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.01)


def measure(args) -> dict:
    """Every (guest, host) pair, alternating hosts within each round; best of ``runs``."""
    cycle = make_payloads(args.batch_ranges)
    guests = ["raw", "protocol"] if args.guest == "both" else [args.guest]
    names = ["daemon", "bare"] + (["shell"] if args.breakdown else [])
    results = {(g, h): [] for g in guests for h in names}
    with tempfile.TemporaryDirectory(prefix="balloon-bench-") as tmp:
        hosts = start_hosts(tmp, args.window, max(args.batch_ranges, 64), args.breakdown)
        try:
            for host in hosts.values():
                wait_for_socket(host.path)
            with asyncio.Runner(loop_factory=_loop_factory()) as run_loop:
                for host in hosts.values():  # warm-up: imports, first numpy calls
                    run_loop.run(drive(host.path, "warmup", args.window, cycle, 0.2))
                for run in range(args.runs):
                    for guest in guests:
                        order = names if run % 2 == 0 else names[::-1]
                        for name in order:
                            host = hosts[name]
                            cpu_before = cpu_seconds(host.proc.pid)
                            acked, seconds = run_loop.run(GUESTS[guest](
                                host.path, f"bench-{guest}-{run}", args.window, cycle, args.duration))
                            cpu = cpu_seconds(host.proc.pid) - cpu_before
                            results[guest, name].append({
                                "batches": acked, "seconds": seconds, "batches_per_s": acked / seconds,
                                "host_cpu_us_per_batch": 1e6 * cpu / max(acked, 1)})
        finally:
            for host in hosts.values():
                host.stop()
    summary: dict = {"guests": {}}
    for guest in guests:
        table = {}
        for name in names:
            runs = results[guest, name]
            rates = [r["batches_per_s"] for r in runs]
            table[name] = {"best_batches_per_s": max(rates), "median_batches_per_s": statistics.median(rates),
                           "host_cpu_us_per_batch": min(r["host_cpu_us_per_batch"] for r in runs),
                           "runs": runs}
        table["ratio"] = table["daemon"]["best_batches_per_s"] / table["bare"]["best_batches_per_s"]
        summary["guests"][guest] = table
    summary["params"] = {"window": args.window, "batch_ranges": args.batch_ranges, "runs": args.runs,
                         "duration_s": args.duration, "guest_pages": GUEST_PAGES}
    return summary


LABELS = {"daemon": "balloon-host (full daemon)", "shell": "balloon-host, no-op tracker (breakdown)",
          "bare": "bare asyncio + msgpack loop"}
GUEST_LABELS = {"raw": "raw guest (pre-encoded payloads)",
                "protocol": "protocol guest (GuestConnection + encode_ranges per batch)"}


def render_text(summary: dict) -> str:
    p = summary["params"]
    lines = [f"channel: 1 guest over a Unix socket, window {p['window']}, {p['batch_ranges']} ranges/batch, "
             f"best of {p['runs']} x {p['duration_s']:g} s"]
    for guest, table in summary["guests"].items():
        lines.append(f"-- {GUEST_LABELS[guest]}")
        lines.append(f"   {'host':8} {'best batches/s':>15} {'median':>10} {'host CPU µs/batch':>18}")
        for name in ("daemon", "shell", "bare"):
            if name in table:
                s = table[name]
                lines.append(f"   {name:8} {s['best_batches_per_s']:15,.0f} {s['median_batches_per_s']:10,.0f} "
                             f"{s['host_cpu_us_per_batch']:18.1f}")
        lines.append(f"   ratio daemon/bare: {table['ratio']:.2f} (target >= 0.80)")
    return "\n".join(lines)


def render_markdown(summary: dict) -> str:
    """Tables only: bench/run_all.py puts the date, machine and command in front."""
    p = summary["params"]
    rows = [f"One guest, Unix socket, window {p['window']}, {p['batch_ranges']} order-9 ranges per batch "
            f"(REPORT/REUSE alternating over an 8 GiB guest), best of {p['runs']} runs of {p['duration_s']:g} s "
            "per pair, hosts alternating; host CPU from /proc/PID/stat.", "",
            "| guest | host | best batches/s | median batches/s | host CPU µs/batch | daemon / bare |",
            "|---|---|---:|---:|---:|---:|"]
    for guest, table in summary["guests"].items():
        for name in ("daemon", "shell", "bare"):
            if name in table:
                s = table[name]
                ratio = f"**{table['ratio']:.2f}**" if name == "daemon" else ""
                rows.append(f"| {GUEST_LABELS[guest]} | {LABELS[name]} | {s['best_batches_per_s']:,.0f} | "
                            f"{s['median_batches_per_s']:,.0f} | {s['host_cpu_us_per_batch']:.1f} | {ratio} |")
    for guest, table in summary["guests"].items():
        if "shell" in table:
            tracker = table["daemon"]["host_cpu_us_per_batch"] - table["shell"]["host_cpu_us_per_batch"]
            shell = table["shell"]["host_cpu_us_per_batch"] - table["bare"]["host_cpu_us_per_batch"]
            rows.append("")
            rows.append(f"Host CPU per batch beyond the bare loop ({guest} guest): tracker ≈ {tracker:.1f} µs "
                        f"(full daemon − no-op tracker), protocol checks + decoding + session ≈ {shell:.1f} µs "
                        "(no-op tracker − bare).")
            break
    for guest, table in summary["guests"].items():
        rows.append(claim(f"channel, {guest} guest: full daemon vs bare asyncio+msgpack", ">= 0.80 of bare",
                          f"{table['ratio']:.2f}", table["ratio"] >= 0.8))
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--batch-ranges", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="runs per host (alternating), best is kept")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="1 run of 0.3 s per pair: a smoke test")
    parser.add_argument("--markdown", action="store_true", help="print a table for docs/PERFORMANCE.md")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--guest", choices=("raw", "protocol", "both"), default="both",
                        help="which guest drives the hosts (default: both, each against every host)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the daemon-with-no-op-tracker run that splits shell and tracker cost")
    parser.add_argument("--bare-host", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--shell-host", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--max-ranges", type=int, default=4096, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_host:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_bare_host(args.bare_host, args.window, args.max_ranges))
        return 0
    if args.shell_host:
        _shell_host(args.shell_host, args.window, args.max_ranges)
        return 0
    if args.quick:
        args.runs, args.duration = 1, 0.3
    summary = measure(args)
    print(render_markdown(summary) if args.markdown else render_text(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

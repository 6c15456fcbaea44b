"""The host's per-batch and per-guest cost at scale, in process: 256 sessions, no sockets.

At 256 guests × 10 REPORT/s every batch lands on a session whose objects were last touched
256 batches ago, so they are cold in the CPU's caches; one busy session in a loop hides
that. This bench reproduces it without sockets, the event loop or a load generator on the
same cores: it round-robins one batch each over ``--guests`` real ``GuestSession`` objects
(the daemon's own session, registry, admission and tracker), sized like ``balloon-load``'s
guests (262,144 pages, 32 order-9 REPORT ranges per batch), and feeds the same bytes, in the
same order, to as many of ``guest_agent/load/bare.py``'s ``BareHost`` (framing and ACKs only,
the yardstick of ``bench.scale``'s efficiency). Both sides are timed with the thread's CPU
clock, alternating, best of ``--runs``.

A guest's **stay** is measured the same way: a session is made, takes HELLO, answers
WELCOME, is asked for its deadline (the shell arms one timer; a guest silent for 5 s never
reaches the keepalive at a third of the 60 s idle timeout), takes BYE, ends, and the
registry forgets the guest (retention 0 here; the daemon waits for a timer, whose cost is
the same call).

    python -m bench.sessions               # 256 sessions, 5 runs of 20 rounds, 2,000 stays
    python -m bench.sessions --quick       # a smoke run
    python -m bench.sessions --markdown    # for docs/PERFORMANCE.md (make bench)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request

import msgpack
import numpy as np

from bench.common import claim
from guest_agent.load.bare import BareHost
from host_daemon.admission import Admitter, Peer
from host_daemon.auth import GuestAuth
from host_daemon.guest_session import GuestSession
from host_daemon.metrics import HostStats
from host_daemon.registry import Registry
from host_daemon.settings import HostSettings
from host_daemon.tracker import load_kernels
from shared.ranges import encode_ranges
from shared.runtime.addresses import Address

HELLO, REPORT, BYE = 1, 3, 17
GUEST_PAGES = 262_144  # balloon-load's default --guest-pages
BLOCK = 512  # order 9, what mm/page_reporting.c reports
RANGES = 32
LISTENER = Address("unix", path="/run/bench.sock")
#: a guest's whole stay on the host, in CPU (issue 19)
STAY_TARGET_MS = 1.0


class _Transport:
    """What BareHost writes to: a list, like a socket nobody reads."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += 1

    def close(self) -> None:
        pass


def _host(retention: float = 60.0):
    settings = HostSettings(listen=(LISTENER,), http=None, retention=retention)
    registry = Registry(settings.max_guests * 4 + 4096, settings.retention, None, forget_after=retention)
    return settings, Admitter(settings, registry, GuestAuth(None)), HostStats(), registry


def _hello(name: str) -> bytes:
    return msgpack.packb([HELLO, {"version": 1, "guest": name, "page_size": 4096, "pages": GUEST_PAGES,
                                  "features": ["ranges52"]}])


def _payloads(count: int, seed: int = 1) -> list[bytes]:
    rng = np.random.default_rng(seed)
    blocks = GUEST_PAGES // BLOCK
    return [encode_ranges(np.sort(rng.choice(blocks, RANGES, replace=False)).astype(np.uint64) * np.uint64(BLOCK),
                          np.full(RANGES, BLOCK, dtype=np.uint64)) for _ in range(count)]


def _peer() -> Peer:
    return Peer(LISTENER, "unix", "unix:/run/bench.sock#pid=1,uid=1000", None, 1, 1000, 1000)


def batches(guests: int, rounds: int, runs: int) -> dict:
    """CPU µs per batch: GuestSession.receive vs BareHost.data_received, same frames."""
    settings, admitter, stats, _ = _host()
    sessions = []
    bares = []
    for g in range(guests):
        session = GuestSession(settings, admitter, stats, _peer(), 0.0)
        out = session.receive(_hello(f"bench-{g}"), 0.0)
        assert session.record is not None and not out.close, "HELLO refused"
        sessions.append(session)
        bare = BareHost()
        bare.connection_made(_Transport())
        bare.data_received(_hello(f"bench-{g}"))
        bares.append(bare)
    pool = _payloads(64)
    packb = msgpack.Packer(use_bin_type=True).pack
    seq = [0]

    def frames():  # one round: one batch per guest, a new seq each round
        s = seq[0]
        seq[0] += 1
        return [packb([REPORT, s, pool[(s * 7 + g) % 64]]) for g in range(guests)]

    def run_daemon(rounds_frames):
        start = time.thread_time()
        for chunk in rounds_frames:
            for session, data in zip(sessions, chunk, strict=True):
                out = session.receive(data, 1.0)
                if out.close or out.discard is not None:
                    raise RuntimeError("a session failed")
        return time.thread_time() - start

    def run_bare(rounds_frames):
        start = time.thread_time()
        for chunk in rounds_frames:
            for bare, data in zip(bares, chunk, strict=True):
                bare.data_received(data)
        return time.thread_time() - start

    run_daemon([frames() for _ in range(2)])  # warm-up: kernels, first numpy calls
    seq[0] -= 2
    run_bare([frames() for _ in range(2)])
    best = {"daemon": float("inf"), "bare": float("inf")}
    for run in range(runs):
        start = seq[0]
        work = [frames() for _ in range(rounds)]
        order = ("daemon", "bare") if run % 2 == 0 else ("bare", "daemon")
        for name in order:
            seq[0] = start
            seconds = run_daemon(work) if name == "daemon" else run_bare(work)
            best[name] = min(best[name], seconds)
        seq[0] = start + rounds
    n = guests * rounds
    daemon_us, bare_us = 1e6 * best["daemon"] / n, 1e6 * best["bare"] / n
    return {"guests": guests, "rounds": rounds, "runs": runs, "daemon_us": daemon_us, "bare_us": bare_us,
            "efficiency": bare_us / daemon_us}


def stays(count: int, runs: int) -> dict:
    """CPU ms of one guest's whole stay: HELLO, WELCOME, its deadline, BYE, forgotten."""
    bye = msgpack.packb([BYE, "done"])

    def run_daemon(names):
        settings, admitter, stats, registry = _host(retention=0.0)
        start = time.thread_time()
        for name in names:
            session = GuestSession(settings, admitter, stats, _peer(), 0.0)
            session.receive(_hello(name), 0.0)
            session.next_deadline()
            out = session.receive(bye, 5.0)
            if not out.close:
                raise RuntimeError("BYE did not end the session")
        seconds = time.thread_time() - start
        if len(registry):
            raise RuntimeError("guests were not forgotten")
        return seconds

    def run_bare(names):
        start = time.thread_time()
        for name in names:
            bare = BareHost()
            bare.connection_made(_Transport())
            bare.data_received(_hello(name))
            bare.data_received(bye)
        return time.thread_time() - start

    best = {"daemon": float("inf"), "bare": float("inf")}
    run_daemon([f"warm-{i}" for i in range(50)])
    for run in range(runs):
        names = [f"stay-{run}-{i}" for i in range(count)]
        for name in (("daemon", "bare") if run % 2 == 0 else ("bare", "daemon")):
            seconds = run_daemon(names) if name == "daemon" else run_bare(names)
            best[name] = min(best[name], seconds)
    return {"stays": count, "runs": runs, "daemon_ms": 1e3 * best["daemon"] / count,
            "bare_ms": 1e3 * best["bare"] / count}


def stays_over_sockets(guests: int, silent: float) -> dict:
    """The same stay against a real ``balloon-host`` on a Unix socket: ``guests`` guests
    connect, HELLO, stay silent ``silent`` seconds, say BYE and are forgotten; the host's CPU
    (/proc) over that, less its idle CPU over as long a quiet spell, per guest."""
    import asyncio
    import tempfile
    from pathlib import Path

    from bench.scale import Host

    async def guest(path: str, name: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(_hello(name))
        unpacker = msgpack.Unpacker()
        while True:
            unpacker.feed(await reader.read(4096))
            if any(True for _ in unpacker):
                break
        await asyncio.sleep(silent)
        writer.write(msgpack.packb([BYE, "done"]))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def all_guests(path: str) -> None:
        await asyncio.gather(*(guest(path, f"stay-{i}") for i in range(guests)))

    with tempfile.TemporaryDirectory(prefix="balloon-stay-") as tmp:
        host = Host(Path(tmp), max_guests=max(1024, 2 * guests), extra=["--forget-after", "0.5s"])
        try:
            time.sleep(1.0)
            quiet_start, quiet_cpu = time.monotonic(), host.cpu_seconds()
            time.sleep(silent + 1.5)
            idle_rate = (host.cpu_seconds() - quiet_cpu) / (time.monotonic() - quiet_start)
            start, cpu = time.monotonic(), host.cpu_seconds()
            asyncio.run(all_guests(str(host.sock)))
            time.sleep(1.5)  # --forget-after 0.5s: every guest forgotten
            used = host.cpu_seconds() - cpu - idle_rate * (time.monotonic() - start)
            with urllib.request.urlopen(host.url + "/api/v1/guests", timeout=5) as response:
                if json.load(response).get("guests"):
                    raise RuntimeError("guests were not forgotten")
        finally:
            host.stop()
    return {"guests": guests, "silent_s": silent, "daemon_ms": 1e3 * max(used, 0.0) / guests,
            "idle_cpu_share": idle_rate}


def render(result: dict, markdown: bool) -> str:
    b, s = result["batches"], result["stays"]
    sock = result.get("socket_stays")
    stay_ms = sock["daemon_ms"] if sock else None
    stay_verdict = "not measured" if stay_ms is None else ("met" if stay_ms <= STAY_TARGET_MS else "missed")
    if not markdown:
        lines = [
            f"sessions: {b['guests']} sessions round-robin, {b['rounds']} rounds, best of {b['runs']}",
            f"  GuestSession.receive {b['daemon_us']:.1f} µs/batch, BareHost.data_received {b['bare_us']:.1f} µs/batch",
            f"  a guest's stay in process (HELLO, WELCOME, BYE, forgotten): {s['daemon_ms']:.3f} ms "
            f"(bare {s['bare_ms']:.3f} ms)"]
        if sock:
            lines.append(f"  a guest's stay over a socket ({sock['guests']} guests, {sock['silent_s']:g} s silent): "
                         f"{stay_ms:.2f} ms of host CPU (target <= {STAY_TARGET_MS} ms): {stay_verdict}")
        return "\n".join(lines)
    rows = [
        f"{b['guests']} `GuestSession`s (262,144-page guests, 32 order-9 REPORT ranges per batch) "
        f"round-robin, one batch each per round, {b['rounds']} rounds, against as many bare hosts "
        f"(`guest_agent/load/bare.py`'s `BareHost`) fed the same frames; thread CPU time, alternating, "
        f"best of {b['runs']}. In-process stays: {s['stays']:,} guests each HELLO → WELCOME → deadline → "
        f"BYE → forgotten, best of {s['runs']}.", "",
        "| measurement | daemon | bare |", "|---|---:|---:|",
        f"| CPU µs per batch, {b['guests']} sessions, in process | {b['daemon_us']:.1f} | {b['bare_us']:.1f} |",
        f"| CPU ms per guest stay, in process | {s['daemon_ms']:.3f} | {s['bare_ms']:.3f} |"]
    if sock:
        rows += [f"| CPU ms per guest stay, real `balloon-host` on a Unix socket ({sock['guests']} guests: "
                 f"connect, HELLO, {sock['silent_s']:g} s silent, BYE, forgotten; /proc, idle CPU subtracted) | "
                 f"**{stay_ms:.2f}** | — |",
                 claim("sessions: a guest's whole stay (connect, silent, leave, forgotten), host CPU",
                       f"<= {STAY_TARGET_MS} ms", f"{stay_ms:.2f} ms", stay_ms <= STAY_TARGET_MS)]
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stays", type=int, default=2000)
    parser.add_argument("--sockets", type=int, default=200, metavar="N",
                        help="also N stays against a real balloon-host (0: skip)")
    parser.add_argument("--quick", action="store_true", help="64 sessions, 3 rounds, 2 runs, 200 stays")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.guests, args.rounds, args.runs, args.stays, args.sockets = 64, 3, 2, 200, min(args.sockets, 100)
    load_kernels()
    result = {"batches": batches(args.guests, args.rounds, args.runs), "stays": stays(args.stays, args.runs)}
    if args.sockets:
        result["socket_stays"] = stays_over_sockets(args.sockets, 1.0 if args.quick else 5.0)
    print(json.dumps(result) if args.json else render(result, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())

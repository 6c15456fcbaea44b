"""Issue 17 item 1 against a real balloon-host: guests at the open-mode cap come and go, and the
host's memory goes back each time (docs/OPERATIONS.md "Host memory").

Each round holds AT_ONCE open-mode guests of 16 GiB at once — idle ones (HELLO, nothing,
BYE) or ones that report and inflate their whole memory — checks the host's growth while they
are connected against the documented formula, lets them say BYE, waits until the host has
forgotten them (--forget-after) and checks its RSS is back within RETURN_SLACK of where it
started. ``make test`` runs a few rounds; ``make attacks-long`` runs
BALLOON_ATTACK_MEMORY_ROUNDS of them.
"""

from __future__ import annotations

import json
import os
import threading
import time

import msgpack
import pytest
from attackkit import ACK, BYE, INFLATE, REPORT, WELCOME, AttackedHost, Raw, words

ROUNDS = int(os.environ.get("BALLOON_ATTACK_MEMORY_ROUNDS", "3"))
AT_ONCE = 60  # the reproduction: 60 at once, under --max-guests 64
CAP = 16 << 30
PAGES = CAP // 4096
MIB = 1 << 20
#: docs/OPERATIONS.md "Host memory": a connection costs about 50 KiB plus the unfinished message
#: it buffers (none here); a tracker row (one bit per page) that a guest writes, pages / 8 bytes.
CONNECTION = 64 << 10
ROW = PAGES // 8
RETURN_SLACK = 4 * MIB


@pytest.fixture(scope="module")
def host():
    attacked = AttackedHost("--max-guest-memory", "16GiB", "--max-guests", "64", "--forget-after", "0.1s")
    yield attacked
    attacked.close()


def _known(host: AttackedHost) -> int:
    status, body = host.api("GET", "/api/v1/guests")
    assert status == 200
    return len(json.loads(body)["guests"])


def _round(host: AttackedHost, name: str, write: bool) -> int:
    """AT_ONCE guests connected at once; returns the host's RSS while they all are."""
    known = _known(host)
    ready = threading.Barrier(AT_ONCE + 1, timeout=30)
    leave = threading.Event()
    failures: list[str] = []

    def guest(i: int) -> None:
        raw = Raw(host.sock, timeout=20)
        try:
            reply = raw.hello(f"{name}-{i}", PAGES)
            assert reply[0] == WELCOME, reply
            if write:  # all of its memory reported, then all of it ballooned: two rows written
                raw.send(msgpack.packb([REPORT, 0, words([(0, PAGES)])]))
                assert raw.recv() == [ACK, 0, 0]
                raw.send(msgpack.packb([INFLATE, 1, words([(0, PAGES)])]))
                assert raw.recv() == [ACK, 1, 0]
            ready.wait()
            leave.wait(30)
            raw.send(msgpack.packb([BYE, "done"]))
            assert raw.until_closed() == []
        except Exception as error:  # noqa: BLE001 - reported by the test below
            failures.append(f"{name}-{i}: {error!r}")
            ready.abort()
        finally:
            raw.close()

    threads = [threading.Thread(target=guest, args=(i,)) for i in range(AT_ONCE)]
    for thread in threads:
        thread.start()
    try:
        ready.wait()
        held = host.rss()
    finally:
        leave.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:3]
    deadline = time.monotonic() + 20
    while _known(host) > known:  # forgotten 0.1 s after their BYE
        assert time.monotonic() < deadline, "the host did not forget the guests"
        time.sleep(0.05)
    return held


@pytest.mark.parametrize("write", [False, True], ids=["hello-bye", "whole-memory"])
def test_guests_at_the_cap_that_come_and_go_give_their_memory_back(host, write):
    _round(host, f"warm{int(write)}", write)  # compiled kernels and first-use buffers stay
    start = host.rss()
    per_guest = CONNECTION + (2 * ROW if write else 0)
    for r in range(ROUNDS):
        held = _round(host, f"r{r}w{int(write)}", write)
        assert held - start <= AT_ONCE * per_guest + RETURN_SLACK, (
            f"round {r}: {AT_ONCE} guests cost {(held - start) / MIB:.1f} MiB, "
            f"the formula allows {AT_ONCE * per_guest / MIB:.1f} MiB")
        after = host.rss()
        assert after - start <= RETURN_SLACK, (
            f"round {r}: {(after - start) / MIB:.1f} MiB not returned after {AT_ONCE} guests were forgotten")
    assert host.alive()

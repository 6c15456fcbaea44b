"""Issue 9's reproductions against a real balloon-host, with a healthy guest connected meanwhile.

Each test is one attack from the issue (item numbers in the names), run inside a Window: the
host must stay up, the healthy guest's p99 ACK latency in that window must stay < 50 ms,
and the provisioned guest vm1's RAM file must keep its size and every page. The last test
checks the host's RSS growth over the whole module against RSS_BUDGET (docs/OPERATIONS.md
"Security model"). Bounded: every loop has a count, every socket a timeout.
"""

from __future__ import annotations

import random
import struct
import time

import msgpack
import pytest
from attackkit import (
    ACK,
    BYE,
    ERROR,
    FUZZ_SECONDS,
    OPEN_CAP,
    REPORT,
    RSS_BUDGET,
    STATS,
    VM1_PAGES,
    WELCOME,
    AttackedHost,
    Raw,
    Window,
    fingerprint,
    hello,
    words,
)


@pytest.fixture(scope="module")
def host():
    attacked = AttackedHost()
    attacked.vm1_print = fingerprint(attacked.vm1_ram)
    yield attacked
    attacked.close()


def _closed_after(raw: Raw, data: bytes) -> None:
    """After a refusal the host has closed: ``data`` reaches nothing, the stream ends."""
    try:
        raw.send(data)
        assert raw.until_closed() == []
    except OSError:
        pass
    raw.close()


def _vm1_unchanged(host: AttackedHost) -> None:
    assert fingerprint(host.vm1_ram) == host.vm1_print, "vm1's RAM file changed"


def test_item1_the_20_byte_report_after_a_huge_hello(host):
    report = bytes.fromhex("930300c410") + bytes(8) + bytes.fromhex("0000000000001000")
    with Window(host) as window:
        huge = Raw(host.sock)
        reply = huge.hello("huge", 2**52)
        assert reply[:2] == [ERROR, "bad-size"]
        _closed_after(huge, report)  # the host closed it: the REPORT cannot even be applied
        # at the open-mode cap the whole range is out of range, and all of the guest is one fast batch
        capped = Raw(host.sock)
        assert capped.hello("capped", OPEN_CAP // 4096)[0] == WELCOME
        capped.send(report)
        ack = capped.recv()
        assert ack[:2] == [ACK, 0] and ack[2] == 2**52
        capped.send(msgpack.packb([REPORT, 1, words([(0, OPEN_CAP // 4096)])]))
        assert capped.recv() == [ACK, 1, 0]
        capped.close()
    window.assert_healthy()


def test_item2_another_process_cannot_take_vm1_while_it_is_disconnected(host):
    vm1 = Raw(host.vm1_sock)
    welcome = vm1.hello("vm1", VM1_PAGES - 34, features=["ranges52", "shared-ram"])
    assert welcome[0] == WELCOME and welcome[1]["pages"] == VM1_PAGES and welcome[1]["ram_file"] == host.vm1_ram
    vm1.send(msgpack.packb([BYE, "host restart coming"]))
    assert vm1.until_closed() == []
    vm1.close()
    host.vm1_print = fingerprint(host.vm1_ram)
    with Window(host) as window:
        for address in (host.sock, host.tcp):
            for pages, token in ((1, None), (VM1_PAGES, None), (VM1_PAGES, "guessed-token")):
                thief = Raw(address)
                reply = thief.hello("vm1", pages, features=["ranges52", "shared-ram"], token=token)
                assert reply[:2] == [ERROR, "auth-failed"], reply
                _closed_after(thief, msgpack.packb([REPORT, 0, words([(0, VM1_PAGES)])]))
    window.assert_healthy()
    _vm1_unchanged(host)


def test_item3_22_hellos_with_no_batch(host):
    rss = host.rss()
    with Window(host) as window:
        idle = []
        for i in range(22):
            guest = Raw(host.sock)
            reply = guest.hello(f"idle{i}", OPEN_CAP // 4096)
            assert reply[0] == WELCOME or reply[:2] == [ERROR, "too-many-guests"], reply
            idle.append(guest)
        newcomer = Raw(host.vm1_sock)  # the provisioned guest is never locked out
        assert newcomer.hello("vm1", VM1_PAGES)[0] == WELCOME
        newcomer.close()
        for guest in idle:
            guest.close()
    window.assert_healthy()
    assert host.rss() - rss < 32 << 20, "22 idle max-size guests cost more than 32 MiB"


def test_item4_a_nested_array_bomb_sent_without_its_last_byte(host):
    rss = host.rss()
    with Window(host) as window:
        bombs = []
        for _ in range(4):
            bomb = Raw(host.sock)
            count = (1 << 20) - 16
            try:  # refusing it early (closing the stream) is a fine answer too
                bomb.send(b"\x93\x03\x00\xdd" + struct.pack(">I", count) + b"\x90" * (count - 1))
            except OSError:
                pass
            bombs.append(bomb)
        time.sleep(0.5)
        grown = host.rss() - rss
        for bomb in bombs:
            bomb.close()
    window.assert_healthy()
    assert grown < 32 << 20, f"4 half-sent 1 MiB bombs grew the host by {grown >> 20} MiB"


def test_item5_pages_2_40_with_shared_ram_makes_no_file(host):
    with Window(host) as window:
        for pages in (2**40, 2**51, 2**52):
            guest = Raw(host.sock)
            assert guest.hello("sparse", pages, features=["ranges52", "shared-ram"])[:2] == [ERROR, "bad-size"]
            guest.close()
    window.assert_healthy()
    assert not (host.ram_dir / "sparse.ram").exists()


def test_item6_slowloris_after_hello_is_closed_by_the_idle_timer(host):
    guest = Raw(host.sock, timeout=10)
    assert guest.hello("slow", 64, features=["ranges52", "stats"])[0] == WELCOME
    partial = msgpack.packb([STATS, {str(i): i for i in range(32)}])
    started = time.monotonic()
    closed = False
    with Window(host) as window:
        for byte in partial[:-1]:  # one byte every 0.5 s; --idle-timeout is 3 s
            try:
                guest.send(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.5)
            if time.monotonic() - started > 8:
                break
    guest.close()
    window.assert_healthy()
    assert closed, "a STATS that never completes kept the session past --idle-timeout"


def test_item7_throwaway_ids_cannot_lock_out_provisioned_or_new_guests(host):
    with Window(host) as window:
        for round_ in range(3):
            for i in range(16):  # --max-guests 16: fill the open cap with throwaway ids
                junk = Raw(host.sock)
                junk.hello(f"junk{round_}-{i}", 16)
                junk.close()
            vm1 = Raw(host.vm1_sock)
            assert vm1.hello("vm1", VM1_PAGES)[0] == WELCOME
            vm1.close()
        deadline = time.monotonic() + 5  # --forget-after 0.2s: the cap frees up quickly
        while True:
            fresh = Raw(host.sock)
            reply = fresh.hello("legit-newcomer", 16)
            fresh.close()
            if reply[0] == WELCOME:
                break
            assert time.monotonic() < deadline, reply
            time.sleep(0.1)
    window.assert_healthy()


def test_item8_a_pre_hello_flood_does_not_lock_out_guests(host):
    with Window(host) as window:
        flood = []
        for _ in range(300):
            try:
                flood.append(Raw(host.sock, timeout=2))
            except OSError:
                break
        admitted = 0
        for i in range(15):
            try:
                guest = Raw(host.vm1_sock if i == 0 else host.sock, timeout=3)
                reply = guest.hello("vm1" if i == 0 else f"legit{i}", 16 if i else VM1_PAGES)
                admitted += reply is not None and reply[0] == WELCOME
                guest.close()
            except OSError:
                pass
        for sock in flood:
            sock.close()
    window.assert_healthy()
    assert admitted == 15, f"only {admitted} of 15 legitimate guests got in during a pre-HELLO flood"


def test_item9_a_newline_in_a_bye_reason_forges_no_log_line(host):
    forged = "2026-12-01 12:00:00,000 ERROR   balloon.host: host compromised guest=vm1"
    guest = Raw(host.sock)
    assert guest.hello("liar", 16)[0] == WELCOME
    guest.send(msgpack.packb([BYE, "done\n" + forged]))
    guest.until_closed()
    guest.close()
    coder = Raw(host.sock)
    assert coder.hello("liar2", 16)[0] == WELCOME
    coder.send(msgpack.packb([ERROR, "internal\n" + forged, "x"]))
    coder.until_closed()
    coder.close()
    deadline = time.monotonic() + 5
    while "liar2" not in host.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = host.log_text().splitlines()
    assert not any(line.startswith("2026-12-01 12:00:00,000") for line in lines)
    assert any("liar" in line and "host compromised" in line for line in lines)


@pytest.mark.parametrize("body", [b"[" * 3000, b'{"size": "' + b"9" * 400 + b'"}',
                                  b'{"size": "' + b"9" * 400 + b'.5"}'])
def test_item9_admin_bodies_get_400_not_500(host, body):
    status, text = host.api("POST", "/api/v1/guests/healthy/target", raw=body)
    assert status == 400 and b"error" in text
    status, text = host.api("PUT", "/api/v1/guests/newvm", raw=body)
    assert status == 400 and b"error" in text


def test_item9_a_1023_deep_array_in_a_checked_field(host):
    with Window(host) as window:
        guest = Raw(host.sock)
        deep = b"\x91" * 1023 + b"\x90"
        body = msgpack.packb({"version": 1, "page_size": 4096, "pages": 16, "features": []})
        guest.send(b"\x92\x01" + b"\x85" + body[1:] + msgpack.packb("guest") + deep)
        reply = guest.recv()
        assert reply is not None and reply[0] == ERROR and reply[1] != "internal", reply
        guest.close()
    window.assert_healthy()


def _fuzz_message(rng: random.Random) -> bytes:
    """One structured-random message: a real shape with one thing wrong, or plain garbage."""
    choice = rng.randrange(10)
    if choice == 0:
        return rng.randbytes(rng.randrange(1, 64))
    if choice == 1:
        return hello(rng.choice(["f", "vm1", "healthy", "x" * 63, "-bad"]), rng.choice([0, 1, 2**52, 2**64 - 1, 64]),
                     features=rng.sample(["ranges52", "pfn32", "shared-ram", "stats", "hinting", "zz"], 3))
    kind = rng.choice([3, 5, 6, 7, 10, 13, 14, 15, 16, 17, 2, 4, 0, 99, -1])
    seq = rng.choice([0, 1, 2**64 - 1, -1, "0"])
    payload = rng.choice([
        words([(rng.randrange(2**20), rng.randrange(1, 5000)) for _ in range(rng.randrange(1, 64))]),
        struct.pack("<Q", 0), rng.randbytes(7), b"", words([(0, 2**63)]), words([(2**52 - 1, 4095)]),
    ])
    fields = [kind, seq, payload][: rng.randrange(1, 5)]
    if rng.random() < 0.2:
        fields.append({"extra": [1, 2, {"x": None}]})
    data = msgpack.packb(fields, use_bin_type=True)
    if rng.random() < 0.1:
        data = data[: rng.randrange(1, len(data))]
    return data


def test_structured_fuzzing_with_a_healthy_guest_connected(host):
    rng = random.Random(9)
    sessions = 0
    with Window(host) as window:
        deadline = time.monotonic() + FUZZ_SECONDS
        while time.monotonic() < deadline and sessions < 40 * FUZZ_SECONDS:
            sessions += 1
            attacker = None
            try:
                attacker = Raw(host.sock, timeout=2)
                if rng.random() < 0.7:
                    reply = attacker.hello(f"fz{sessions % 8}", rng.choice([16, 4096, 65536]),
                                           features=["ranges52", "stats", "hinting"])
                    if reply is None or reply[0] != WELCOME:
                        attacker.close()
                        continue
                for _ in range(rng.randrange(1, 8)):
                    attacker.send(_fuzz_message(rng))
                attacker.sock.settimeout(0.2)
                try:
                    attacker.until_closed()
                except (TimeoutError, msgpack.ExtraData, ValueError):
                    pass
            except OSError:
                pass
            finally:
                if attacker is not None:
                    attacker.close()
    window.assert_healthy()
    assert sessions >= 50
    _vm1_unchanged(host)


def test_zz_rss_stays_within_the_budget_and_vm1_is_intact(host, capsys):
    """After every attack above: the host's RSS grew by less than RSS_BUDGET; vm1 still works."""
    grown = host.rss() - host.rss_start
    with capsys.disabled():
        print(f"\n[attacks] host RSS {host.rss_start >> 20} MiB at start, +{grown / 2**20:.1f} MiB after all "
              f"(budget {RSS_BUDGET >> 20} MiB); healthy guest p99 ACK latency per attack window:")
        for name, (worst, count, rss) in host.figures.items():
            print(f"[attacks]   {name}: p99 {worst * 1000:.1f} ms over {count} ACKs, RSS +{rss / 2**20:.1f} MiB")
    assert grown < RSS_BUDGET, f"host RSS grew by {grown >> 20} MiB (budget {RSS_BUDGET >> 20} MiB)"
    _vm1_unchanged(host)
    vm1 = Raw(host.vm1_sock)
    assert vm1.hello("vm1", VM1_PAGES, features=["ranges52", "shared-ram"])[0] == WELCOME
    vm1.send(msgpack.packb([REPORT, 0, words([(0, 16)])]))
    assert vm1.recv() == [ACK, 0, 0]
    vm1.close()


def _flood_to_the_fd_limit(*flags: str) -> int:
    """The issue's setting: the host at a 256-fd limit, an attacker on TCP holding pre-HELLO connections
    past it and reopening every one the host closes; then 15 legitimate guests on the host's Unix
    listeners (vm1 on its own), one 1 s attempt each. Returns how many got their WELCOME."""
    import threading

    attacked = AttackedHost("--handshake-timeout", "5s", *flags, rlimit_nofile=256)
    stop = threading.Event()
    held: list[Raw] = []

    def flood():
        while not stop.is_set():
            if len(held) >= 400:
                stop.wait(0.01)
                continue
            try:
                held.append(Raw(attacked.tcp, timeout=1))
            except OSError:
                stop.wait(0.01)

    try:
        attacker = threading.Thread(target=flood, daemon=True)
        attacker.start()
        time.sleep(1.0)  # the flood is at the limit
        admitted = 0
        for i in range(15):
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                try:
                    guest = Raw(attacked.vm1_sock if i == 0 else attacked.sock, timeout=2)
                    reply = guest.hello("vm1" if i == 0 else f"legit{i}", VM1_PAGES if i == 0 else 16)
                    guest.close()
                    if reply is not None and reply[0] == WELCOME:
                        admitted += 1
                        break
                except OSError:
                    pass
                time.sleep(0.1)
        stop.set()
        attacker.join(5)
        assert attacked.alive()
        return admitted
    finally:
        stop.set()
        for sock in held:
            sock.close()
        attacked.close()


def test_item8_a_flood_to_the_fd_limit_with_caps_below_it_locks_nobody_out():
    admitted = _flood_to_the_fd_limit("--max-handshakes", "64", "--max-handshakes-per-peer", "48")
    assert admitted == 15, f"only {admitted} of 15 legitimate guests got in during a flood to the fd limit"


def test_item8_a_flood_to_the_fd_limit_with_default_caps_locks_nobody_out():
    admitted = _flood_to_the_fd_limit()
    assert admitted == 15, f"only {admitted} of 15 legitimate guests got in during a flood to the fd limit"

"""The sans-IO host session: bytes and a clock in, bytes and effects out — no sockets, no sleeps."""

from __future__ import annotations

import msgpack
from sessionkit import (
    ACK,
    BYE,
    ERROR,
    INFLATE,
    PING,
    REPORT,
    STATS,
    WELCOME,
    FakeRam,
    Host,
    batch,
    decode,
    hello,
)

from host_daemon.registry import by_kind
from shared.errors import RemoteProtocolError


def welcomed(host: Host, guest: str = "g1", now: float = 0.0, pages: int = 65536):
    session = host.session(now)
    out = session.receive(hello(guest, pages), now)
    assert decode(out.data)[0][0] == WELCOME
    return session


async def test_hello_then_batches_acked_in_one_write():
    host = Host(window=4)
    session = welcomed(host)
    chunk = b"".join(batch(REPORT, seq, [(seq * 1024, 512)]) for seq in range(4))
    out = session.receive(chunk, 1.0)
    assert decode(out.data) == [[ACK, seq, 0] for seq in range(4)]
    assert not out.close and out.discard is None
    assert host.registry.get("g1").tracker.reported_pages == 4 * 512


async def test_a_malformed_message_in_a_chunk_applies_nothing_of_it():
    host = Host()
    session = welcomed(host)
    out = session.receive(batch(REPORT, 0, [(0, 8)]) + batch(REPORT, 5, [(64, 8)]), 1.0)  # bad seq
    assert decode(out.data) == [[ERROR, "bad-seq", "expected seq 1, got 5"]]
    assert out.close and session.result == "error"
    assert host.registry.get("g1").tracker.reported_pages == 0


async def test_idle_timer_counts_whole_messages_not_bytes():
    """A STATS trickled one byte every 2 s never completes: the session is closed anyway."""
    host = Host(idle_timeout=6.0)
    session = welcomed(host)
    stats = msgpack.packb([STATS, {4: 1 << 20, 5: 1 << 30}])
    now, out = 0.0, None
    for byte in stats[:-1]:
        now += 2.0
        session.receive(bytes([byte]), now)
        out = session.on_timer(now)
        if out.close:
            break
    assert out is not None and out.close, "a trickled message kept the session alive"
    assert decode(out.data)[-1][:2] == [ERROR, "idle-timeout"]
    assert session.result == "timeout" and now <= 6.0 + 2.0
    assert host.stats.sessions["timeout"] == 1


async def test_keepalive_ping_then_idle_timeout():
    host = Host(idle_timeout=9.0)
    session = welcomed(host)
    assert session.next_deadline() == 3.0
    assert session.on_timer(2.9).data == b""
    assert decode(session.on_timer(3.0).data) == [[PING, 1]]
    assert session.next_deadline() == 9.0
    session.receive(batch(REPORT, 0, [(0, 1)]), 5.0)  # a whole message resets the clock
    assert session.next_deadline() == 8.0
    out = session.on_timer(14.0)
    assert out.close and decode(out.data)[-1][:2] == [ERROR, "idle-timeout"]


async def test_handshake_timeout():
    host = Host(handshake_timeout=5.0)
    session = host.session(now=10.0)
    assert session.next_deadline() == 15.0
    session.receive(hello()[:3], 11.0)  # part of a HELLO is not a HELLO
    out = session.on_timer(15.0)
    assert out.close and decode(out.data) == [[ERROR, "handshake-timeout", "no HELLO within 5s"]]
    assert host.stats.sessions["timeout"] == 1


async def test_hello_right_after_bye_is_admitted():
    """The ending session releases its guest id synchronously, before anything is written."""
    host = Host()
    first = welcomed(host)
    out = first.receive(msgpack.packb([BYE, "bye"]), 1.0)
    assert out.close and first.result == "bye"
    assert host.registry.get("g1").connection is None
    second = host.session(1.0)
    assert decode(second.receive(hello(), 1.0).data)[0][0] == WELCOME


async def test_hello_right_after_the_hosts_error_is_admitted():
    host = Host()
    first = welcomed(host)
    out = first.receive(b"\xc1", 1.0)  # never valid msgpack
    assert decode(out.data)[0][:2] == [ERROR, "bad-msgpack"]
    second = host.session(1.0)
    assert decode(second.receive(hello(), 1.0).data)[0][0] == WELCOME


async def test_second_live_session_is_busy_and_rejected():
    host = Host()
    welcomed(host)
    second = host.session(1.0)
    out = second.receive(hello(), 1.0)
    assert decode(out.data)[0][:2] == [ERROR, "guest-busy"]
    assert second.result == "rejected" and host.stats.sessions["rejected"] == 1


async def test_an_exception_while_building_a_session_is_answered_and_counted():
    class Broken:
        def admit(self, hello, peer, owner):
            raise ZeroDivisionError("bug")

        def release(self, admission, owner):  # pragma: no cover - never admitted
            raise AssertionError

    host = Host()
    session = host.session(0.0, admitter=Broken())
    out = session.receive(hello(), 0.0)
    assert decode(out.data)[0][:2] == [ERROR, "internal"]
    assert out.close and session.result == "internal"
    assert host.stats.sessions["internal"] == 1 and host.stats.protocol_errors["internal"] == 1


async def test_a_refusal_is_counted_as_rejected():
    class Refuses:
        def admit(self, hello, peer, owner):
            raise RemoteProtocolError("auth-failed", "no")

    host = Host()
    session = host.session(0.0, admitter=Refuses())
    out = session.receive(hello(), 0.0)
    assert decode(out.data) == [[ERROR, "auth-failed", "no"]]
    assert host.stats.sessions["rejected"] == 1


async def test_discards_run_before_the_ack():
    host = Host()
    session = welcomed(host)
    record = host.registry.get("g1")
    record.ram = FakeRam()
    small = batch(REPORT, 0, [(0, 8)])
    large = batch(INFLATE, 1, [(4096, 2048)])
    out = session.receive(small + large, 1.0)
    assert out.data == b"" and out.discard is not None and not out.discard.offload
    assert session.busy and session.next_deadline() is None
    out.discard.run()
    out = session.resume(1.0)
    assert decode(out.data) == [[ACK, 0, 0]]  # the small one, then the large one waits
    assert out.discard is not None and out.discard.offload and out.discard.pages == 2048
    out.discard.run()
    out = session.resume(1.1)
    assert decode(out.data) == [[ACK, 1, 0]] and not session.busy
    assert record.ram.discarded == [([0], [8]), ([4096], [2048])]


async def test_a_failed_discard_ends_the_session_with_internal():
    host = Host()
    session = welcomed(host)
    host.registry.get("g1").ram = FakeRam()
    out = session.receive(batch(REPORT, 0, [(0, 8)]), 1.0)
    out = session.resume(1.0, failed=True)
    assert decode(out.data)[0][:2] == [ERROR, "internal"] and out.close


async def test_shutdown_says_bye_after_a_running_discard():
    host = Host()
    session = welcomed(host)
    host.registry.get("g1").ram = FakeRam()
    out = session.receive(batch(REPORT, 0, [(0, 8)]), 1.0)
    assert session.shutdown(1.0).data == b""  # the discard is still running
    out = session.resume(1.0)
    assert decode(out.data) == [[ACK, 0, 0], [BYE, "host shutting down"]]
    assert out.close and session.result == "shutdown" and host.registry.get("g1").connection is None


async def test_eof_ends_the_session_as_closed():
    host = Host()
    session = welcomed(host)
    out = session.receive(b"", 1.0)
    assert out.close and session.result == "closed" and host.stats.sessions["closed"] == 1


async def test_target_is_sent_after_welcome():
    host = Host()
    first = welcomed(host)
    host.registry.get("g1").target_pages = 100
    first.receive(msgpack.packb([BYE, ""]), 1.0)
    second = host.session(2.0)
    messages = decode(second.receive(hello(), 2.0).data)
    assert [m[0] for m in messages] == [WELCOME, 8] and messages[1][1] == 100


async def test_hello_and_bye_in_one_chunk_end_quietly():
    host = Host()
    session = host.session(0.0)
    out = session.receive(hello() + msgpack.packb([BYE, "changed my mind"]), 0.0)
    assert out.close and out.data == b"" and session.result == "bye"
    assert host.stats.sessions["internal"] == 0 and host.registry.get("g1") is None


async def test_batches_then_bye_in_one_chunk_are_applied_and_acked_before_the_close():
    """A reproduced case: REPORT seq 1 [(1, 1)] then BYE "now" in one read. Applied means acked."""
    host = Host()
    session = welcomed(host)
    record = host.registry.get("g1")
    assert decode(session.receive(batch(REPORT, 0, [(64, 8)]), 1.0).data) == [[ACK, 0, 0]]
    record.ram = FakeRam()
    out = session.receive(bytes.fromhex("930301c40801100000000000009211a36e6f77"), 1.0)
    assert out.discard is not None and out.data == b"" and not out.close  # the punch first
    out.discard.run()
    out = session.resume(1.0)
    assert decode(out.data) == [[ACK, 1, 0]] and out.close and session.result == "bye"
    assert by_kind(record.batches)["report"] == 2 and record.tracker.reported_pages == 9
    assert record.ram.discarded == [([1], [1])]


async def test_batches_then_a_guest_error_in_one_chunk_are_acked_before_the_close():
    host = Host()
    session = welcomed(host)
    chunk = batch(REPORT, 0, [(0, 8)]) + batch(INFLATE, 1, [(64, 8)]) + msgpack.packb([ERROR, "internal", "oops"])
    out = session.receive(chunk, 1.0)
    assert decode(out.data) == [[ACK, 0, 0], [ACK, 1, 0]]
    assert out.close and session.result == "guest-error"
    assert by_kind(host.registry.get("g1").batches)["report"] == by_kind(host.registry.get("g1").batches)["inflate"] == 1


async def test_a_bye_read_while_a_discard_runs_waits_for_its_ack():
    host = Host()
    session = welcomed(host)
    host.registry.get("g1").ram = FakeRam()
    out = session.receive(batch(REPORT, 0, [(0, 8)]) + batch(REPORT, 1, [(64, 8)]) + msgpack.packb([BYE, ""]), 1.0)
    assert out.discard is not None and out.data == b""
    out.discard.run()
    out = session.resume(1.0)
    assert decode(out.data) == [[ACK, 0, 0]] and out.discard is not None and not out.close
    out.discard.run()
    out = session.resume(1.0)
    assert decode(out.data) == [[ACK, 1, 0]] and out.close and session.result == "bye"


async def test_the_guest_id_stays_taken_until_a_discard_cut_off_by_a_reset_is_done():
    """The connection breaks while a punch runs: the session is over, but a new HELLO for
    the id is guest-busy until the punch is done — a new WELCOME means the old work is over."""
    host = Host()
    session = welcomed(host)
    record = host.registry.get("g1")
    record.ram = FakeRam()
    out = session.receive(batch(REPORT, 0, [(0, 2048)]), 1.0)
    assert out.discard is not None and out.discard.offload
    session.connection_lost(ConnectionResetError(), 1.1)
    assert session.result == "reset" and record.connection is session
    early = host.session(1.2).receive(hello("g1"), 1.2)
    assert decode(early.data)[0][:2] == [ERROR, "guest-busy"]
    out.discard.run()
    assert session.resume(1.3).data == b""
    assert record.connection is None and by_kind(record.batches)["report"] == 1  # applied, counted
    late = host.session(1.4).receive(hello("g1"), 1.4)
    assert decode(late.data)[0][0] == WELCOME


async def test_a_debug_delay_cut_off_by_a_reset_also_holds_the_id():
    host = Host(debug_apply_delay=0.5)
    session = welcomed(host)
    out = session.receive(batch(REPORT, 0, [(0, 8)]), 1.0)
    assert out.delay == 0.5 and out.data == b""
    session.connection_lost(None, 1.1)
    assert host.registry.get("g1").connection is session
    session.resume(1.5)
    assert host.registry.get("g1").connection is None

"""The seed's buffer, for real (tracker issue 10 item 7): one preallocated buffer per queue.

A batch's words are encoded straight into the agent's one ``RangeBuffer`` and sent from
it (msgpack packs the message from a view); it is refilled for the next batch and never
grows, and building a batch allocates nothing the size of a payload.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
from guest_fakes import FakeBuddy, FakeHost, connect

from guest_agent.agent import Agent
from guest_agent.batches import Ranges52Payloads
from guest_agent.metrics import GuestMetrics
from guest_agent.reporting import FreePageReporting
from shared.ranges import RangeBuffer, decode_ranges
from shared.vocabulary import SEED_BUFFER_WORDS, WORD_BYTES


def _blocks(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` order-9 blocks with a gap after each: no coalescing, no escapes."""
    return np.arange(n, dtype=np.uint64) * np.uint64(1024), np.full(n, 512, dtype=np.uint64)


def test_full_batches_are_encoded_into_the_one_buffer_without_a_payload_allocation():
    buffer = RangeBuffer(SEED_BUFFER_WORDS)
    storage = buffer._words
    pfns, counts = _blocks(4 * SEED_BUFFER_WORDS)
    source = Ranges52Payloads(pfns, counts, buffer)
    source.next()  # warm up (numpy's own caches)
    sizes = []
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        while source.more:
            sizes.append(len(source.next()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    payload_bytes = SEED_BUFFER_WORDS * WORD_BYTES  # 32 KiB
    assert sizes == [payload_bytes] * 3
    assert peak - before < payload_bytes // 4, f"{peak - before} bytes allocated building 3 full batches"
    assert buffer._words is storage and buffer.capacity == SEED_BUFFER_WORDS  # never grew


def test_the_payload_is_a_view_of_the_buffer_and_decodes_to_the_ranges():
    buffer = RangeBuffer(SEED_BUFFER_WORDS)
    pfns, counts = _blocks(SEED_BUFFER_WORDS + 10)
    counts[5] = 5000  # one escaped range: two words
    source = Ranges52Payloads(pfns, counts, buffer)
    first = source.next()
    assert np.shares_memory(np.frombuffer(first, dtype=np.uint64), buffer._words)
    got = decode_ranges(bytes(first))
    assert got[0].tolist() == pfns[: SEED_BUFFER_WORDS - 1].tolist()
    assert got[1].tolist() == counts[: SEED_BUFFER_WORDS - 1].tolist()
    rest = decode_ranges(bytes(source.next()))
    assert rest[0].tolist() == pfns[SEED_BUFFER_WORDS - 1 :].tolist() and not source.more


def test_a_steady_report_cycle_sends_from_one_buffer():
    pages = 8192
    allocator = FakeBuddy(pages)
    reporting = FreePageReporting(allocator, 9, 1.0, 4)
    agent = Agent(allocator=allocator, reporting=reporting, metrics=GuestMetrics(), total_pages=pages,
                  ping_interval=0, stats_interval=0)
    host = FakeHost(window=1)
    conn = connect(agent, host, 0.0, features=("ranges52",))
    buffer = agent._buffer
    payloads = []
    send = conn.send

    def recording_send(message):
        payloads.append(getattr(message, "payload", None))
        return send(message)

    conn.send = recording_send
    now = 0.0
    for _ in range(30):  # report passes: isolate, send, ack, return blocks; free again, repeat
        now += 1.5
        agent.tick(now)
        while (data := agent.poll_batch(now)) is not None:
            host.receive(data)
            conn.receive_data(host.ack())
            for event in conn.events():
                agent.receive(event, now)
        allocator.clear_reported()
    batches = [p for p in payloads if p is not None]
    assert len(batches) >= 10
    assert agent._buffer is buffer
    for payload in batches:
        assert isinstance(payload, memoryview)
        assert np.shares_memory(np.frombuffer(payload, dtype=np.uint64), buffer._words)

"""A forgotten guest's memory goes back when it is dropped, not when the cyclic GC runs.

The cyclic collector's oldest generation runs rarely, and the bitmaps (2 MiB for a 16 GiB
guest) are not objects it counts, so a reference cycle anywhere between the registry's
record and its tracker kept every forgotten guest's bitmaps (issue 17 item 1). These tests
run with the collector off: what is not freed by reference counting alone fails them.
"""

from __future__ import annotations

import gc
import weakref

import msgpack
import pytest
from sessionkit import BYE, FakeRam, Host, batch, decode, hello

from host_daemon.malloc import pin_mmap_threshold
from host_daemon.tracker import GuestTracker

REPORT, INFLATE, ACK, WELCOME = 3, 6, 4, 2


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_a_tracker_is_freed_by_reference_counting(no_gc):
    tracker = GuestTracker(1 << 22)
    tracker.apply("report", [0], [1 << 22])
    assert tracker.reported.pages == 1 << 22
    gone = weakref.ref(tracker)
    del tracker
    assert gone() is None


async def test_a_forgotten_guest_leaves_nothing_behind(no_gc):
    host = Host()
    session = host.session(0.0)
    assert decode(session.receive(hello("g1", 1 << 22), 0.0).data)[0][0] == WELCOME
    record = host.registry.get("g1")
    record.ram = FakeRam()
    out = session.receive(batch(REPORT, 0, [(0, 1 << 22)]) + msgpack.packb([BYE, ""]), 1.0)
    out.discard.run()
    assert decode(session.resume(1.0).data) == [[ACK, 0, 0]]
    assert session.result == "bye" and record.connection is None and session.owner is None
    tracker, record_ref = weakref.ref(record.tracker), weakref.ref(record)
    del record, out
    host.registry.forget("g1")
    assert host.registry.get("g1") is None
    del session  # what the shell drops when the transport is gone
    assert record_ref() is None and tracker() is None


async def test_a_new_session_frees_the_previous_sessions_tracker(no_gc):
    host = Host()
    first = host.session(0.0)
    first.receive(hello("g1", 1 << 20), 0.0)
    old = weakref.ref(host.registry.get("g1").tracker)
    first.receive(msgpack.packb([BYE, ""]), 1.0)
    second = host.session(2.0)
    assert decode(second.receive(hello("g1", 1 << 20), 2.0).data)[0][0] == WELCOME
    assert old() is None


def test_glibcs_mmap_threshold_can_be_pinned():
    """The host pins it at start (host_daemon/malloc.py); glibc answers 1 to mallopt."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert pin_mmap_threshold() is True

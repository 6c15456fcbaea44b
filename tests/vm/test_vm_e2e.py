"""The full real-VM suite (``make vm-test``): what the project promises, on a real kernel.

Each test boots its own 1 GiB TCG guest with RAM preallocated, so every guest page is
backed in the host's RAM file and only the host's punching can lower st_blocks: the drop
is then exactly what the host really gave back. A canary (tests/vm/guest_memcheck.py
``hold``) keeps a pattern in guest memory through everything and is verified at the end;
after every deflate the guest writes and reads back fresh memory.
"""

from __future__ import annotations

import signal

import pytest

from tests.vm.stack import AGENT_LOG, Stack, poll

pytestmark = [pytest.mark.vm_full, pytest.mark.timeout(600)]
MIB = 1 << 20
CANARY_LOG = "/tmp/canary.log"


def start_canary(stack: Stack, mib: int = 96) -> None:
    vm = stack.vm
    vm.spawn(vm.python(f"{vm.repo}/tests/vm/guest_memcheck.py hold {mib} --until /tmp/canary.stop"), CANARY_LOG)
    poll(lambda: "holding" in vm.run(f"cat {CANARY_LOG}"), 120, lambda: vm.run(f"cat {CANARY_LOG}"))


def stop_canary(stack: Stack) -> str:
    vm = stack.vm
    vm.run("touch /mnt/tmp/canary.stop")

    def finished():
        out = vm.run(f"cat {CANARY_LOG}")
        return out if "memcheck ok" in out or "FAILED" in out else None

    return poll(finished, 60, lambda: vm.run(f"cat {CANARY_LOG}"))


def agent_and_canary(stack: Stack, *options: str) -> None:
    """The agent connected (balloon only, unless options say otherwise) and a canary held.

    ``--scan-interval 0``: no periodic kpageflags scan, whose fresh 8-bytes-per-page buffers
    (2 MiB for 1 GiB) come from the free lists — pages a deflate just left as holes — and would
    move st_blocks by what the test does not measure."""
    stack.start_agent("--source linux", *(options or ("--no-reporting", "--scan-interval", "0")))
    stack.wait_connected(180)
    start_canary(stack)


def deflate_and_verify(stack: Stack) -> None:
    """Empty the balloon, write and read back fresh memory, and check the canary survived."""
    stack.target(0)
    stack.wait_inflated(0, 180)
    check_fresh_memory(stack)
    assert "memcheck ok" in stop_canary(stack)


def check_fresh_memory(stack: Stack, mib: int = 256) -> None:
    vm = stack.vm
    out = vm.run(vm.python(f"{vm.repo}/tests/vm/guest_memcheck.py check {mib}"), 240)
    assert "memcheck ok" in out and "bad_words=0" in out, out


def test_host_guest_and_ram_file_agree_on_the_balloon():
    with Stack() as stack:
        vm = stack.vm
        agent_and_canary(stack)
        before_file, before_mem = vm.ram_allocated(), vm.meminfo()
        # Growing steps: each new chunk comes from free, backed memory, so the file drops by exactly
        # the balloon. (A deflated page stays a hole until the guest touches it again.)
        for mib in (128, 384, 512):
            stack.target(mib)
            record = stack.wait_inflated(mib, 180)
            mem = vm.meminfo()
            assert before_file - vm.ram_allocated() == mib * MIB  # st_blocks: exactly the balloon
            assert record["inflated_bytes"] == mib * MIB == stack.metric("balloon_inflated_bytes")
            # The guest's own view: the pinned balloon is gone from what it can use.
            assert before_mem["MemAvailable"] - mem["MemAvailable"] == pytest.approx(mib * MIB, rel=0.1)
            assert mem["Mlocked"] >= (mib - 1) * MIB
        stack.target(0)
        stack.wait_inflated(0, 180)
        # holes until the guest writes there: the host re-backs none of them; the guest's own
        # allocations meanwhile (each malloc of 128 KiB or more is fresh pages from the free
        # lists, which the deflate just filled with holes) may take back a little
        assert 508 * MIB <= before_file - vm.ram_allocated() <= 512 * MIB
        check_fresh_memory(stack)
        assert vm.ram_allocated() > before_file - 512 * MIB  # and writing backs them again
        assert "memcheck ok" in stop_canary(stack)


def test_host_sigkill_mid_balloon_reconnects_over_the_same_port_and_converges():
    with Stack() as stack:
        vm = stack.vm
        agent_and_canary(stack)
        full = vm.ram_allocated()
        stack.target(600)
        poll(lambda: stack.guest()["inflated_pages"] >= 64 * 256, 120, "the balloon to start filling")
        stack.kill_host()  # mid-balloon: INFLATEs in flight, never acked
        stack.start_host()
        # QEMU redials the new host ~1 s later; the agent saw EOF and says HELLO on the same fd.
        record = stack.wait_connected(120)
        # The new host knows no target: the agent keeps (and re-inflates) what it holds.

        def reinflated():
            record = stack.guest()
            return record["inflated_pages"] if record["connected"] and record["batches"]["inflate"] else None

        held = poll(reinflated, 120, lambda: f"re-inflate after the host restart: {stack.guest()}")
        assert record["connected"] and held > 0
        # The agent still wants the old host's 600 MiB; the new host says 300: both views meet there.
        stack.target(300)
        stack.wait_inflated(300, 180)
        dropped = full - vm.ram_allocated()  # pages deflated since stay holes until the guest writes them
        assert 300 * MIB <= dropped <= 600 * MIB, dropped >> 20
        # The host's restart was an end of stream for the agent: a new HELLO, no resync.
        assert vm.run(f"grep -c resynchronised {AGENT_LOG}").strip() == "1"
        assert vm.run(f"grep -c 'session started' {AGENT_LOG}").strip() == "2"
        deflate_and_verify(stack)


def test_a_restarted_agent_starts_a_fresh_session_and_nothing_is_lost():
    with Stack() as stack:
        agent_and_canary(stack)
        stack.target(256)
        stack.wait_inflated(256, 180)
        stack.kill_agent(signal.SIGKILL)  # its pinned pages go back to the guest kernel
        check_fresh_memory(stack, 200)  # the kernel reuses them: none may still be discarded later
        stack.start_agent("--source linux", "--no-reporting", "--scan-interval", "0", log="/tmp/agent2.log")
        # The host ends the old session on the new agent's BYE "resync"; QEMU redials; HELLO.
        poll(lambda: "resynchronised" in stack.agent_log("/tmp/agent2.log"), 180,
             lambda: stack.agent_log("/tmp/agent2.log"))
        stack.wait_connected(120)
        record = stack.wait_inflated(256, 180)  # the host's remembered TARGET, inflated anew
        assert record["target_bytes"] == 256 * MIB
        deflate_and_verify(stack)


def test_reporting_returns_free_memory_it_holds_and_the_guest_keeps_its_data():
    with Stack() as stack:
        vm = stack.vm
        full = vm.ram_allocated()
        agent_and_canary(stack, "--report-delay 500ms")
        # The first pass of a session reports free memory down to the reserve.

        def reported():
            record = stack.guest()
            return record if record["reported_bytes"] >= 256 * MIB else None

        record = poll(reported, 240, lambda: f"reports: {stack.guest()}\n{stack.agent_log()}")
        returned = full - vm.ram_allocated()
        assert returned >= 256 * MIB, (returned >> 20, record["reported_bytes"] >> 20)
        stats = stack.guest()["stats"]
        assert int(stats["5"]) > 900 * MIB and int(stats["4"]) > 0  # MEMTOT, MEMFREE from /proc/meminfo
        check_fresh_memory(stack, 300)  # reported pages are free again after the ACK, and zero-filled
        assert "memcheck ok" in stop_canary(stack)

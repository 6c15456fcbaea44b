"""The one real-VM test in ``make test``: a Linux guest under QEMU, the project's own agent
inside it on a virtio-serial port, and the host daemon punching the guest's RAM file.

It proves the whole path at once: the host's QMP link to QEMU (the RAM layout it learns), the serial transport (and the resync a new agent starts
with), ``--source linux`` inflating mlocked pages by their real PFNs, the host discarding
exactly those pages of QEMU's RAM file (st_blocks, never an mmap), and a deflate after
which the guest writes and reads back that memory without a single bad word.
"""

from __future__ import annotations

import pytest

from tests.vm.stack import Stack

BALLOON_MIB = 256


@pytest.mark.timeout(240)
def test_real_guest_balloon_returns_exactly_the_inflated_memory():
    with Stack(memory_mib=1024, prealloc=True, host_qmp=True) as stack:
        vm = stack.vm
        stack.start_agent("--source linux", "--no-reporting", "--scan-interval", "0", "--log-level info")
        record = stack.wait_connected(150)
        # the host asked QEMU (QMP) where guest RAM lives: one flat region for a 1 GiB pc guest
        assert record["vmm"]["state"] == "connected" and record["vmm"]["discard_blocked"] is None
        assert record["vmm"]["layout"] == [{"gpa": 0, "size": 1 << 30, "offset": 0}]
        before = vm.ram_allocated()
        assert before == 1024 << 20  # prealloc: every page backed, so only a punch can lower it

        stack.target(BALLOON_MIB)
        record = stack.wait_inflated(BALLOON_MIB, 120)
        dropped = before - vm.ram_allocated()
        assert dropped == BALLOON_MIB << 20, (dropped >> 20, record)
        assert record["reclaimed_bytes"] == BALLOON_MIB << 20
        mem = vm.meminfo()
        # The guest itself sees the balloon held (NR_MLOCK is a per-cpu batched counter: it lags a little).
        assert mem["Mlocked"] >= (BALLOON_MIB - 1) << 20

        stack.target(0)
        stack.wait_inflated(0, 120)
        out = vm.run(vm.python(f"{vm.repo}/tests/vm/guest_memcheck.py check 320"), 180)
        assert "memcheck ok" in out and "bad_words=0" in out, out

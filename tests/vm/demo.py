"""``make vm-demo``: a real Linux guest under QEMU, the agent inside, a balloon moved live.

Boots a 1 GiB TCG guest whose RAM is a file the host daemon punches, starts this checkout's
agent in it (``--source linux`` on a virtio-serial port), then sets targets through the
admin API and prints, side by side, what the host tracks, what the RAM file really holds
(st_blocks) and what the guest kernel says (MemTotal, MemAvailable, Mlocked).
``VM_DEMO_TARGETS`` (MiB, comma-separated) changes the steps.
"""

from __future__ import annotations

import os
import time

from tests.vm.stack import Stack

MIB = 1 << 20


def _row(stack: Stack, label: str, t0: float) -> None:
    record = stack.guest()
    mem = stack.vm.meminfo()
    print(f"{time.monotonic() - t0:7.1f}s  {label:<14} host inflated {record['inflated_bytes'] // MIB:5d} MiB  "
          f"RAM file {stack.vm.ram_allocated() // MIB:5d} MiB  guest MemAvailable "
          f"{mem.get('MemAvailable', 0) // MIB:5d} MiB  Mlocked {mem.get('Mlocked', 0) // MIB:5d} MiB", flush=True)


def main() -> int:
    targets = [int(x) for x in os.environ.get("VM_DEMO_TARGETS", "256,512,128,0").split(",")]
    t0 = time.monotonic()
    with Stack(memory_mib=1024, prealloc=True) as stack:
        print(f"guest booted in {stack.vm.boot_seconds:.1f}s (TCG, Debian {stack.artifacts.kernel_release}); "
              f"host log {stack.host_log}", flush=True)
        stack.start_agent("--source linux", "--no-reporting")
        stack.wait_connected(180)
        _row(stack, "connected", t0)
        for mib in targets:
            stack.target(mib)
            stack.wait_inflated(mib, 180)
            _row(stack, f"target {mib} MiB", t0)
        print(stack.agent_log())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

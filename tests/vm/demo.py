"""``make vm-demo``: a real Linux guest under QEMU, the agent inside, a balloon moved live.

Boots a 1 GiB TCG guest whose RAM is a file the host daemon punches, starts this checkout's
agent in it (``--source linux`` on a virtio-serial port), then sets balloon targets through
the admin API. One line per step: what the host tracks (balloon), what the RAM file really
holds (st_blocks: it starts fully allocated, QEMU's ``prealloc``), what the guest kernel
says (MemAvailable), and what is mlocked in the guest — the agent's own pins (its balloon
pages, VmLck) apart from the rest of the guest. Ends with one ``vm-demo: PASS`` or ``FAIL``
line with the figures; the host, agent and console logs are copied to ``build/vm-demo/``
(the VM's own folder in /dev/shm is removed on exit). ``VM_DEMO_TARGETS`` (MiB,
comma-separated) changes the steps.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from tests.vm.stack import AGENT_LOG, Stack

MIB = 1 << 20
LOGS = Path(__file__).resolve().parents[2] / "build" / "vm-demo"


def _mib(value: int) -> str:
    return f"{value // MIB:5d} MiB"


class Demo:
    def __init__(self, targets: list[int]) -> None:
        self.targets = targets
        self.t0 = time.monotonic()
        self.full: int | None = None  # the RAM file's allocated bytes before any balloon
        self.reclaimed: dict[int, int] = {}  # target MiB -> RAM file bytes given back at that step

    def say(self, step: str, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {step:<11} {text}", flush=True)

    def guest_memory(self, stack: Stack) -> tuple[int, dict[str, int]]:
        """(the agent's VmLck, /proc/meminfo) read in one command, so both are the same moment."""
        pids = stack.agent_pids()
        status = " ".join(f"/proc/{pid}/status" for pid in pids) or "/dev/null"
        out = stack.vm.run(f"grep -h VmLck {status}; cat /proc/meminfo", check=False, timeout=10)
        locked, info = 0, {}
        for line in out.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                if key.strip() == "VmLck":
                    locked += int(parts[0]) * 1024
                else:
                    info[key.strip()] = int(parts[0]) * 1024
        return locked, info

    def row(self, stack: Stack, step: str, target: int | None = None, settle: float = 10.0) -> None:
        """One line for a step. The host counts a deflate when it acks it and the agent unmaps
        (munlocks) the pages right after, so wait, a little, until the agent's pins match the
        balloon: read earlier, Mlocked showed the last chunk at target 0 as nobody's."""
        record = stack.guest()
        balloon = record["inflated_bytes"]
        deadline = time.monotonic() + settle
        agent, mem = self.guest_memory(stack)
        while agent != balloon and time.monotonic() < deadline:
            time.sleep(0.2)  # the guest has no event to wait on: poll with a deadline
            agent, mem = self.guest_memory(stack)
        allocated = stack.vm.ram_allocated()
        if self.full is None:
            self.full = allocated
        if target is not None:
            self.reclaimed[target] = self.full - allocated
        locked = mem.get("Mlocked", 0)
        self.say(step, f"balloon {_mib(balloon)} | RAM file {_mib(allocated)} "
                       f"({_mib(self.full - allocated).strip()} given back) | guest MemAvailable "
                       f"{_mib(mem.get('MemAvailable', 0))} | mlocked: agent {_mib(agent)}, "
                       f"rest of the guest {_mib(max(0, locked - agent))}")

    def run(self, stack: Stack) -> None:
        vm = stack.vm
        self.say("boot", f"guest up in {vm.boot_seconds:.1f}s (QEMU TCG, Debian kernel "
                         f"{stack.artifacts.kernel_release}, {vm.memory_mib} MiB in {vm.ram_file})")
        stack.start_agent("--source linux", "--no-reporting")
        stack.wait_connected(180)
        self.row(stack, "connected")
        for mib in self.targets:
            stack.target(mib)
            stack.wait_inflated(mib, 180)
            self.row(stack, f"target {mib}", mib)

    def verdict(self) -> str:
        """The figures of the PASS line: each target reached, and what the RAM file gave back."""
        steps = ", ".join(f"{mib} MiB (file -{self.reclaimed[mib] // MIB} MiB)" for mib in self.targets)
        return (f"every target reached: {steps}; a deflated balloon's pages stay out of the file until "
                f"the guest touches them again")


def _keep_logs(stack: Stack) -> None:
    """Copy what would vanish with the VM's folder to build/vm-demo/."""
    LOGS.mkdir(parents=True, exist_ok=True)
    for source, name in ((stack.host_log, "host.log"), (stack.vm.console_log, "console.log")):
        if Path(source).exists():
            shutil.copyfile(source, LOGS / name)
    (LOGS / "agent.log").write_text(stack.agent_log(AGENT_LOG) + "\n")


def main() -> int:
    targets = [int(x) for x in os.environ.get("VM_DEMO_TARGETS", "256,512,128,0").split(",")]
    demo = Demo(targets)
    print(f"vm-demo: boots a 1 GiB QEMU guest (TCG: a minute or two), runs the agent in it and moves its "
          f"balloon to {', '.join(map(str, targets))} MiB; logs kept in {LOGS}", flush=True)
    stack = None
    try:
        with Stack(memory_mib=1024, prealloc=True) as stack:
            try:
                demo.run(stack)
            finally:
                _keep_logs(stack)
    except Exception as error:  # noqa: BLE001 - the verdict names it, the logs have the rest
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"vm-demo: FAIL after {time.monotonic() - demo.t0:.0f}s: {reason} (logs in {LOGS})",
              file=sys.stderr, flush=True)
        return 1
    print(f"vm-demo: PASS in {time.monotonic() - demo.t0:.0f}s — {demo.verdict()} (logs in {LOGS})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The host talking to real QEMU over QMP (``make vm-test``): VMs of any size, stock guests,
and the migration interlock.

- A 5 GiB ``pc`` and a 3 GiB ``q35`` guest run the agent; their RAM is split around the PCI
  hole, so the host must learn the layout from QEMU (``info mtree``) to punch the right
  file pages. The balloon is large enough to take pages above 4 GiB; the RAM file must lose
  exactly the balloon's bytes, a canary held across inflate and deflate must survive, and
  fresh memory written afterwards must read back intact.
- A stock guest (no agent, QEMU's ``free-page-reporting=on``) is sized by the ``balance``
  policy through QEMU's own balloon under a budget, and its kernel's free page reporting
  shows as reclaimed with no agent at all.
- A slow migration (1 MiB/s to ``exec:cat > /dev/null``) blocks discards while it runs; the
  guest has no 9p share mounted, since QEMU refuses to migrate with one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.vm.machine import Machine
from tests.vm.stack import Stack, poll
from tests.vm.test_vm_e2e import check_fresh_memory, start_canary, stop_canary

pytestmark = [pytest.mark.vm_full, pytest.mark.timeout(900)]
MIB = 1 << 20
GIB = 1 << 30


def balloon_above_4g(stack: Stack, balloon_mib: int, below_4g: int) -> None:
    vm = stack.vm
    stack.start_agent("--source linux", "--no-reporting", "--scan-interval", "0")
    record = stack.wait_connected(240)
    layout = record["vmm"]["layout"]
    assert record["vmm"]["state"] == "connected"
    assert layout == [{"gpa": 0, "size": below_4g, "offset": 0},
                      {"gpa": 4 * GIB, "size": vm.memory_mib * MIB - below_4g, "offset": below_4g}]
    assert record["memory_bytes"] == vm.memory_mib * MIB  # RAM; WELCOME gave the agent the span
    start_canary(stack)
    before = vm.ram_allocated()
    stack.target(balloon_mib)
    record = stack.wait_inflated(balloon_mib, 600)
    # exactly the balloon, above 4 GiB included (the last batch's punch may still be running)
    poll(lambda: before - vm.ram_allocated() == balloon_mib * MIB, 60,
         lambda: f"the RAM file to drop by {balloon_mib} MiB: {(before - vm.ram_allocated()) / MIB} MiB")
    assert record["rejected_pages"].get("not-ram", 0) == 0
    stack.target(0)
    stack.wait_inflated(0, 300)
    check_fresh_memory(stack, 512)
    assert "memcheck ok" in stop_canary(stack)


def test_a_5gib_pc_guest_balloons_pages_above_4gib():
    with Stack(memory_mib=5120, prealloc=False, zero_fill=True, host_qmp=True, lifetime=1200) as stack:
        balloon_above_4g(stack, 4096, 3 * GIB)


def test_a_3gib_q35_guest_balloons_pages_above_4gib():
    with Stack(memory_mib=3072, prealloc=False, zero_fill=True, host_qmp=True, machine="q35") as stack:
        balloon_above_4g(stack, 2048, 2 * GIB)


def post(stack: Stack, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{stack.url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers=stack.admin_headers())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def test_a_stock_guest_is_sized_by_the_balance_policy_through_qmp(tmp_path):
    """No agent: QEMU's balloon, its free page reporting and the host's policy, through QMP.

    The guest's page cache holds a 600 MiB file read over the 9p share, so its RAM file stays
    above the budget after free page reporting returned the free pages; only the policy's
    balloon (the guest drops cache to fill it, QEMU discards the balloon's pages) gets it under."""
    budget_mib = 500
    fill = Path("/var/tmp") / f"balloon-vm-fill-{os.getpid()}.bin"
    with open(fill, "wb") as f:
        for _ in range(600):
            f.write(os.urandom(1 << 20))
    config = tmp_path / "policy.toml"
    config.write_text('[policy]\ninterval = "1s"\nguest_floor = "128MiB"\nblock_low = "5s"\nblock_high = "2s"\n'
                      'stale_intervals = 10\nmax_step_ratio = 0.1\n')
    try:
        with Stack(memory_mib=1024, prealloc=False, zero_fill=True, host_qmp=True, free_page_reporting=True,
                   host_args=()) as stack:
            vm = stack.vm
            poll(lambda: stack.guest()["driver"] == "virtio-balloon", 60, lambda: f"{stack.guest()}\n{stack.host_tail()}")
            # the kernel's own free page reporting, through QEMU, shows as reclaimed: no agent involved
            poll(lambda: (stack.guest()["reclaimed_bytes"] or 0) > 256 * MIB, 120, lambda: stack.guest())
            vm.run(f"cat /mnt{fill} > /dev/null", 300)
            poll(lambda: stack.guest()["usable_bytes"] is not None, 60, lambda: stack.guest())
            settled = poll(lambda: (lambda a: a if a > budget_mib * MIB else None)(vm.ram_allocated()), 60,
                           "the page cache to hold the RAM file above the budget")
            assert stack.guest()["inflated_bytes"] == 0
            post(stack, "/api/v1/policy", {"guest_memory_budget": f"{budget_mib}MiB", "policy": "balance",
                                           **policy_knobs(config)})
            poll(lambda: vm.ram_allocated() <= budget_mib * MIB, 300,
                 lambda: f"under the budget ({vm.ram_allocated() / MIB:.0f} MiB now, {settled / MIB:.0f} before)"
                         f"\n{stack.guest()}\n{stack.host_tail()}")
            record = stack.guest()
            assert record["driver"] == "virtio-balloon" and record["vmm"]["balloon_device"] is True
            assert record["inflated_bytes"] > 0 and record["target_bytes"] is not None

            def agrees():  # the host's view is QEMU's own (BALLOON_CHANGE and query-balloon)
                return stack.guest()["actual_bytes"] == vm.qmp({"execute": "query-balloon"})[0]["actual"]
            poll(agrees, 30, lambda: f"{stack.guest()} vs {vm.qmp({'execute': 'query-balloon'})}")
            post(stack, "/api/v1/policy", {"guest_memory_budget": "4GiB"})
            poll(lambda: stack.guest()["inflated_bytes"] == 0, 240, lambda: stack.guest())
            assert "Mem:" in vm.run("free -m")
    finally:
        fill.unlink(missing_ok=True)


def policy_knobs(path: Path) -> dict:
    """The [policy] table of a policy TOML as POST /api/v1/policy knobs."""
    import tomllib

    return tomllib.loads(path.read_text())["policy"]


def test_a_migration_blocks_discards_until_it_is_cancelled():
    with Stack(memory_mib=1024, prealloc=False, zero_fill=True, host_qmp=True, hostroot=False) as stack:
        vm = stack.vm
        poll(lambda: stack.guest()["vmm"]["state"] == "connected", 60, lambda: stack.guest())
        assert stack.guest()["vmm"]["discard_blocked"] is None
        vm.qmp({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": MIB}},
               {"execute": "migrate", "arguments": {"uri": "exec:cat > /dev/null"}})
        poll(lambda: stack.guest()["vmm"]["discard_blocked"] == "migration", 30, lambda: stack.guest())
        assert vm.qmp({"execute": "query-migrate"})[0]["status"] == "active"  # still running: 1 GiB at 1 MiB/s
        assert stack.metric("balloon_vmm_discard_blocked") == 1
        vm.qmp({"execute": "migrate_cancel"})
        poll(lambda: stack.guest()["vmm"]["discard_blocked"] is None, 30, lambda: stack.guest())
        assert vm.alive()


class TwoVms(Stack):
    """One host, an agent VM (``vm1``, 5 GiB ``pc``) and a stock VM (``vm2``: no agent, QEMU's
    balloon with free page reporting), both with ``qmp`` — what a new user would run."""

    def __init__(self) -> None:
        super().__init__(memory_mib=5120, prealloc=False, host_qmp=True, lifetime=1200)
        self.stock = self._stock_machine()

    def _stock_machine(self) -> Machine:
        return Machine(self.artifacts, self.folder, memory_mib=1024, name="vm2", free_page_reporting=True,
                       host_qmp=True, hostroot=False, lifetime=1200)

    def inventory(self) -> Path:
        path = super().inventory()
        stock = self.stock
        with open(path, "a") as f:
            f.write(f'\n[guest.vm2]\nmemory = "1024MiB"\nram_file = "{stock.ram_file}"\n'
                    f'qmp = "unix:{stock.host_qmp_path}"\n')
        return path

    def view(self, guest: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v1/guests/{guest}", timeout=2) as response:
            return json.load(response)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        token = self.folder / f"admin-{self.http_port}.token"
        return subprocess.run([sys.executable, "-m", "balloonctl",
                               "--host", self.url, *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "BALLOON_CTL_TOKEN_FILE": str(token), "COLUMNS": "200"})

    def close(self) -> None:
        self.stock.close()
        super().close()


def test_an_agent_vm_and_a_stock_vm_on_one_host_survive_qemu_and_host_restarts():
    with TwoVms() as stack:
        stack.stock.start()
        stack.start_agent("--source linux", "--no-reporting", "--scan-interval", "0")
        stack.wait_connected(240)
        poll(lambda: stack.view("vm2")["vmm"]["state"] == "connected" and stack.view("vm2")["driver"] == "virtio-balloon",
             60, lambda: stack.view("vm2"))
        assert stack.ctl("setmem", "vm1", "3GiB").returncode == 0
        assert stack.ctl("setmem", "vm2", "640MiB").returncode == 0
        stack.wait_inflated(2048, 600)
        poll(lambda: stack.view("vm2")["inflated_bytes"] == 384 * MIB, 120, lambda: stack.view("vm2"))
        status = stack.ctl("status")
        assert status.returncode == 0, status.stderr
        rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("vm")}
        assert "agent" in rows["vm1"] and " ok " in f" {rows['vm1']} "
        assert "virtio" in rows["vm2"] and rows["vm2"].split()[1] == "vmm"

        stack.stock.close()  # QEMU of the stock VM dies: its link goes down, nothing else notices
        poll(lambda: stack.view("vm2")["vmm"]["state"] == "unreachable", 30, lambda: stack.view("vm2"))
        assert stack.view("vm1")["connected"]
        stack.stock = stack._stock_machine()
        stack.stock.start()
        poll(lambda: stack.view("vm2")["vmm"]["state"] == "connected", 90, lambda: stack.view("vm2"))

        stack.kill_host()  # the host dies and comes back: both VMs converge again
        stack.start_host()
        stack.wait_connected(120)
        poll(lambda: stack.view("vm2")["vmm"]["state"] == "connected", 60, lambda: stack.view("vm2"))
        poll(lambda: stack.view("vm1")["inflated_bytes"] == 0 or stack.view("vm1")["target_bytes"] is None, 60,
             lambda: stack.view("vm1"))  # targets do not survive a host restart; the agent's balloon re-syncs
        assert "Traceback" not in stack.host_log.read_text(errors="replace"), stack.host_tail(60)

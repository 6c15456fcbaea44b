"""The balance policy sizing a real VM's balloon (issue 13: "the policy must also drive real VMs").

One 1 GiB TCG guest with RAM preallocated, so the RAM file is fully resident and only the
host's punching can lower it; the agent runs ``--source linux`` (real STATS from the guest's
/proc/meminfo, a user-space balloon). The host runs ``--policy balance`` with a guest-memory
budget below the guest's size: the policy is the only way back under it. Checked: the RAM
file's st_blocks converge under the budget, the guest's own MemAvailable never goes below
the policy's floor, raising the budget through POST /api/v1/policy deflates the balloon, and
fresh memory written afterwards reads back intact.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.vm.stack import Stack, poll
from tests.vm.test_vm_e2e import check_fresh_memory

pytestmark = [pytest.mark.vm_full, pytest.mark.timeout(600)]
MIB = 1 << 20
BUDGET_MIB = 700
FLOOR_MIB = 256


def policy(stack: Stack, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{stack.url}/api/v1/policy", data=data,
                                     method="GET" if body is None else "POST",
                                     headers=stack.admin_headers())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def test_balance_policy_sizes_a_real_guest_under_a_budget_and_gives_it_back(tmp_path):
    config = tmp_path / "policy.toml"
    config.write_text(f'[policy]\ninterval = "1s"\nguest_floor = "{FLOOR_MIB}MiB"\n'
                      'block_low = "5s"\nblock_high = "2s"\n')
    host_args = ("--policy", "balance", "--guest-memory-budget", f"{BUDGET_MIB}MiB",
                 "--policy-config", str(config))
    with Stack(host_args=host_args) as stack:
        vm = stack.vm
        stack.start_agent("--source linux", "--no-reporting", "--stats-interval", "1s")
        stack.wait_connected(180)
        assert vm.ram_allocated() > BUDGET_MIB * MIB  # preallocated: over the budget at the start

        lowest_available = []

        def under_budget():
            lowest_available.append(vm.meminfo()["MemAvailable"])
            return vm.ram_allocated() <= BUDGET_MIB * MIB
        poll(under_budget, 240, lambda: f"under the budget: {policy(stack)['decisions']}\n{stack.guest()}")
        record = stack.guest()
        assert record["inflated_bytes"] > 0
        # the file dropped by what the host punched, no more: nothing else lowers st_blocks here
        assert min(lowest_available) >= (FLOOR_MIB - 16) * MIB, lowest_available
        decisions = policy(stack)["decisions"]
        assert any(d["direction"] == "inflate" for d in decisions), decisions

        answer = policy(stack, {"guest_memory_budget": "4GiB"})
        assert answer["guest_memory_budget"] == 4 << 30
        ballooned = record["inflated_bytes"]
        poll(lambda: stack.guest()["inflated_bytes"] < ballooned // 2, 240,
             lambda: f"deflate after the budget was raised: {policy(stack)['decisions']}\n{stack.guest()}")
        check_fresh_memory(stack, 128)

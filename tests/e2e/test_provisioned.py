"""Issue 9 "done when", with real processes: a guest provisioned with ``listen`` + ``ram_file`` works
end to end with shared-RAM reclaim (the guest maps the host-given file, canaries in every page), and a
second process connecting elsewhere under its id changes nothing of it — neither while it is
connected nor while it is gone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from daemons import Daemons, value, wait_for

MIB = 1 << 20
MEMORY = 128 * MIB


@pytest.fixture
def daemons():
    d = Daemons()
    yield d
    d.close()


@pytest.fixture
def shm():
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="balloon-e2e-vm-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _thief(daemons):
    """A guest claiming vm1's id on the shared listener, without proof: the host refuses it and
    the guest, since retrying cannot change that, exits 2 with one line."""
    argv = [sys.executable, "-m", "guest_agent", "--connect", f"unix:{daemons.socket}", "--id", "vm1",
            "--memory", "4MiB", "--shared-ram", "--http", "off", "--log-level", "warning"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def refusals(host) -> int:
    """HELLOs the host refused as not proving their id (balloon_protocol_errors_total{code="auth-failed"})."""
    return int(value(host.metrics(), "balloon_protocol_errors_total", code="auth-failed") or 0)


def guest_json(host, guest_id: str) -> dict:
    with urllib.request.urlopen(f"{host.url}/api/v1/guests/{guest_id}", timeout=2) as response:
        return json.load(response)


def test_a_provisioned_guest_reclaims_through_its_own_file_and_cannot_be_taken(daemons, shm):
    ram = shm / "vm1.ram"
    with open(ram, "wb") as handle:  # the VMM's job (QEMU memory-backend-file): the host never creates it
        handle.truncate(MEMORY)
    vm1_sock = daemons.folder / "vm1.sock"
    inventory = daemons.folder / "guests.toml"
    inventory.write_text(f'[guest.vm1]\nmemory = "128MiB"\nlisten = "unix:{vm1_sock}"\nram_file = "{ram}"\n')
    host = daemons.host("--guests", str(inventory), "--ram-dir", str(shm / "open"), "--vm-ram-dirs", str(shm),
                        "--retention", "30s")
    vm1 = daemons.guest("vm1", "--connect", f"unix:{vm1_sock}", "--shared-ram", "--workload", "churn",
                        memory="128MiB")
    wait_for(lambda: (guest_json(host, "vm1").get("reclaimed_bytes") or 0) > 16 * MIB, 30,
             lambda: f"vm1 reclaiming through its file\n{vm1.tail()}\n{host.tail()}")
    record = guest_json(host, "vm1")
    assert record["provisioned"]["ram_file"] == str(ram) and record["connected"] is True
    assert os.path.getsize(ram) == MEMORY

    # a second process under vm1's id, on the shared listener: refused for good (exit 2), and vm1 goes on untouched
    thief = _thief(daemons)
    assert thief.returncode == 2 and "(auth-failed)" in thief.stderr, thief.stderr
    assert refusals(host) >= 1
    assert os.path.getsize(ram) == MEMORY
    assert value(vm1.metrics(), "balloon_guest_reconnects_total") == 0, vm1.tail()

    # vm1 gone (its agent killed): the thief tries again and still changes nothing
    vm1.kill(signal.SIGKILL)
    wait_for(lambda: guest_json(host, "vm1")["connected"] is False, 10, "vm1 disconnected")
    blocks = os.stat(ram).st_blocks
    failures = refusals(host)
    again = _thief(daemons)
    assert again.returncode == 2 and "(auth-failed)" in again.stderr, again.stderr
    assert refusals(host) == failures + 1
    assert os.path.getsize(ram) == MEMORY and os.stat(ram).st_blocks == blocks
    assert guest_json(host, "vm1")["connected"] is False
    assert not (shm / "open" / "vm1.ram").exists()  # no open-mode file was ever made under its id

    # vm1 comes back on its own listener and works again; its canaries never failed
    again = daemons.guest("vm1", "--connect", f"unix:{vm1_sock}", "--shared-ram", "--workload", "churn",
                          memory="128MiB")
    wait_for(lambda: guest_json(host, "vm1")["connected"] is True and
             value(again.metrics(), "balloon_guest_reported_bytes") > 0, 30, lambda: again.tail())
    assert value(again.metrics(), "balloon_guest_canary_failures_total") == 0, again.tail()

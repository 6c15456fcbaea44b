"""docs/OPERATIONS.md "Running locally", run as written (less `make install`: the venv exists;
the documented ports 9470/9471 swapped for free ones, the machine may be shared): the guest
shows up at the host, and the run leaves nothing in /dev/shm or /tmp."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest
from deployfiles import OPERATIONS, ROOT, daemons_available, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _local_run_block() -> str:
    section = OPERATIONS.read_text().split("## Running locally", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL).group(1)


def _port_free(port: int) -> bool:
    """Nothing listens there (TIME_WAIT leftovers of the run's curls do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_local_run_works_as_written_and_leaves_nothing_behind():
    reason = daemons_available()
    if reason:
        unavailable(f"daemons not runnable: {reason}")
    block = _local_run_block()
    assert "rm -rf \"$RUN\" \"$RAM\"" in block and "/dev/shm/" in block
    assert "9470" in block and "9471" in block
    host_port, guest_port = _free_port(), _free_port()
    script = "\n".join(line for line in block.splitlines() if not line.startswith("make install"))
    script = script.replace("9470", str(host_port)).replace("9471", str(guest_port))
    script += '\necho "made: $RUN $RAM"\n'
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=150, stdin=subprocess.DEVNULL)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert '"id": "g1"' in out or '"id":"g1"' in out, out
    assert re.search(r'^balloon_reported_bytes\{guest="g1"\}', out, flags=re.MULTILINE), out
    run_dir, ram_dir = re.search(r"^made: (\S+) (\S+)$", out, flags=re.MULTILINE).groups()
    assert ram_dir.startswith("/dev/shm/") and run_dir.startswith("/tmp/")
    for path in (run_dir, ram_dir):
        assert subprocess.run(["test", "-e", path]).returncode == 1, f"{path} left behind"
    assert _port_free(host_port) and _port_free(guest_port), "a daemon of the run is still listening"

"""README.md's commands, run literally, in order, the way a new user pastes them.

Every fenced ``sh`` block of README.md is run, in README order, as one bash script
(``set -e``: the first failing command fails the test) in a fresh folder holding only a
link to this checkout's ``.venv`` — the state right after ``make demo`` / ``make install``.
Conventions the README follows so that this is possible:

- a block preceded by ``<!-- readme-test: skip (why) -->`` is not run (``make test``
  would run this test again; ``make bench`` takes minutes);
- a daemon is started in the background with ``&`` and its log redirected, and a later
  block stops it with ``kill %N`` (job numbers, as in an interactive shell);
- nothing else runs until interrupted (``balloonctl top --iterations N``).

The README uses the default ports (9470, 9471) and the default socket
(``/run/balloon/host.sock`` as root), so the script runs in its own network and mount
namespaces (``unshare``, a private loopback and a tmpfs on /run): it cannot meet another
host on this machine. Without root (or unshare) it skips, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->[ \t]*\n)?```sh\n(.*?)```", re.S)
TIME_LIMIT_S = 240


def readme_blocks(text: str) -> list[tuple[bool, str]]:
    """(run it?, the block's text) for every ```sh block, in order."""
    return [(match.group(1) is None, match.group(2)) for match in BLOCK.finditer(text)]


def test_blocks_are_found_and_the_skip_marker_is_honoured():
    text = "a\n```sh\necho one\n```\n<!-- readme-test: skip (slow) -->\n```sh\nmake bench\n```\n```py\nx\n```\n"
    assert readme_blocks(text) == [(True, "echo one\n"), (False, "make bench\n")]
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert sum(run for run, _ in blocks) >= 3  # running it by hand, tools, stopping


def _isolation_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the README's commands use the default ports and socket, run in private namespaces"
    if not (shutil.which("unshare") and shutil.which("ip")):
        return "needs unshare and ip (util-linux, iproute2) for a private loopback and /run"
    probe = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "true"],
                           capture_output=True, timeout=10)
    if probe.returncode != 0:
        return f"unshare cannot make namespaces here: {probe.stderr.decode(errors='replace').strip()}"
    return None


@pytest.mark.slow
def test_every_readme_command_works_as_written(tmp_path):
    reason = _isolation_available()
    if reason:
        pytest.skip(reason)
    venv = ROOT / ".venv"
    if not (venv / "bin" / "activate").exists():
        pytest.skip("no .venv: run make install first")
    (tmp_path / ".venv").symlink_to(venv)
    commands = "".join(block for run, block in readme_blocks((ROOT / "README.md").read_text()) if run)
    script = tmp_path / "readme.sh"
    # the harness around the README's text: fail fast, show each command, stop leftovers
    script.write_text("set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + commands)
    inner = "ip link set lo up && mount -t tmpfs tmpfs /run && exec bash -x readme.sh"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("BALLOON_", "VIRTUAL_ENV", "COLUMNS"))}
    process = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "bash", "-c", inner],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the README's commands took more than {TIME_LIMIT_S}s:\n{output[-4000:]}")
    logs = "".join(f"\n--- {log.name}\n{log.read_text()[-1500:]}" for log in tmp_path.glob("*.log"))
    assert process.returncode == 0, f"a README command failed:\n{output[-6000:]}{logs}"
    assert "command not found" not in output
    assert re.search(r'^balloon_reported_bytes\{guest="g1"\} \d', output, re.M), output
    assert "g1: keeps 192MiB of 256MiB" in output
    assert "g1: target" in output  # balloonctl wait --for target
    assert "Traceback" not in output + logs
    assert (tmp_path / "load.json").exists()

"""The guest agent runs inside the guest whose memory it reclaims: it loads only what it uses.

``import guest_agent.cli`` (what ``balloon-guest`` runs) must not pull in the host's or the
tools' dependencies (pyproject's ``host`` and ``tools`` extras): no JIT, no tracker sets, no
terminal UI. Checked in a fresh interpreter, so nothing imported by the test run counts.
"""

from __future__ import annotations

import json
import subprocess
import sys

NOT_IN_THE_GUEST = ("numba", "llvmlite", "pyroaring", "rich", "hdrh", "host_daemon")


def test_guest_cli_imports_none_of_the_host_or_tool_dependencies():
    code = "import json, sys, guest_agent.cli; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert not loaded & set(NOT_IN_THE_GUEST), sorted(loaded & set(NOT_IN_THE_GUEST))
    assert {"msgpack", "numpy", "shared"} <= loaded  # and it did import the agent

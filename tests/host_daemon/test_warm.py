"""The first batch after a host start costs what the second guest's does: the kernels are
specialised for a session's argument types before any guest is welcomed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")


def test_the_first_guest_after_start_is_as_fast_as_the_second(tmp_path):
    probe = Path(__file__).with_name("warm_probe.py")
    done = subprocess.run([sys.executable, str(probe), str(tmp_path / "h.sock")],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["compiled"] and figures["batches"] == 10
    # nothing was specialised by a guest's batch: the warm-up called every kernel with these types
    assert figures["after"] == figures["warmed"], figures
    # and the cost shows it (compiling on the first batch made it ~1000x the second guest's)
    assert figures["first"] <= 20 * figures["second"], figures

"""A short `make chaos`: two host SIGKILLs (and a guest one) with canaries, inside make test."""

from __future__ import annotations

import pytest
from chaos import run


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_host_crashes_lose_no_page_and_converge():
    summary = run(["--crashes", "2", "--seed", "7", "--guests", "4", "--guest-kill-rate", "0.5"])
    assert summary.problems == []
    assert summary.crashes == 2
    assert summary.pages_checked > 10_000  # the canaries were really checked
    assert summary.pages_lost == 0

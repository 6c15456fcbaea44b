"""Fixtures of the protocol tests; the helpers themselves are in pairkit.py (importable)."""

from __future__ import annotations

import pytest
from pairkit import ConnectionPair


@pytest.fixture(scope="session")
def pair_factory():
    return ConnectionPair

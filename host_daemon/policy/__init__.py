"""Automatic balloon sizing: a pure policy core (no I/O, no clocks — ``now`` is passed in).

Each tick the host hands :class:`PolicyEngine` the host's memory state and one
:class:`GuestState` per guest; the engine returns one :class:`Decision` per guest: the
balloon size to ask for and why. The rules (``manual``, ``mom``, ``balance``) only
propose a size; the same safety rails then apply to every one of them (see
``engine.py``). The asyncio shell that reads the inputs and sends TARGETs lives in
``host_daemon/policy_driver.py``.
"""

from .blocker import BalloonBlocker
from .config import POLICIES, PolicyConfig, PolicyConfigError
from .engine import PolicyEngine
from .model import DIRECTIONS, REASONS, Decision, GuestState, HostMemory

__all__ = ["BalloonBlocker", "DIRECTIONS", "Decision", "GuestState", "HostMemory", "POLICIES",
           "PolicyConfig", "PolicyConfigError", "PolicyEngine", "REASONS"]

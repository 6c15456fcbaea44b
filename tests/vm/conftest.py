"""Real-VM tests: skipped, with the reason, where QEMU or the guest kernel cannot be had.

The smoke test runs in ``make test``; the rest only with ``BALLOON_VM_FULL=1`` (``make
vm-test``). ``BALLOON_VM=0`` skips them all. One VM at a time: each test owns its stack.
"""

from __future__ import annotations

import os

import pytest

from tests.vm import harness


def pytest_collection_modifyitems(config, items):
    vm_items = [item for item in items if "tests/vm/" in str(item.fspath).replace(os.sep, "/")]
    if not vm_items:
        return
    reason = "BALLOON_VM=0" if os.environ.get("BALLOON_VM") == "0" else harness.missing()
    for item in vm_items:
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"real VM unavailable: {reason}"))
        elif item.get_closest_marker("vm_full") and os.environ.get("BALLOON_VM_FULL") != "1":
            item.add_marker(pytest.mark.skip(reason="full real-VM suite: run `make vm-test`"))

"""Event loop choice, in one place (as uvicorn's ``loops/auto.py``).

uvloop when it is importable — it roughly halves the per-message cost of asyncio streams —
except when any listener is AF_VSOCK: uvloop (libuv) only knows AF_INET/AF_INET6/AF_UNIX
and refuses a vsock socket, so the stock loop carries every listener then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from shared.runtime.addresses import Address


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def loop_name(listen: Iterable[Address]) -> str:
    """``"uvloop"`` or ``"asyncio"`` for this set of listeners."""
    if any(address.kind == "vsock" for address in listen):
        return "asyncio"
    return "uvloop" if uvloop_available() else "asyncio"


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, int], name: str) -> int:
    """Run ``main`` to completion on the named loop and return its exit status."""
    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        return runner.run(main)

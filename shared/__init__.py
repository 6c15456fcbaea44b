"""Sans-IO core of the balloon-hints protocol (wire v1).

Nothing in this package touches sockets, event loops or clocks: callers feed bytes
in and take events out, or hand messages in and take bytes out, in the style of h11.
The protocol's names and limits are in :mod:`shared.vocabulary`.
What the daemons share besides the protocol (addresses, layered settings, the log format,
the admin token's location) is :mod:`shared.runtime`, which nothing here imports.
"""

from .vocabulary import PAGE_SIZE, PROTOCOL_VERSION

__all__ = ["PAGE_SIZE", "PROTOCOL_VERSION"]

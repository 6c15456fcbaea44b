"""Sans-IO core of the balloon-hints protocol (wire v1).

Nothing in this package touches sockets, event loops or clocks: callers feed bytes
in and take events out, or hand messages in and take bytes out, in the style of h11.
"""

PROTOCOL_VERSION = 1
PAGE_SIZE = 4096

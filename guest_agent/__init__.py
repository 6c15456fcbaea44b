"""balloon-guest: the guest side of balloon-hints — the balloon driver's part, in user space.

The agent owns a guest memory model (``guest_agent.memory``), reports free blocks the way
Linux's free page reporting does (mm/page_reporting.c), sizes a balloon when the host asks,
and streams all of it over a socket that stands in for the virtqueues.
"""

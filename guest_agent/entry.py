"""``balloon-guest`` and ``python -m guest_agent`` start here, before anything imports asyncio.

The agent runs inside the guest whose memory it reclaims and never speaks TLS (its channel is
a Unix socket, vsock, plain TCP or a virtio-serial port). asyncio imports ``ssl`` only when it
can (``try: import ssl except ImportError: ssl = None`` in asyncio/base_events.py, as on a
Python built without OpenSSL), and ``ssl`` maps libssl and libcrypto: ~4.5 MiB of the
agent's RSS. A ``None`` entry in ``sys.modules`` makes that import fail (the import system's
documented "import halted" marker), so they are never loaded. It is set only in this
process's entry point: code that imports ``guest_agent`` as a library (tests, the demo) keeps
``ssl``. The same reason keeps uvloop out of the guest (it needs ``ssl``): one connection's
traffic does not need it.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB,
mallopt(3) "M_MMAP_THRESHOLD": dynamic), so after the first kpageflags scan or pagemap read
the next large numpy buffers come from the heap and stay resident after they are freed: a real
guest's agent kept ~15 MiB of freed scan buffers. Setting the threshold once fixes it at its
default (128 KiB): large buffers are mapped and unmapped as they come and go.
"""

from __future__ import annotations

import sys

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD = 128 * 1024

#: ``ssl`` (asyncio's optional TLS) and ``_hashlib`` (hashlib's and hmac's optional OpenSSL
#: backend; numpy.random imports ``secrets`` → ``hmac``): both fall back or go without.
OPENSSL_MODULES = ("ssl", "_hashlib")


def fix_mmap_threshold() -> bool:
    """mallopt(M_MMAP_THRESHOLD, 128 KiB) where the C library has it (glibc); see the module doc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def main(argv=None) -> int:
    for name in OPENSSL_MODULES:
        sys.modules.setdefault(name, None)
    fix_mmap_threshold()
    from .cli import main as run

    return run(argv)

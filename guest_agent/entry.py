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
"""

from __future__ import annotations

import sys

#: ``ssl`` (asyncio's optional TLS) and ``_hashlib`` (hashlib's and hmac's optional OpenSSL
#: backend; numpy.random imports ``secrets`` → ``hmac``): both fall back or go without.
OPENSSL_MODULES = ("ssl", "_hashlib")


def main(argv=None) -> int:
    for name in OPENSSL_MODULES:
        sys.modules.setdefault(name, None)
    from .cli import main as run

    return run(argv)

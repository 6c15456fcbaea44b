"""numba's ``njit`` as the project uses it: compiled once, cached where a cache can live.

``cache=True`` makes numba write compiled code next to the source (``__pycache__``) or,
failing that, into a per-user cache; when neither is writable — a read-only image, a
systemd unit with ``ProtectSystem=strict`` — numba raises at import. Here the cache goes to
``NUMBA_CACHE_DIR`` when it is set, else next to the source when that is writable, else to
a private folder under the temporary directory, and compiling without a cache is the last
resort: the daemons must start wherever they are installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _cache_dir_ready() -> bool:
    """Make sure numba has somewhere to cache; False when nowhere is writable."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    if os.access(Path(__file__).resolve().parent.parent, os.W_OK):
        return True  # the source tree (an editable install, a checkout)
    fallback = Path(tempfile.gettempdir()) / f"balloon-hints-numba-{os.getuid()}"
    try:
        fallback.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return False
    if not os.access(fallback, os.W_OK):
        return False
    os.environ["NUMBA_CACHE_DIR"] = str(fallback)  # read by numba when it first caches
    return True


def cached_njit(switch: str, fallback: str):
    """numba's ``njit``, with ``cache=`` decided here; None when numba is not importable or
    the environment variable ``switch`` names the ``fallback`` implementation.

    Call sites keep numba's own syntax (``@njit(cache=True, nogil=True)``); the cache
    option is honoured only when a cache directory is usable.
    """
    if os.environ.get(switch, "").lower() == fallback:
        return None
    cache_ok = _cache_dir_ready()  # before numba reads its configuration
    try:
        from numba import njit
        from numba.core import config
    except ImportError:
        return None
    if cache_ok and os.environ.get("NUMBA_CACHE_DIR") and not config.CACHE_DIR:
        config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # numba was imported before us

    def njit_here(*args, cache: bool = False, **options):
        return njit(*args, cache=cache and cache_ok, **options)

    return njit_here

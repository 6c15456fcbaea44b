#!/usr/bin/env python3
"""Container health check: GET /healthz of whichever balloon daemon runs in this container.

Slim images carry no curl, so this uses the standard library. The URL comes from
BALLOON_HEALTHCHECK_URL when set, else from the daemons' own BALLOON_HOST_HTTP and
BALLOON_GUEST_HTTP settings (0.0.0.0 / :: mean "ask loopback"); the image sets both, and the
container is healthy when the daemon it runs answers 200. Exit 0 healthy, 1 not.
"""

import os
import sys
import urllib.request


def candidate_urls() -> list[str]:
    explicit = os.environ.get("BALLOON_HEALTHCHECK_URL")
    if explicit:
        return [explicit]
    urls = []
    for name in ("BALLOON_HOST_HTTP", "BALLOON_GUEST_HTTP"):
        address = os.environ.get(name)
        if not address:
            continue
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        urls.append(f"http://{host}:{port}/healthz")
    return urls


def main() -> int:
    for url in candidate_urls():
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                if response.status == 200:
                    return 0
        except OSError:
            continue
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Run by test_warm.py in a fresh interpreter (numba compiles per process): a host that has
just started and its first guest, then a second guest; prints
what each guest's batches cost and which kernel signatures the batches added, as JSON."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hostkit import ACK, DEFLATE, INFLATE, REPORT, REUSE, WELCOME, RawGuest  # noqa: E402

from host_daemon import pageset, tracker  # noqa: E402
from host_daemon.server import HostServer  # noqa: E402
from host_daemon.settings import HostSettings  # noqa: E402
from shared.runtime.addresses import Address  # noqa: E402

RANGES = [(0, 512), (4096, 5000), (20000, 3)]  # 5000 pages: an escaped count


def signatures() -> dict[str, int]:
    kernels = {"apply_batch": tracker.apply_batch, "set_runs": pageset.set_runs}
    return {name: len(getattr(k, "signatures", ())) for name, k in kernels.items()}


async def session(path: str, guest_id: str) -> None:
    guest = await RawGuest.connect(path)
    welcome = await guest.hello(guest_id, 1 << 16, ["ranges52"], timeout=60)
    assert welcome[0] == WELCOME, welcome
    for kind in (REPORT, INFLATE, DEFLATE, REPORT, REUSE) * 2:
        seq = await guest.batch(kind, RANGES)
        ack = await guest.recv_skip_pings()
        assert ack[0] == ACK and ack[1] == seq, ack
    await guest.close()


async def main(path: str) -> None:
    server = HostServer(HostSettings(listen=(Address("unix", path=path),), http=None))
    await server.start()
    try:
        await server.wait_warm()  # what /readyz waits for; connections are held until then
        warmed = signatures()
        await session(path, "first")
        await session(path, "second")
        guests = server.registry.guests
        print(json.dumps({"first": guests["first"].apply_seconds.sum, "second": guests["second"].apply_seconds.sum,
                          "batches": guests["first"].apply_seconds.count, "compiled": tracker._compiled,
                          "warmed": warmed, "after": signatures()}))
    finally:
        await server.stop(grace=1.0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

"""In-process hosts on real sockets (a Unix socket in tmp_path, TCP on 127.0.0.1:0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_daemon.server import HostServer
from host_daemon.settings import HostSettings
from shared.runtime.addresses import Address


@pytest.fixture
async def make_host(tmp_path: Path):
    """Factory: ``await make_host(window=4, ...)`` → a started HostServer with .unix / .tcp / .http."""
    hosts = []

    async def start(**overrides) -> HostServer:
        sock = tmp_path / f"host{len(hosts)}.sock"
        options = dict(listen=(Address("unix", path=str(sock)), Address("tcp", host="127.0.0.1", port=0)),
                       http=("127.0.0.1", 0), allow_open_tcp=True)  # loopback tests speak TCP unprovisioned
        options.update(overrides)
        server = HostServer(HostSettings(**options))
        await server.start()
        await server.wait_warm()
        hosts.append(server)
        units = [a for a in server.addresses if a.kind == "unix"]
        tcps = [a for a in server.addresses if a.kind == "tcp"]
        server.unix = units[0].path if units else None
        server.tcp = (tcps[0].host, tcps[0].port) if tcps else None
        if server.http_address:
            server.url = f"http://{server.http_address[0]}:{server.http_address[1]}"
        server.admin_headers = {"Authorization": f"Bearer {server.admin_token}"}  # for POST/PUT/DELETE
        return server

    yield start
    for server in hosts:
        await server.stop(grace=1.0)

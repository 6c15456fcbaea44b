"""The guest's HTTP endpoint: ``GET /metrics`` and ``GET /healthz`` on the agent's own event loop.

The agent runs inside the guest whose memory it reclaims, so it does not carry a web
framework (aiohttp was ~13 MiB of its RSS) for two read-only paths: this is a plain
``asyncio.start_server`` handler that reads one HTTP/1.x request head at a time, answers
GET and HEAD, and keeps the connection open for the next scrape unless the client says
``Connection: close`` (HTTP/1.0 closes by default, RFC 9112 §9.3). It never reads a request
body: a request that announces one is answered and the connection closed. Limits keep a
stray client from holding memory: a 64 KiB head (StreamReader's own line limit), 100
header lines, and a connection silent for ``IDLE_SECONDS`` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

IDLE_SECONDS = 30.0
MAX_HEADERS = 100
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           503: "Service Unavailable"}

#: path -> () -> (status, content type, body)
Routes = dict[str, Callable[[], tuple[int, str, bytes]]]


class HttpServer:
    """Serves ``routes`` (GET/HEAD only); after :func:`start`, ``port`` is the bound port."""

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None
        self.port = 0
        self._conns: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while await _one_request(self.routes, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError):
            pass  # a client that went away or sent garbage: nothing to answer
        finally:
            self._conns.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for writer in list(self._conns):  # idle keep-alive connections would hold wait_closed
            writer.close()
        with contextlib.suppress(Exception):
            await self.server.wait_closed()


async def start(routes: Routes, host: str, port: int) -> HttpServer:
    """Bind and serve; raises OSError (EADDRINUSE ...) like any listener."""
    http = HttpServer(routes)
    http.server = await asyncio.start_server(http._handle, host, port, reuse_address=True)
    sockets = http.server.sockets or ()
    http.port = sockets[0].getsockname()[1] if sockets else port
    return http


async def _one_request(routes: Routes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Answer one request; False when the connection is to be closed."""
    line = await asyncio.wait_for(reader.readline(), IDLE_SECONDS)
    if not line:
        return False
    parts = line.decode("latin-1").split()
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        header = await asyncio.wait_for(reader.readline(), IDLE_SECONDS)
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    else:
        await _respond(writer, 400, "text/plain", b"too many headers\n", close=True)
        return False
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        await _respond(writer, 400, "text/plain", b"bad request line\n", close=True)
        return False
    method, target, version = parts
    close = headers.get("connection") == "close" or (version == "HTTP/1.0" and headers.get("connection") != "keep-alive")
    if "content-length" in headers or "transfer-encoding" in headers:
        close = True  # a body we will not read: answer, then hang up rather than parse it as a request
    path = target.split("?", 1)[0]
    if path not in routes:
        status, kind, body = 404, "text/plain", b"not found\n"
    elif method not in ("GET", "HEAD"):
        status, kind, body = 405, "text/plain", b"GET or HEAD only\n"
    else:
        status, kind, body = routes[path]()
    await _respond(writer, status, kind, body, close=close, head=method == "HEAD")
    return not close


async def _respond(writer: asyncio.StreamWriter, status: int, kind: str, body: bytes, *, close: bool,
                   head: bool = False) -> None:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, '')}", f"Content-Type: {kind}",
             f"Content-Length: {len(body)}"]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    if close:
        lines.append("Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
    await writer.drain()

"""Listeners and lifecycle of the host daemon.

``HostServer`` opens every ``--listen`` address and the HTTP side, runs one ``Session``
per accepted connection, and on ``stop()`` (SIGTERM/SIGINT) stops accepting, lets each
session finish the batches it already read, sends BYE and closes — within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from shared.addresses import Address

from .admin import AdminApp
from .admission import Admitter, Peer
from .auth import GuestAuth, load_admin_token, load_guest_tokens
from .inventory import Inventory, InventoryError
from .metrics import HostStats, make_registry
from .registry import Registry
from .session import Session
from .settings import HostSettings

log = logging.getLogger("balloon.host")
SOCKET_MODE = 0o660
SHUTDOWN_GRACE = 3.0


class ListenError(RuntimeError):
    """A listener cannot be opened; the message says which and why."""


def prepare_unix_path(path: str) -> None:
    """Replace a stale socket file; refuse to touch anything that is not a socket or is live."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenError(f"unix:{path}: exists and is not a socket; refusing to delete it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody accepts on it: stale, left by a killed host
        return
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ListenError(f"unix:{path}: another process is listening on it")


def unix_socket(path: str) -> socket.socket:
    prepare_unix_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)  # before listen(): nobody can connect with looser modes
        sock.listen(1024)
    except OSError as error:
        sock.close()
        raise ListenError(f"unix:{path}: {error.strerror or error}") from None
    sock.setblocking(False)
    return sock


def vsock_socket(cid: int, port: int) -> socket.socket:
    if not hasattr(socket, "AF_VSOCK"):
        raise ListenError("vsock: this Python has no AF_VSOCK")
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as error:
        raise ListenError(f"vsock:{cid}:{port}: cannot create a vsock socket ({error.strerror or error}); "
                          "is the vsock module loaded?") from None
    try:
        sock.bind((cid, port))
        sock.listen(1024)
    except OSError as error:
        sock.close()
        raise ListenError(f"vsock:{cid}:{port}: {error.strerror or error}") from None
    sock.setblocking(False)
    return sock


def peer_of(writer: asyncio.StreamWriter, listener: Address, guest_id: str | None = None) -> Peer:
    """The host's own view of who connected (never what the guest claims)."""
    sock = writer.get_extra_info("socket")
    if listener.kind == "unix":
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            return Peer(listener, "unix", f"unix:{listener.path}#pid={pid},uid={uid}", guest_id, pid, uid, gid)
        except (OSError, AttributeError):
            return Peer(listener, "unix", f"unix:{listener.path}", guest_id)
    peer = writer.get_extra_info("peername")
    if listener.kind == "vsock" and peer:
        address = f"vsock:{peer[0]}:{peer[1]}"
    elif peer:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else peer[0]
        address = f"tcp:{host}:{peer[1]}"
    else:
        address = str(listener)
    return Peer(listener, listener.kind, address, guest_id)


def load_inventory(settings: HostSettings, tokens: dict[str, str] | None) -> Inventory:
    """``--guests`` (empty without it); InventoryError for a bad file or a clash with --token-file."""
    ram_dir = None if settings.ram_dir is None else Path(os.path.realpath(settings.ram_dir))
    inventory = Inventory.load(settings.guests, ram_dir) if settings.guests else Inventory(ram_dir=ram_dir)
    for entry in inventory:
        if tokens and entry.id in tokens:
            raise InventoryError(f"guest {entry.id} is in both --guests and --token-file; "
                                 "give its token in the inventory only")
        if entry.listen is not None and entry.listen in settings.listen:
            raise InventoryError(f"guest {entry.id}: listen {entry.listen} is also a shared --listen")
    return inventory


class HostServer:
    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings
        tokens = load_guest_tokens(settings.token_file) if settings.token_file else None
        self.inventory = load_inventory(settings, tokens)
        self.registry = Registry(settings.max_guests, settings.retention, settings.ram_dir,
                                 self.inventory, settings.forget_after)
        self.stats = HostStats()
        self.metrics_registry = make_registry(self)
        self.auth = GuestAuth(tokens, self.inventory, settings.allow_open_tcp, settings.max_guests > 0)
        self.admitter = Admitter(settings, self.registry, self.auth)
        self._guest_servers: dict[Address, tuple[asyncio.AbstractServer, Address]] = {}
        self.admin_token = load_admin_token(settings.admin_token_file) if settings.admin_token_file else None
        self.sessions: set[Session] = set()
        self.addresses: list[Address] = []  # as bound (TCP port 0 resolved)
        self.http_address: tuple[str, int] | None = None
        self.ready = False
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[tuple[str, int]] = []
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopped = asyncio.Event()
        self._stopping = False
        #: hole punching of large discards, off the event loop (see session.OFFLOAD_PAGES)
        self.discard_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="discard")

    async def start(self) -> None:
        settings = self.settings
        # Compile (or load from numba's cache) the codec and tracker kernels before the
        # first listener exists: done lazily, the first guest's HELLO would stall the loop
        # for up to seconds and other guests' handshakes could time out behind it.
        from shared import _kernels

        from . import pageset

        _kernels.warm_up()
        pageset.warm_up()
        if settings.ram_dir is not None:
            from .reclaim import RamDirError, validate_ram_dir

            try:
                settings.ram_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
                self.registry.ram_dir = validate_ram_dir(settings.ram_dir)
            except (OSError, RamDirError) as error:
                raise ListenError(f"--ram-dir: {error}") from None
            self.registry.adopt_orphan_files()
        try:
            for address in settings.listen:
                await self._listen(address)
            for entry in self.inventory:
                if entry.listen is not None:
                    await self.open_guest_listener(entry.listen, entry.id)
            if settings.http is not None:
                await self._start_http(*settings.http)
        except BaseException:
            await self._close_listeners()
            if self._runner is not None:
                await self._runner.cleanup()
            raise
        self.ready = True
        if settings.allow_open_tcp and any(a.kind == "tcp" for a in settings.listen):
            log.warning("--allow-open-tcp: anyone who reaches the TCP port may claim any unprovisioned "
                        "guest id; use the inventory's tokens outside demos and load tests")
        log.info("host ready", extra={
            "guests": len(self.inventory),
            "listen": ",".join(map(str, self.addresses)),
            "http": "off" if self.http_address is None else f"{self.http_address[0]}:{self.http_address[1]}",
            "window": settings.window, "max_ranges": settings.max_ranges,
            "ram_dir": str(settings.ram_dir) if settings.ram_dir else None})

    async def _listen(self, address: Address, guest_id: str | None = None) -> Address:
        """Open one listener; a ``guest_id`` binds it to that guest (whoever connects IS it)."""
        def handler(reader, writer, listener=address):
            return self._serve(reader, writer, listener, guest_id)

        limit = 2 * 65536
        if address.kind == "unix":
            sock = unix_socket(address.path)
            server = await asyncio.start_unix_server(handler, sock=sock, limit=limit)
            self._unix_paths.append((address.path, os.stat(address.path).st_ino))
            bound = address
        elif address.kind == "tcp":
            try:
                server = await asyncio.start_server(handler, address.host, address.port, limit=limit,
                                                    reuse_address=True, backlog=1024)
            except OSError as error:
                raise ListenError(f"{address}: {error.strerror or error}") from None
            port = server.sockets[0].getsockname()[1]
            bound = Address("tcp", host=address.host, port=port)
        else:
            sock = vsock_socket(address.cid, address.port)
            server = await asyncio.start_server(handler, sock=sock, limit=limit)
            bound = address
        if guest_id is None:
            self._servers.append(server)
            self.addresses.append(bound)
        else:
            self._guest_servers[address] = (server, bound)
        return bound

    async def open_guest_listener(self, address: Address, guest_id: str) -> Address:
        """A provisioned guest's own listener (at start, or after PUT /api/v1/guests/{id})."""
        if any(address == shared for shared in self.settings.listen):
            raise ListenError(f"{address} is a shared --listen address; a guest's listen must be its own")
        if address in self._guest_servers:
            raise ListenError(f"{address} is already a guest's listener")
        return await self._listen(address, guest_id)

    async def close_guest_listener(self, address: Address) -> None:
        """Stop accepting on a guest's own listener (DELETE, or a PUT that moved it)."""
        entry = self._guest_servers.pop(address, None)
        if entry is None:
            return
        server, _bound = entry
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 0.1)
        if address.kind == "unix":
            for path, inode in list(self._unix_paths):
                if path == address.path:
                    self._unix_paths.remove((path, inode))
                    with contextlib.suppress(OSError):
                        if os.stat(path).st_ino == inode:
                            os.unlink(path)

    async def _start_http(self, host: str, port: int) -> None:
        runner = web.AppRunner(AdminApp(self).app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as error:
            raise ListenError(f"--http {host}:{port}: {error.strerror or error}") from None
        sockname = site._server.sockets[0].getsockname()
        self.http_address = (sockname[0], sockname[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener: Address,
                     guest_id: str | None = None) -> None:
        if self._stopping:
            writer.transport.abort()
            return
        peer = peer_of(writer, listener, guest_id)
        session = Session(self, reader, writer, peer.address, listener.kind, peer)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    async def _close_listeners(self) -> None:
        for address in list(self._guest_servers):
            await self.close_guest_listener(address)
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 0.1)
        self._servers.clear()
        for path, inode in self._unix_paths:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:  # still ours, not a successor's
                    os.unlink(path)
        self._unix_paths.clear()

    def request_stop(self) -> None:
        """Signal handler: start the graceful stop once."""
        if not self._stopping:
            task = asyncio.get_running_loop().create_task(self.stop())
            self._tasks.add(task)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.ready = False
        log.info("host stopping", extra={"sessions": len(self.sessions)})
        # Stop accepting first (server.close() only closes the listening sockets in 3.11),
        for server in self._servers:
            server.close()
        for server, _bound in self._guest_servers.values():
            server.close()
        sessions = list(self.sessions)
        for session in sessions:
            session.stop()
        deadline = asyncio.get_running_loop().time() + grace
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for session in list(self.sessions):  # stuck writers (peers that do not read)
            session.writer.transport.abort()
            if session._reader_task is not None:
                session._reader_task.cancel()
        await self._close_listeners()
        if self._runner is not None:
            await self._runner.cleanup()
        self.discard_pool.shutdown(wait=True)
        self.registry.close()
        log.info("host stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

"""Listeners and lifecycle of the host daemon.

``HostServer`` opens every ``--listen`` address and the HTTP side and serves each accepted
connection with a ``GuestProtocol`` (host_daemon/connection.py). It holds what the
connections share: settings, the admitter, the registry, the worker pool for large
discards, and the caps on connections that have not said HELLO yet (in total and per
peer), so a flood of silent connections cannot lock guests out (nginx's ``limit_conn``).

``stop()`` (SIGTERM/SIGINT) stops accepting, asks every connection to finish what it read,
say BYE and close, waits for them up to the grace period, then aborts the rest.
Host-initiated messages (TARGET, HINT_START/STOP) go through ``set_target`` /
``start_hint`` / ``stop_hint``: the admin API and the policy call these, never a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.messages import HintStart, HintStop, Target
from shared.ranges import decode_ranges, encode_ranges
from shared.runtime.addresses import Address
from shared.runtime.admin_token import TokenFileError, admin_token_path, load_admin_token
from shared.vocabulary import DEFLATE, HINT, HINTING, INFLATE, REPORT, REUSE

from . import tracker
from .admin import AdminApp
from .admission import Admitter
from .auth import (
    GuestAuth,
    generate_admin_token,
    load_guest_tokens,
    remove_admin_token,
    write_admin_token,
)
from .connection import GuestProtocol
from .inventory import Inventory, InventoryError
from .listeners import ListenError, unix_socket, vsock_socket
from .metrics import HostStats, make_registry
from .policy_driver import PolicyDriver
from .reclaim import RamDirError, validate_ram_dir
from .registry import Registry
from .settings import HostSettings, policy_settings
from .vmms import VmmLinks

__all__ = ["HostServer"]

log = logging.getLogger("balloon.host")
SHUTDOWN_GRACE = 3.0


def load_inventory(settings: HostSettings, tokens: dict[str, str] | None) -> Inventory:
    """``--guests`` (empty without it); InventoryError for a bad file or a clash with --token-file."""
    ram_dir = None if settings.ram_dir is None else Path(os.path.realpath(settings.ram_dir))
    vm_ram_dirs = settings.vm_ram_dirs
    inventory = (Inventory.load(settings.guests, ram_dir, vm_ram_dirs) if settings.guests
                 else Inventory(ram_dir=ram_dir, vm_ram_dirs=vm_ram_dirs))
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
        # Admin calls that change something always need this token (auth module docstring).
        if settings.admin_token_file:
            self.admin_token = load_admin_token(settings.admin_token_file)
            self.admin_token_where = f"the token in the host's --admin-token-file {settings.admin_token_file}"
        else:
            self.admin_token = generate_admin_token()
            self.admin_token_where = "the host generated it at start and keeps it in memory"
        self._token_file: tuple[Path, int] | None = None  # (path, inode) of the generated token's file
        self.connections: set[GuestProtocol] = set()
        self.addresses: list[Address] = []  # as bound (TCP port 0 resolved)
        self.http_address: tuple[str, int] | None = None
        self.ready = False
        self.handshaking = 0  # connections that have not said HELLO yet
        self.max_handshakes = settings.max_handshakes  # bounded by the fd limit at start
        self.max_handshakes_per_peer = settings.max_handshakes_per_peer
        self._handshaking_by_peer: dict[str, int] = {}
        self._servers: dict[Address, asyncio.AbstractServer] = {}  # shared and per-guest listeners
        self._guest_listeners: set[Address] = set()
        self._unix_paths: dict[Address, int] = {}  # inode, so we never unlink a successor's socket
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopped = asyncio.Event()
        self._drained = asyncio.Event()
        self._stopping = False
        self.warm: asyncio.Future | None = None  # the kernels are loaded (see start)
        #: hole punching of large discards, off the event loop (guest_session.OFFLOAD_PAGES)
        self.discard_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="discard")
        self.policy = PolicyDriver(self, *policy_settings(settings))  # automatic sizing (--policy)
        self.vmms = VmmLinks(self)  # one QMP link per inventory entry with qmp
        self.registry.after_release = self.vmms.after_release

    async def start(self) -> None:
        settings = self.settings
        self._bound_handshake_caps(_raise_fd_limit())
        if settings.ram_dir is not None:
            try:
                settings.ram_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
                self.registry.ram_dir = validate_ram_dir(settings.ram_dir)
            except (OSError, RamDirError) as error:
                raise ListenError(f"--ram-dir: {error}") from None
            self.registry.adopt_orphan_files()
        try:
            for address in settings.listen:
                self.addresses.append(await self._listen(address))
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
        self.vmms.start()
        self.policy.start()
        # The tracker's compiled kernels load off the loop (numba: ~0.5 s from its cache, seconds
        # cold), so the host listens at once; connections accepted meanwhile wait, unread.
        self.warm = asyncio.get_running_loop().run_in_executor(None, _load_kernels)
        self.warm.add_done_callback(self._warmed)
        if settings.allow_open_tcp and any(a.kind == "tcp" for a in settings.listen):
            log.warning("--allow-open-tcp: anyone who reaches the TCP port may claim any unprovisioned "
                        "guest id; use the inventory's tokens outside demos and load tests")
        log.info("host ready", extra={
            "guests": len(self.inventory),
            "listen": ",".join(map(str, self.addresses)),
            "http": "off" if self.http_address is None else f"{self.http_address[0]}:{self.http_address[1]}",
            "window": settings.window, "max_ranges": settings.max_ranges, "backlog": settings.backlog,
            "ram_dir": str(settings.ram_dir) if settings.ram_dir else None})

    def _warmed(self, future: asyncio.Future) -> None:
        """/readyz turns 200 once the kernels are loaded (connections were held until then)."""
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:  # the first batch loads them again (or runs them interpreted)
            log.error("cannot load the tracker kernels", extra={"error": f"{type(error).__name__}: {error}"})
        if not self._stopping:
            self.ready = True
            compiled = error is None and future.result()
            log.info("host warm", extra={"kernels": "compiled" if compiled else "interpreted"})

    # -- listeners ----------------------------------------------------------------------

    async def _listen(self, address: Address, guest_id: str | None = None) -> Address:
        loop = asyncio.get_running_loop()
        backlog = self.settings.backlog

        def factory(listener=address):
            return GuestProtocol(self, listener, guest_id)

        if address.kind == "unix":
            sock = unix_socket(address.path, backlog)
            try:
                server = await loop.create_unix_server(factory, sock=sock, backlog=backlog)
            except BaseException:
                sock.close()
                raise
            self._unix_paths[address] = os.stat(address.path).st_ino
            bound = address
        elif address.kind == "tcp":
            try:
                server = await loop.create_server(factory, address.host, address.port,
                                                  reuse_address=True, backlog=backlog)
            except OSError as error:
                raise ListenError(f"{address}: {error.strerror or error}") from None
            port = server.sockets[0].getsockname()[1]
            bound = Address("tcp", host=address.host, port=port)
        else:
            sock = vsock_socket(address.cid, address.port, backlog)
            server = await loop.create_server(factory, sock=sock, backlog=backlog)
            bound = address
        self._servers[address] = server
        return bound

    async def open_guest_listener(self, address: Address, guest_id: str) -> Address:
        """A provisioned guest's own listener (at start, or after PUT /api/v1/guests/{id}):
        whoever connects here is ``guest_id`` (Peer.guest_id)."""
        if self._stopping:
            raise ListenError(f"{address}: the host is stopping")
        if address in self.settings.listen:
            raise ListenError(f"{address} is a shared --listen address; a guest's listen must be its own")
        if address in self._guest_listeners:
            raise ListenError(f"{address} is already a guest's listener")
        bound = await self._listen(address, guest_id)
        self._guest_listeners.add(address)
        return bound

    async def close_guest_listener(self, address: Address) -> None:
        """Stop accepting on a guest's own listener (DELETE, or a PUT that moved it);
        sessions that came through it go on."""
        if address not in self._guest_listeners:
            return
        self._guest_listeners.discard(address)
        server = self._servers.pop(address)
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 0.1)
        self._unlink(address)

    def _unlink(self, address: Address) -> None:
        inode = self._unix_paths.pop(address, None)
        if inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(address.path).st_ino == inode:  # still ours, not a successor's
                    os.unlink(address.path)

    async def _start_http(self, host: str, port: int) -> None:
        runner = web.AppRunner(AdminApp(self).app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as error:
            raise ListenError(f"--http {host}:{port}: {error.strerror or error}") from None
        sockname = runner.addresses[0]
        self.http_address = (sockname[0], sockname[1])
        self._write_admin_token(sockname[1])

    def _write_admin_token(self, port: int) -> None:
        """Put the generated token where balloonctl looks for it (shared.runtime.admin_token)."""
        settings = self.settings
        if settings.admin_token_file or settings.admin_token_dir is None:
            return
        path = admin_token_path(port, settings.admin_token_dir)
        try:
            inode = write_admin_token(path, self.admin_token)
        except TokenFileError as error:
            raise ListenError(f"admin token: {error}") from None
        self._token_file = (path, inode)
        self.admin_token_where = f"the host wrote it to {path}, where balloonctl finds it by itself"
        log.info("admin token written", extra={"file": str(path)})

    async def _close_listeners(self) -> None:
        servers = list(self._servers.values())
        for server in servers:
            server.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 0.1)
        for address in list(self._servers):
            self._unlink(address)
        self._servers.clear()
        self._guest_listeners.clear()
        for address in list(self._unix_paths):
            self._unlink(address)
        if self._token_file is not None:
            remove_admin_token(*self._token_file)
            self._token_file = None

    def _bound_handshake_caps(self, fd_limit: int | None) -> None:
        """Keep the pre-HELLO caps under the descriptor limit: a flood that reaches EMFILE
        first would lock every guest out before any cap refuses it (a quarter of the fds for
        connections without HELLO, three quarters of that per peer)."""
        settings = self.settings
        total, per_peer = settings.max_handshakes, settings.max_handshakes_per_peer
        if fd_limit is not None and total > fd_limit // 4:
            total = max(1, fd_limit // 4)
            per_peer = min(per_peer, max(1, total * 3 // 4))
            log.warning("handshake caps bounded by the descriptor limit", extra={
                "fd_limit": fd_limit, "max_handshakes": total, "max_handshakes_per_peer": per_peer})
        self.max_handshakes, self.max_handshakes_per_peer = total, per_peer

    # -- connections (called by GuestProtocol) ------------------------------------------

    def connection_opened(self, connection: GuestProtocol) -> RemoteProtocolError | None:
        """Count a new connection against the pre-HELLO caps; the error to refuse it with."""
        if self._stopping:
            connection.abort()
            return None
        self.connections.add(connection)
        self._drained.clear()
        key = connection.session.peer.key
        by_peer = self._handshaking_by_peer.get(key, 0)
        if self.handshaking >= self.max_handshakes:
            return RemoteProtocolError(
                "too-many-connections", f"the host has {self.handshaking} connections without HELLO")
        if by_peer >= self.max_handshakes_per_peer:
            return RemoteProtocolError(
                "too-many-connections", f"{key} has {by_peer} connections without HELLO")
        self.handshaking += 1
        self._handshaking_by_peer[key] = by_peer + 1
        connection.pre_hello = True
        return None

    def handshake_done(self, connection: GuestProtocol) -> None:
        """The connection said HELLO (admitted or not) or ended: it no longer counts."""
        if not connection.pre_hello:
            return
        connection.pre_hello = False
        self.handshaking -= 1
        key = connection.session.peer.key
        left = self._handshaking_by_peer[key] - 1
        if left:
            self._handshaking_by_peer[key] = left
        else:
            del self._handshaking_by_peer[key]

    def connection_closed(self, connection: GuestProtocol) -> None:
        self.handshake_done(connection)
        self.connections.discard(connection)
        if not self.connections:
            self._drained.set()

    # -- host-initiated messages --------------------------------------------------------

    def set_target(self, guest_id: str, pages: int) -> bool:
        """Remember the balloon target of ``guest_id`` and send TARGET if it is connected.

        True when the message went out now; otherwise the next session gets it after WELCOME.
        KeyError for an unknown guest; the caller checks ``pages`` against the guest's size.
        """
        record = self.registry.guests[guest_id]
        record.target_pages = pages
        if record.driver == "virtio-balloon":  # a stock guest: QEMU's own balloon, through QMP
            self.vmms.set_balloon(record, pages)
            log.info("balloon target set", extra={"guest": guest_id, "target_pages": pages, "driver": record.driver})
            return record.reachable
        queued = self._send(record, Target(pages))
        log.info("balloon target set", extra={"guest": guest_id, "target_pages": pages, "queued": queued})
        return queued

    def start_hint(self, guest_id: str) -> int | None:
        """Start a free page hinting command; its cmd_id, or None if the guest cannot hint now."""
        record = self.registry.guests[guest_id]
        if record.connection is None or HINTING not in record.features:
            return None
        cmd_id = record.next_cmd_id
        record.next_cmd_id = cmd_id % 0xFFFFFFFF + 1
        record.tracker.set_hint_command(cmd_id)
        return cmd_id if self._send(record, HintStart(cmd_id)) else None

    def stop_hint(self, guest_id: str) -> bool:
        """End the current hinting command (later hints for it are stale)."""
        record = self.registry.guests[guest_id]
        cmd_id = record.tracker.hint_command
        if cmd_id is None:
            return False
        record.tracker.set_hint_command(None)
        return self._send(record, HintStop(cmd_id))

    @staticmethod
    def _send(record, message) -> bool:
        connection = record.connection
        if connection is None:
            return False
        try:
            return connection.send(message)
        except LocalProtocolError:
            return False  # the session is closing; the next one starts from the record

    # -- stopping -----------------------------------------------------------------------

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
        log.info("host stopping", extra={"sessions": len(self.connections)})
        await self.policy.stop()
        await self.vmms.stop()
        for server in self._servers.values():  # stop accepting first
            server.close()
        for connection in list(self.connections):
            connection.shutdown()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for connection in list(self.connections):  # peers that do not read what we wrote
            connection.abort()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), 1.0)
        await self._close_listeners()
        if self._runner is not None:
            await self._runner.cleanup()
        self.discard_pool.shutdown(wait=True)
        self.registry.close()
        log.info("host stopped")
        self._stopped.set()

    async def wait_warm(self) -> None:
        """Until the kernels are loaded and /readyz says 200 (tests and embedders)."""
        if self.warm is not None:
            await asyncio.shield(self.warm)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _load_kernels() -> bool:
    """Load the tracker's kernels and call each once with the argument types a session's
    batches have (decoded payloads, every kind, an escaped range): numba specialises on the
    first call, so loading alone left ~0.3 s on the event loop for the first guest's first
    batch. Connections wait for this (connection.py holds them unread), so no guest is
    welcomed whose first batch would compile."""
    if not tracker.load_kernels():
        return False  # interpreted: nothing to specialise
    probe = tracker.GuestTracker(1 << 14)
    pfns, counts = decode_ranges(encode_ranges([0, 1024, 9000], [512, 5000, 1]))  # 5000 pages: an escape
    for kind in (REPORT, INFLATE, DEFLATE, REPORT, REUSE):
        probe.apply(kind, pfns, counts)
    probe.set_hint_command(1)
    probe.apply(HINT, pfns, counts, 1)
    for view in (probe.reported, probe.inflated, probe.hinted):
        view.as_ranges()
    return True


def _raise_fd_limit() -> int | None:
    """Soft RLIMIT_NOFILE up to the hard limit (every guest and handshake is one descriptor);
    returns the soft limit now in force (None: unlimited or unknown)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft

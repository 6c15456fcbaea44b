"""The byte streams a guest agent talks over: sockets, and a VM's virtio-serial port.

Sockets (``unix:``, ``tcp:``, ``vsock:``) are asyncio streams, one connection per session.

A virtio-serial port (``serial:/dev/virtio-ports/NAME``) is a character device
(drivers/char/virtio_console.c) whose host end is QEMU's chardev, connected to the host
daemon's Unix listener (``-chardev socket,server=off,reconnect=1``). Its rules, as the
driver implements them and as measured on this project's VMs (docs/OPERATIONS.md):

* opening or closing the device does not open or close the host's connection: the stream
  outlives the agent, so a new agent may find the host in the middle of an old session;
* a ``read`` returns 0 when no data is buffered and the host side is not connected
  (``port_fops_read``: ``!port->host_connected``) — that is the end of a session;
* a write blocks (``EAGAIN`` non-blocking) while the host is not connected, and ``poll``
  reports ``POLLOUT`` only once it is (``will_write_block``), while ``POLLHUP`` stays set
  for as long as it is not — so the agent waits for the host by polling, never by a
  selector that would wake on ``POLLHUP`` in a loop;
* QEMU redials about a second after the host closed (``reconnect=1``).

How a session starts cleanly on such a stream is the protocol's business
(docs/PROTOCOL.md §1.1): :func:`resync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import stat

from shared.runtime.addresses import Address

READ_CHUNK = 256 * 1024
#: How often a serial port is polled while its host end is not connected.
HOST_POLL_SECONDS = 0.05
#: Bytes that can never start a msgpack object (0xc1 is "never used" in the spec), written
#: to break a host parser out of a message an earlier agent left half written.
RESYNC_FILL = b"\xc1" * 4096


async def open_stream(address: Address):
    """(reader, writer) for a unix:, tcp: or vsock: address."""
    if address.kind == "unix":
        return await asyncio.open_unix_connection(address.path, limit=READ_CHUNK)
    if address.kind == "tcp":
        return await asyncio.open_connection(address.host, address.port, limit=READ_CHUNK)
    if address.kind != "vsock":
        raise ValueError(f"{address}: not a socket address")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (address.cid, address.port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=READ_CHUNK)


class SerialPort:
    """A virtio-serial port, opened once and kept for the agent's life.

    Sessions come and go on the same descriptor (the host restarts, QEMU redials); each
    one gets a :class:`SerialStream` from :meth:`connect`."""

    def __init__(self, path: str | None = None, fd: int | None = None) -> None:
        self.path = path
        self.fd = fd

    def open(self) -> int:
        if self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.ENODEV, f"{self.path} is not a character device (a virtio-serial port)")
            self.fd = fd
        return self.fd

    def host_connected(self) -> bool:
        """Can we write, i.e. is QEMU's end connected to a host right now?"""
        poller = select.poll()
        poller.register(self.open(), select.POLLOUT)
        events = dict(poller.poll(0)).get(self.fd, 0)
        return bool(events & select.POLLOUT) and not events & (select.POLLHUP | select.POLLERR)

    async def connect(self, stop: asyncio.Event | None = None) -> SerialStream:
        """Wait (polling) until the host end is connected; the stream for one session."""
        while not self.host_connected():
            if stop is not None and stop.is_set():
                raise EOFError("stopped while waiting for the host")
            await asyncio.sleep(HOST_POLL_SECONDS)
        return SerialStream(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SerialStream:
    """One session on a serial port's descriptor: the reader *and* writer API the client
    uses with asyncio streams (``read``, ``write``, ``drain``, ``close``, ``wait_closed``).

    A read of 0 bytes ends the stream for good (``at_eof``); the descriptor stays open
    for the next session."""

    def __init__(self, fd: int, high_water: int = 256 * 1024) -> None:
        self.fd = fd
        self.high_water = high_water
        self.at_eof = False
        self._loop = asyncio.get_running_loop()
        self._out = bytearray()
        self._readable: asyncio.Future | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self._writing = False
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self.error: OSError | None = None

    # -- reading ------------------------------------------------------------------------

    async def read(self, n: int = READ_CHUNK) -> bytes:
        """Up to ``n`` bytes; b"" once the host end has gone (EOF)."""
        while not self.at_eof and not self._closed:
            try:
                data = os.read(self.fd, n)
            except BlockingIOError:
                data = None
            except OSError as error:  # the port was unplugged
                self.error = error
                data = b""
            if data is not None:
                if not data:
                    self.at_eof = True
                return data
            self._readable = self._loop.create_future()
            self._loop.add_reader(self.fd, self._wake_reader)
            try:
                await self._readable
            finally:
                self._loop.remove_reader(self.fd)
                self._readable = None
        return b""

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    # -- writing ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closed or self.at_eof:
            return  # the session is over; the client notices on its next read
        self._out += data
        self._drained.clear()
        self._flush()

    def _flush(self) -> None:
        self._retry = None
        while self._out:
            try:
                sent = os.write(self.fd, self._out)
            except BlockingIOError:
                sent = -1
            except OSError as error:
                self.error = error
                self._out.clear()
                break
            if sent <= 0:
                self._wait_writable()
                return
            del self._out[:sent]
        self._stop_writing()
        self._drained.set()

    def _wait_writable(self) -> None:
        # A selector wakes a writer on POLLHUP too, which a disconnected port reports all
        # the time: register only while the host is there, otherwise poll on a timer.
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        events = dict(poller.poll(0)).get(self.fd, 0)
        if events & select.POLLHUP:
            self._stop_writing()
            self._retry = self._loop.call_later(HOST_POLL_SECONDS, self._flush)
        elif not self._writing:
            self._loop.add_writer(self.fd, self._flush)
            self._writing = True

    def _stop_writing(self) -> None:
        if self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False

    async def drain(self) -> None:
        if len(self._out) > 0:
            await self._drained.wait()

    @property
    def buffered(self) -> int:
        return len(self._out)

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """End this session's use of the descriptor (unsent bytes are dropped)."""
        if self._closed:
            return
        self._closed = True
        self._stop_writing()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._out.clear()
        self._drained.set()
        self._wake_reader()

    async def wait_closed(self) -> None:
        return None


async def resync(stream: SerialStream, bye: bytes, *, settle: float = 0.0, bye_wait: float = 1.0,
                 fill_limit: int = 2 << 20, fill_wait: float = 5.0) -> str:
    """End whatever session the host still runs on this stream; returns how it ended.

    A new agent cannot know where the host is in the byte stream (docs/PROTOCOL.md §1.1):
    in the middle of an old session, inside a message an earlier agent left half
    written, or idle. Everything the host sends is discarded until the host closes, which
    QEMU shows as EOF:

    1. ``settle`` seconds of waiting first (a host that already said BYE closes by itself);
    2. then BYE, which every host state accepts and answers by closing ("bye");
    3. if no EOF follows within ``bye_wait``, 0xC1 bytes — never valid msgpack — until the
       host closes ("fill"): a parser inside a half-written message takes at most its
       maximum message size of them before it errors out; at most ``fill_limit`` bytes.

    Raises TimeoutError when the host never closes.
    """
    reading = asyncio.create_task(_discard_until_eof(stream))
    try:
        if settle > 0 and await _eof_within(reading, settle):
            return "settled"
        stream.write(bye)
        await stream.drain()
        if await _eof_within(reading, bye_wait):
            return "bye"
        sent = 0
        while sent < fill_limit:
            stream.write(RESYNC_FILL)
            sent += len(RESYNC_FILL)
            await stream.drain()
            if reading.done():
                return "fill"
        if await _eof_within(reading, fill_wait):
            return "fill"
        raise TimeoutError(f"the host did not close the stream after BYE and {sent} fill bytes")
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


async def _discard_until_eof(stream: SerialStream) -> None:
    while await stream.read(READ_CHUNK):
        pass


async def _eof_within(reading: asyncio.Task, seconds: float) -> bool:
    done, _ = await asyncio.wait({reading}, timeout=seconds)
    return bool(done)

"""Listening sockets made by the host itself, so the backlog it asks for is the one it gets.

asyncio's ``start_unix_server`` (and ``create_*_server`` without ``backlog=``) call
``listen(100)`` on the socket again, whatever it was listening with; a herd of guests
reconnecting after a host restart then gets ``EAGAIN``. Unix and vsock listeners are bound and
listened on here with ``--backlog`` and handed to the loop with the same value; TCP ones
are made by ``loop.create_server(..., backlog=)`` (several sockets for a name).
"""

from __future__ import annotations

import os
import socket
import stat

SOCKET_MODE = 0o660
DEFAULT_BACKLOG = 1024


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
    except OSError:  # refused / gone: nobody accepts on it, stale (left by a killed host)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ListenError(f"unix:{path}: another process is listening on it")


def unix_socket(path: str, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    prepare_unix_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)  # before listen(): nobody can connect with looser modes
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise ListenError(f"unix:{path}: {error.strerror or error}") from None
    sock.setblocking(False)
    return sock


def vsock_socket(cid: int, port: int, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    if not hasattr(socket, "AF_VSOCK"):
        raise ListenError("vsock: this Python has no AF_VSOCK")
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as error:
        raise ListenError(f"vsock:{cid}:{port}: cannot create a vsock socket ({error.strerror or error}); "
                          "is the vsock module loaded?") from None
    try:
        sock.bind((cid, port))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise ListenError(f"vsock:{cid}:{port}: {error.strerror or error}") from None
    sock.setblocking(False)
    return sock

"""Who a connection is, and who may call the admin API: the host's side decides, never HELLO alone.

A guest's id labels its metrics, its tracker and its RAM file, so a guest must not be able
to take another's id. In this order (``GuestAuth.identify``):

1. **A per-guest listener** (inventory ``listen``): whoever connects there IS that guest,
   as a VM's virtio device belongs to that VM. HELLO must name it (else ``auth-failed``).
2. **A provisioned id on a shared listener** (``--listen``) must prove itself with its
   inventory ``token`` (any transport) or its ``uid`` (Unix peer credentials,
   SO_PEERCRED); otherwise ``auth-failed``. An entry with neither is reachable only on its
   own listener, so nobody else can ever take it over, even while it is disconnected.
3. **A Unix peer whose uid the inventory maps to a guest** is that guest only: its HELLO
   for any other id is ``auth-failed``.
4. **Open mode**, any other id: Unix and vsock listeners admit it (the socket file's 0660
   mode or the VM boundary is the gate); TCP only with a ``--token-file`` token or with
   ``--allow-open-tcp``. A ``--token-file`` guest must send its token on any transport.
   What an open guest may cost is capped elsewhere (``--max-guest-memory``,
   ``--max-guests``, ``--retention``); it can never touch a provisioned guest.

Tokens are compared with ``hmac.compare_digest`` so the time taken says nothing about how
much of a guess was right.

**The admin token.** Every admin call that changes something (POST, PUT, DELETE) carries
``Authorization: Bearer <token>`` — always, there is no unauthenticated mode: those calls
provision guests and so aim the hole punch. The token is the first non-comment line of
``--admin-token-file`` when given; otherwise the host generates one at every start and
writes it, mode 0600, to ``--admin-token-dir``/admin-PORT.token (PORT: the --http port),
by default beside the default socket (``/run/balloon`` as root) — as Jupyter writes its
server token to its runtime directory. Whoever can read that file (the host's user, root)
may change things; balloonctl finds it by the same rule (shared/runtime/admin_token.py).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from shared.errors import RemoteProtocolError
from shared.messages import valid_guest_id
from shared.runtime.admin_token import TokenFileError

from .inventory import Inventory


def load_guest_tokens(path: Path) -> dict[str, str]:
    tokens: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenFileError(f"cannot read token file {path}: {error}") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenFileError(f"{path}:{number}: expected 'guest-id token'")
        guest, token = parts
        if not valid_guest_id(guest):
            raise TokenFileError(f"{path}:{number}: {guest!r} is not a valid guest id")
        if guest in tokens:
            raise TokenFileError(f"{path}:{number}: guest {guest!r} is listed twice")
        if len(token) < 8:
            raise TokenFileError(f"{path}:{number}: the token of {guest!r} is shorter than 8 characters")
        tokens[guest] = token
    return tokens


def generate_admin_token() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def write_admin_token(path: Path, token: str) -> int:
    """Write ``token`` to ``path`` readable by this user only; returns the file's inode.

    The directory is created (0750) if missing and must belong to this user (or root) and
    be writable by nobody else — else another user could replace the file. The file is
    made fresh (O_EXCL, O_NOFOLLOW, 0600) and renamed into place, so it is never readable
    by others, not even for a moment, and a stale file of an earlier run is replaced."""
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        info = os.stat(directory, follow_symlinks=False)
    except OSError as error:
        raise TokenFileError(f"cannot create {directory} for the admin token: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise TokenFileError(f"{directory} is not a directory (a symlink?); the admin token needs a real one")
    if info.st_uid not in (os.geteuid(), 0) or info.st_mode & 0o022:
        raise TokenFileError(f"{directory} belongs to uid {info.st_uid} with mode {info.st_mode & 0o777:o}: "
                             "another user could replace the admin token there; give --admin-token-dir a "
                             "directory only this user can write")
    temporary = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, (token + "\n").encode())
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise TokenFileError(f"cannot write the admin token to {path}: {error.strerror}") from None
    return inode


def remove_admin_token(path: Path, inode: int) -> None:
    """Delete the token file at stop, if it is still the one this host wrote."""
    with contextlib.suppress(OSError):
        if os.stat(path, follow_symlinks=False).st_ino == inode:
            os.unlink(path)


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison; ``None`` (no token sent) never matches."""
    if given is None:
        hmac.compare_digest(expected.encode(), expected.encode())  # same work either way
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


class GuestAuth:
    """Decides which guest a HELLO on a given connection is (see the module docstring)."""

    def __init__(self, tokens: dict[str, str] | None, inventory=None, allow_open_tcp: bool = False,
                 open_mode: bool = True) -> None:
        self.tokens = tokens
        self.inventory = Inventory() if inventory is None else inventory
        self.allow_open_tcp = allow_open_tcp
        self.open_mode = open_mode

    def identify(self, guest: str, token: str | None, transport: str,
                 listener_guest: str | None = None, uid: int | None = None):
        """The inventory entry this connection proves, None for an open-mode guest.

        Raises RemoteProtocolError ``auth-failed`` (the detail never echoes a token)."""
        inventory = self.inventory
        if listener_guest is not None:
            entry = inventory.get(listener_guest)
            if guest != listener_guest:
                raise _refuse(f"this listener belongs to guest {listener_guest!r}; HELLO named {guest!r}")
            if entry is None:
                raise _refuse(f"guest {guest!r} is no longer provisioned")
            return entry
        peer_uid = uid if transport == "unix" else None
        entry = inventory.get(guest)
        if entry is not None:
            by_token = entry.token is not None and same_secret(token, entry.token)
            by_uid = entry.uid is not None and peer_uid == entry.uid
            if by_token or by_uid:
                return entry
            ways = [way for way, present in (("its token", entry.token), ("its uid", entry.uid is not None),
                                             ("its own listener", entry.listen)) if present]
            raise _refuse(f"guest {guest!r} is provisioned: it must connect with {' or '.join(ways) or 'its own listener'}")
        mapped = inventory.by_uid(peer_uid)
        if mapped is not None:
            raise _refuse(f"unix uid {peer_uid} is guest {mapped.id!r}; it cannot claim {guest!r}")
        if not self.open_mode:
            raise _refuse(f"guest {guest!r} is not provisioned and this host admits provisioned guests only")
        expected = None if self.tokens is None else self.tokens.get(guest)
        if expected is not None:
            if not same_secret(token, expected):
                raise _refuse(f"guest {guest!r} did not prove its id")
            return None
        if transport == "tcp" and not self.allow_open_tcp:
            raise _refuse(f"guest {guest!r} is not provisioned; TCP guests need a token "
                          "(--guests or --token-file) unless the host runs with --allow-open-tcp")
        return None

    def admits(self, guest: str, token: str | None, transport: str) -> bool:
        """Compatibility wrapper: may this HELLO claim ``guest`` on a shared listener?"""
        try:
            self.identify(guest, token, transport)
        except RemoteProtocolError:
            return False
        return True


def _refuse(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError("auth-failed", detail)

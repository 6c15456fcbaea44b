"""Guest and admin secrets.

Identity policy (DESIGN §4 invariant 5): a guest's id is the label used for its metrics,
its tracker and its RAM file, so a guest must not be able to take another's id.

- ``--token-file``: one ``guest-id token`` per line, ``#`` comments. A guest listed there
  must send the token in HELLO, whatever the transport; on TCP (reachable from anywhere
  the port is) every guest must be listed. Unix and vsock guests that are not listed are
  admitted: for them the socket file's mode (0660) or the VM boundary is the gate.
- Tokens are compared with ``hmac.compare_digest`` so the time taken says nothing about
  how much of a guess was right.
- ``--admin-token-file``: the first non-comment line is the bearer token that mutating
  admin calls (POST) must carry.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from shared.messages import valid_guest_id


class TokenFileError(ValueError):
    """The token file cannot be used; the message says which line and why."""


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


def load_admin_token(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenFileError(f"cannot read admin token file {path}: {error}") from None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            if len(line) < 8:
                raise TokenFileError(f"{path}: the admin token is shorter than 8 characters")
            return line
    raise TokenFileError(f"{path}: no token in the admin token file")


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison; ``None`` (no token sent) never matches."""
    if given is None:
        hmac.compare_digest(expected.encode(), expected.encode())  # same work either way
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


class GuestAuth:
    """Decides whether a HELLO may claim its guest id (see the module docstring)."""

    def __init__(self, tokens: dict[str, str] | None) -> None:
        self.tokens = tokens

    def admits(self, guest: str, token: str | None, transport: str) -> bool:
        if self.tokens is None:
            return True
        expected = self.tokens.get(guest)
        if expected is None:
            return transport != "tcp"
        return same_secret(token, expected)

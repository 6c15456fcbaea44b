"""Where a host's admin token is and how it is read: the one rule balloon-host writes by
(host_daemon/auth.py) and balloonctl reads by, so neither imports the other.

A host without ``--admin-token-file`` writes a fresh token to DIR/admin-PORT.token at start
(PORT: its --http port; DIR: ``--admin-token-dir``, by default beside the default socket);
balloonctl, given only the host's URL, finds the file from the port the same way.
"""

from __future__ import annotations

from pathlib import Path

from .addresses import default_socket_path


class TokenFileError(ValueError):
    """The token file cannot be used; the message says which line and why."""


def load_admin_token(path: Path) -> str:
    """The admin token in ``path`` (the first non-comment line, at least 8 characters)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise TokenFileError(f"cannot read admin token file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise TokenFileError(f"cannot read admin token file {path}: {error}") from None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            if len(line) < 8:
                raise TokenFileError(f"{path}: the admin token is shorter than 8 characters")
            return line
    raise TokenFileError(f"{path}: no token in the admin token file")


def default_admin_token_dir(uid: int | None = None, environ=None) -> Path:
    """Where a host without ``--admin-token-file`` writes its token: the default socket's
    directory (``/run/balloon`` for root, ``$XDG_RUNTIME_DIR/balloon``, ``/tmp/balloon-UID``)."""
    return Path(default_socket_path(uid, environ)).parent


def admin_token_path(port: int, directory: Path | str | None = None) -> Path:
    """The generated token's file for the host whose admin API is on ``port``: one file per
    port, so hosts of one user on different ports (demos, tests) never share a token."""
    return Path(directory if directory is not None else default_admin_token_dir()) / f"admin-{port}.token"

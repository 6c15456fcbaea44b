"""Talking to a host: the admin API over urllib, and where the admin token comes from.

A CLI needs no event loop, so this is plain ``urllib`` with a timeout. Every failure becomes
one of two exceptions, each with the one line the user is told: ``CtlError`` (exit 1: the
host is unreachable or refused) and ``UsageError`` (exit 2: the request is wrong whatever
the host says, e.g. its HTTP 400).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

from shared.runtime.admin_token import TokenFileError, admin_token_path, load_admin_token

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    """Something the user must be told in one line (exit 1)."""


class UsageError(CtlError):
    """A request that is wrong whatever the host says (exit 2)."""


class AdminClient:
    """The admin API of docs/API.md over urllib (a CLI needs no event loop)."""

    def __init__(self, base: str, token: str | None = None, timeout: float = 5.0) -> None:
        if "://" not in base:
            base = "http://" + base
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            kind = UsageError if error.code == 400 else CtlError  # 400: what we asked for is wrong (exit 2)
            raise kind(f"{method} {path}: HTTP {error.code}: {_error_text(error)}") from None
        except urllib.error.URLError as error:
            raise CtlError(f"cannot reach the host at {self.base}: {_reason(error.reason)}") from None
        except (TimeoutError, OSError) as error:
            raise CtlError(f"cannot reach the host at {self.base}: {_reason(error)}") from None
        try:
            return json.loads(payload)
        except ValueError:
            raise CtlError(f"{method} {path}: the host answered something that is not JSON") from None

    def guests(self) -> list[dict]:
        answer = self._call("GET", "/api/v1/guests")
        if not isinstance(answer, dict) or not isinstance(answer.get("guests"), list):
            raise CtlError("GET /api/v1/guests: unexpected answer shape")
        return answer["guests"]

    def guest(self, guest: str) -> dict:
        return self._call("GET", f"/api/v1/guests/{urllib.parse.quote(guest, safe='')}")

    def set_target(self, guest: str, size_bytes: int) -> dict:
        return self._call("POST", f"/api/v1/guests/{urllib.parse.quote(guest, safe='')}/target",
                          {"bytes": size_bytes})

    def policy(self) -> dict:
        answer = self._call("GET", "/api/v1/policy")
        if not isinstance(answer, dict) or not isinstance(answer.get("decisions"), list):
            raise CtlError("GET /api/v1/policy: unexpected answer shape")
        return answer

    def hint(self, guest: str) -> dict:
        return self._call("POST", f"/api/v1/guests/{urllib.parse.quote(guest, safe='')}/hint", {})


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except (ValueError, OSError):
        pass
    return error.reason or "error"


def _reason(reason) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def admin_token(host: str, token_file: str | None = None, environ=None) -> str:
    """The admin token for ``host``: ``--token-file``, $BALLOON_CTL_TOKEN_FILE, or the file
    the host generated (shared.runtime.admin_token: the same rule the host writes by)."""
    environ = os.environ if environ is None else environ
    given = token_file or environ.get("BALLOON_CTL_TOKEN_FILE") or None
    if given:
        path = given
    else:
        url = urllib.parse.urlsplit(host if "://" in host else "http://" + host)
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            raise UsageError(f"--host {host}: not a URL with a valid port") from None
        path = admin_token_path(port)
        if not os.path.exists(path):
            raise CtlError(f"no admin token at {path}: the host writes it there at start unless it runs with "
                           "--admin-token-file or --admin-token-dir (then give that file with --token-file)")
        if not os.access(path, os.R_OK):
            raise CtlError(f"cannot read the admin token {path}: only the host's user and root may "
                           "(run balloonctl as one of them, or give --token-file)")
    try:
        return load_admin_token(path)
    except TokenFileError as error:
        raise CtlError(str(error)) from None

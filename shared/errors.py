"""Protocol errors with stable codes.

As in h11: ``ProtocolError`` is abstract; ``LocalProtocolError`` means *we* broke the
rules (a bug or misuse on this side), ``RemoteProtocolError`` means the peer did. Every
error carries a ``code`` from :data:`CODES` that goes on the wire in an ERROR message
and into the ``balloon_protocol_errors_total{code}`` metric, so codes never change
meaning once published.
"""

from __future__ import annotations

#: Every code this project sends, with the one-line meaning docs/PROTOCOL.md repeats.
CODES: dict[str, str] = {
    "bad-msgpack": "the bytes are not valid msgpack",
    "too-large": "a message (or its announced length) exceeds the receiver's maximum message size or a structural limit (str, array, map, depth, objects)",
    "bad-shape": "a message is not an array of the documented shape and field types",
    "unknown-type": "the message type number is not defined in protocol v1",
    "bad-state": "the message is not allowed in the connection's current state or direction",
    "bad-version": "HELLO or WELCOME names a protocol version other than 1",
    "bad-page-size": "HELLO names a page size other than 4096",
    "bad-guest-id": "the guest id is not 1-63 characters of [A-Za-z0-9_.-] starting alphanumeric",
    "bad-payload": "a batch payload is not whole words, ends in an escape, or escapes a zero count",
    "too-many-ranges": "a batch holds more ranges than WELCOME's max_ranges (pfn32: more than 256 PFNs)",
    "window-overrun": "more batches are unacknowledged than WELCOME's window allows",
    "bad-seq": "a batch's sequence number is not the next one expected",
    "bad-ack": "an ACK names a sequence number that is not awaiting an ack",
    "feature-not-negotiated": "the message belongs to a feature (hinting, stats) that WELCOME did not accept",
    "auth-failed": "the connection does not prove the guest id (its listener, token or peer uid)",
    "guest-busy": "another live session already holds this guest id",
    "too-many-guests": "the host already serves its maximum number of guests",
    "bad-size": "HELLO claims more pages than the host allows for this guest",
    "not-ready": "the host cannot admit this guest yet (its VMM has not told the host the VM's RAM layout); retry later",
    "too-many-connections": "the host already holds its maximum of connections that have not sent HELLO",
    "handshake-timeout": "no valid HELLO arrived in time",
    "idle-timeout": "nothing arrived from the peer within the idle timeout",
    "internal": "the sender failed internally; the session cannot go on",
}


class ProtocolError(Exception):
    """Abstract base: something broke protocol v1. Use a subclass."""

    def __init__(self, code: str, detail: str = "") -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise LocalProtocolError or RemoteProtocolError")
        if code not in CODES:
            raise ValueError(f"unregistered protocol error code {code!r}")
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids (sending past the window, ...)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection must be closed."""


def as_remote(error: ProtocolError) -> RemoteProtocolError:
    """Convert an error raised while parsing the peer's bytes into a remote one (h11 does the same)."""
    if isinstance(error, RemoteProtocolError):
        return error
    converted = RemoteProtocolError(error.code, error.detail)
    converted.__cause__ = error
    return converted

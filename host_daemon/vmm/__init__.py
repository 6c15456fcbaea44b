"""The host's door to each VM's VMM: one small interface (:mod:`.link`), one module per VMM.

``make_link`` picks the module for an inventory ``qmp`` address and imports it only then:
QEMU's QMP client is loaded by a host that has a VM to talk to, not by every host.
"""

from __future__ import annotations

from .link import (
    BACKOFF_CAP_S,
    BACKOFF_FIRST_S,
    CONNECTED,
    CONNECTING,
    ERROR,
    INHIBIT_REASONS,
    MIGRATION,
    PINNED,
    REQUEST_TIMEOUT_S,
    SNAPSHOT,
    UNREACHABLE,
    UNREACHABLE_STATE,
    VMM_ERROR,
    VmmLink,
)

__all__ = [
    "BACKOFF_CAP_S", "BACKOFF_FIRST_S", "CONNECTED", "CONNECTING", "ERROR", "INHIBIT_REASONS",
    "MIGRATION", "PINNED", "REQUEST_TIMEOUT_S", "SNAPSHOT", "UNREACHABLE", "UNREACHABLE_STATE",
    "VMM_ERROR", "VmmLink", "make_link",
]


def make_link(guest: str, address: str, on_change=None, **options) -> VmmLink:
    """The link for an inventory ``qmp`` address: ``unix:/path`` is QEMU's QMP socket."""
    if not address.startswith("unix:") or len(address) <= 5:
        raise ValueError(f"qmp must be unix:/path/to/qmp.sock (QEMU -qmp unix:PATH,server=on,wait=off), got {address!r:.80}")
    from .qemu import QemuLink

    return QemuLink(guest, address, on_change, **options)

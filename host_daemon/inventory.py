"""The guests this host is configured to serve: ``--guests FILE`` (TOML) and the admin API.

A guest's id, size and RAM file come from the host's side, never
from what HELLO says. An entry fixes them, the way a VM's configuration fixes its memory
and its devices::

    [guest.vm1]
    memory     = "1GiB"                       # required: the size the host counts
    listen     = "unix:/run/balloon/vm1.sock" # whoever connects here IS vm1
    ram_file   = "/dev/shm/balloon/vm1.ram"   # the VM's own RAM file (QEMU mem-path)
    token      = "a-secret"                   # proves vm1 on a shared --listen
    uid        = 1001                         # a unix peer with this uid is vm1
    min_memory = "256MiB"                     # host policy: floor ...
    max_memory = "1GiB"                       # ... and ceiling (<= memory)
    qmp        = "unix:/run/balloon/vm1.qmp"  # the VM's QEMU monitor (-qmp unix:PATH,server=on,wait=off)
    ram_map    = [{gpa = 0, size = 3221225472, offset = 0}, ...]  # GPA -> file offset, without qmp

``qmp`` lets the host learn the VM's RAM layout and when discards are unsafe, and drive
QEMU's own balloon for a guest that runs no agent (host_daemon/vmms.py). A VM whose RAM
file is large enough to be split around QEMU's PCI hole (``memory`` >= 2.75 GiB) needs
``qmp`` or ``ram_map``: the host never guesses where its pages are in the file.

This module only parses and checks entries and answers look-ups; who may claim which
entry is ``auth.GuestAuth``, what a session gets is ``admission``. A ``ram_file`` aims the
host's hole punch, so it must lie under a VM RAM directory the host was started with
(``reclaim.VmRamDirs``: ``--ram-dir``, ``--vm-ram-dirs``), whether it comes from the file or
the admin API; and the file itself must be writable by its owner only (it aims the punch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.messages import valid_guest_id
from shared.runtime.addresses import Address, parse_address
from shared.runtime.config import format_size, parse_size, read_toml
from shared.vocabulary import PAGE_SIZE

from .ramlayout import CONTIGUOUS_LIMIT, LayoutError, RamLayout, needs_map
from .reclaim import RamDirError, VmRamDirs

#: Most entries one host keeps (file and admin API together): each may own a listener.
MAX_ENTRIES = 4096
MAX_PAGES = 1 << 32  # the most the host tracks per guest (tracker.MAX_PAGES: 16 TiB)
MAX_TOKEN = 256  # HELLO's token limit (docs/PROTOCOL.md §4)
MIN_TOKEN = 8
MAX_UID = (1 << 32) - 2  # (uid_t)-1 means "no uid"
KEYS = ("memory", "listen", "ram_file", "token", "uid", "min_memory", "max_memory", "qmp", "ram_map")


class InventoryError(ValueError):
    """An entry or the file is unusable; the message says which guest and which key."""


@dataclass(frozen=True, slots=True)
class ProvisionedGuest:
    """One inventory entry; sizes are in pages (4 KiB)."""

    id: str
    pages: int
    listen: Address | None = None
    ram_file: Path | None = None
    token: str | None = None
    uid: int | None = None
    min_pages: int | None = None
    max_pages: int | None = None
    qmp: str | None = None  # "unix:/path": the VM's QEMU monitor
    ram_map: RamLayout | None = None  # the GPA -> file offset map given in the inventory

    def to_json(self) -> dict:
        """The entry as the admin API shows it (the token itself is never shown)."""
        return {
            "id": self.id,
            "memory_bytes": self.pages * PAGE_SIZE,
            "pages": self.pages,
            "listen": None if self.listen is None else str(self.listen),
            "ram_file": None if self.ram_file is None else str(self.ram_file),
            "token": self.token is not None,
            "uid": self.uid,
            "min_memory_bytes": None if self.min_pages is None else self.min_pages * PAGE_SIZE,
            "max_memory_bytes": None if self.max_pages is None else self.max_pages * PAGE_SIZE,
            "qmp": self.qmp,
            "ram_map": None if self.ram_map is None else self.ram_map.to_json(),
        }


def _size(value: Any, key: str) -> int:
    if type(value) is bool or not isinstance(value, int | str):
        raise ValueError(f"{key} must be a size such as \"8GiB\" or a byte count")
    size = parse_size(value)
    if size % PAGE_SIZE:
        raise ValueError(f"{key} must be whole {PAGE_SIZE}-byte pages, got {size} bytes")
    return size // PAGE_SIZE


def parse_entry(guest: str, table: Any) -> ProvisionedGuest:
    """Check one ``[guest.ID]`` table (or an admin API body); InventoryError says what is wrong."""
    if not valid_guest_id(guest):
        raise InventoryError(f"{guest!r:.80} is not a valid guest id "
                             "(1-63 characters of [A-Za-z0-9_.-], the first alphanumeric)")
    try:
        return _parse_entry(guest, table)
    except ValueError as error:
        raise InventoryError(f"guest {guest}: {error}") from None


def _parse_entry(guest: str, table: Any) -> ProvisionedGuest:
    if not isinstance(table, Mapping):
        raise ValueError("an entry must be a table (a JSON object) of " + ", ".join(KEYS))
    unknown = sorted(str(key) for key in table if key not in KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r:.40} (known: {', '.join(KEYS)})")
    if "memory" not in table:
        raise ValueError("memory is required (the guest's RAM size, e.g. \"8GiB\")")
    pages = _size(table["memory"], "memory")
    if not 1 <= pages <= MAX_PAGES:
        raise ValueError(f"memory must be 4KiB..{format_size(MAX_PAGES * PAGE_SIZE)} (the most this host "
                         f"tracks per guest), got {format_size(pages * PAGE_SIZE)}")
    listen = table.get("listen")
    if listen is not None:
        if type(listen) is not str:
            raise ValueError("listen must be an address string such as \"unix:/run/balloon/vm1.sock\"")
        listen = parse_address(listen)
        if listen.kind == "unix" and not os.path.isabs(listen.path):
            raise ValueError(f"listen {listen} must be an absolute path")
        if listen.kind == "tcp" and listen.port == 0:
            raise ValueError("listen tcp port 0 is not a fixed address a guest could be given")
    ram_file = table.get("ram_file")
    if ram_file is not None:
        if type(ram_file) is not str or not ram_file or "\0" in ram_file or len(ram_file) > 4096:
            raise ValueError("ram_file must be a path string")
        if not os.path.isabs(ram_file):
            raise ValueError(f"ram_file must be an absolute path, got {ram_file!r:.80}")
        ram_file = Path(os.path.normpath(ram_file))
    token = table.get("token")
    if token is not None:
        if type(token) is not str or not MIN_TOKEN <= len(token) <= MAX_TOKEN or token != token.strip():
            raise ValueError(f"token must be a string of {MIN_TOKEN}..{MAX_TOKEN} characters, no edge spaces")
    uid = table.get("uid")
    if uid is not None and (type(uid) is not int or not 0 <= uid <= MAX_UID):
        raise ValueError(f"uid must be an integer 0..{MAX_UID}")
    low = None if table.get("min_memory") is None else _size(table["min_memory"], "min_memory")
    high = None if table.get("max_memory") is None else _size(table["max_memory"], "max_memory")
    if high is not None and high > pages:
        raise ValueError("max_memory cannot exceed memory")
    if low is not None and low > (pages if high is None else high):
        raise ValueError("min_memory cannot exceed max_memory (or memory)")
    qmp = table.get("qmp")
    if qmp is not None:
        if (type(qmp) is not str or not qmp.startswith("unix:") or not os.path.isabs(qmp[5:])
                or "\0" in qmp or len(qmp) > 4096):
            raise ValueError("qmp must be \"unix:/absolute/path\" (QEMU's -qmp unix:PATH,server=on,wait=off)")
        qmp = "unix:" + os.path.normpath(qmp[5:])
    ram_map = table.get("ram_map")
    if ram_map is not None:
        try:
            ram_map = RamLayout.parse(ram_map)
        except LayoutError as error:
            raise ValueError(f"ram_map: {error}") from None
        if ram_map.ram_pages != pages:
            raise ValueError(f"ram_map holds {ram_map.ram_pages * PAGE_SIZE} bytes of RAM, memory says "
                             f"{pages * PAGE_SIZE}")
    if ram_file is not None and qmp is None and ram_map is None and needs_map(pages * PAGE_SIZE):
        raise ValueError(
            f"memory {pages * PAGE_SIZE} bytes is at least {CONTIGUOUS_LIMIT} (2.75 GiB): QEMU may split this "
            "VM's RAM around its PCI hole, so guest-physical addresses are not file offsets; give qmp "
            "(the host asks QEMU) or ram_map (a list of {gpa, size, offset}) so the host punches the right pages")
    return ProvisionedGuest(guest, pages, listen, ram_file, token, uid, low, high, qmp, ram_map)


class Inventory:
    """The provisioned guests, with the look-ups identity needs (by listener, by uid)."""

    def __init__(self, entries=(), ram_dir: Path | None = None, vm_ram_dirs=()) -> None:
        self.ram_dir = ram_dir
        #: where a ram_file may be: --ram-dir and --vm-ram-dirs
        self.ram_dirs = VmRamDirs(([ram_dir] if ram_dir is not None else []) + list(vm_ram_dirs))
        self._entries: dict[str, ProvisionedGuest] = {}
        for entry in entries:
            self.put(entry)

    @classmethod
    def load(cls, path: Path | str, ram_dir: Path | None = None, vm_ram_dirs=()) -> Inventory:
        """Read ``--guests FILE``; InventoryError names the file and the entry at fault."""
        check_inventory_file(path)
        data = read_toml(path, "--guests", InventoryError)
        extra = sorted(key for key in data if key != "guest")
        if extra:
            raise InventoryError(f"--guests: {path}: unknown table {extra[0]!r} (entries are [guest.ID])")
        guests = data.get("guest", {})
        if not isinstance(guests, dict):
            raise InventoryError(f"--guests: {path}: 'guest' must be tables [guest.ID]")
        inventory = cls(ram_dir=ram_dir, vm_ram_dirs=vm_ram_dirs)
        try:
            for guest, table in guests.items():
                inventory.put(parse_entry(guest, table))
        except InventoryError as error:
            raise InventoryError(f"--guests: {path}: {error}") from None
        return inventory

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ProvisionedGuest]:
        return iter(list(self._entries.values()))

    def __contains__(self, guest: object) -> bool:
        return guest in self._entries

    def get(self, guest: str) -> ProvisionedGuest | None:
        return self._entries.get(guest)

    def by_uid(self, uid: int | None) -> ProvisionedGuest | None:
        if uid is None:
            return None
        for entry in self._entries.values():
            if entry.uid == uid:
                return entry
        return None

    def listeners(self) -> dict[Address, str]:
        """Per-guest listener address → guest id."""
        return {entry.listen: entry.id for entry in self._entries.values() if entry.listen is not None}

    def check(self, entry: ProvisionedGuest) -> None:
        """Raise InventoryError if ``entry`` cannot join the others (shared listener, file or uid)."""
        for other in self._entries.values():
            if other.id == entry.id:
                continue
            if entry.listen is not None and _same_listener(entry.listen, other.listen):
                raise InventoryError(f"guest {entry.id}: listen {entry.listen} is already guest {other.id}'s")
            if entry.ram_file is not None and entry.ram_file == other.ram_file:
                raise InventoryError(f"guest {entry.id}: ram_file {entry.ram_file} is already guest {other.id}'s")
            if entry.qmp is not None and entry.qmp == other.qmp:
                raise InventoryError(f"guest {entry.id}: qmp {entry.qmp} is already guest {other.id}'s")
            if entry.uid is not None and entry.uid == other.uid:
                raise InventoryError(f"guest {entry.id}: uid {entry.uid} is already guest {other.id}'s")
        if entry.ram_file is not None:
            try:
                self.ram_dirs.check(entry.ram_file)
            except RamDirError as error:
                raise InventoryError(f"guest {entry.id}: {error}") from None
        if entry.ram_file is not None and self.ram_dir is not None:
            # Open-mode guests get RAM_DIR/<id>.ram: a provisioned file in there must carry its
            # own id, which no open guest can use (a provisioned id is refused on open routes).
            inside = os.path.realpath(entry.ram_file.parent) == os.path.realpath(self.ram_dir)
            if inside and entry.ram_file.name != f"{entry.id}.ram":
                raise InventoryError(
                    f"guest {entry.id}: a ram_file inside --ram-dir {self.ram_dir} must be named "
                    f"{entry.id}.ram (other names there belong to open-mode guests)")
        if entry.id not in self._entries and len(self._entries) >= MAX_ENTRIES:
            raise InventoryError(f"the inventory holds at most {MAX_ENTRIES} guests")

    def put(self, entry: ProvisionedGuest) -> bool:
        """Add or replace an entry; True if it is new."""
        self.check(entry)
        new = entry.id not in self._entries
        self._entries[entry.id] = entry
        return new

    def remove(self, guest: str) -> ProvisionedGuest | None:
        return self._entries.pop(guest, None)


def check_inventory_file(path: Path | str) -> None:
    """The inventory names the files the host punches: refuse one that anyone but its owner
    (the host's user or root) could change, as sshd refuses a group-writable authorized_keys."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise InventoryError(f"--guests: cannot read {path}: {error.strerror}") from None
    if info.st_uid not in (os.geteuid(), 0):
        raise InventoryError(f"--guests: {path} is owned by uid {info.st_uid}; it must belong to the host's "
                             f"user (uid {os.geteuid()}) or root")
    if info.st_mode & 0o022:
        raise InventoryError(f"--guests: {path} is writable by group or others (mode "
                             f"{info.st_mode & 0o777:o}); chmod go-w it")


def _same_listener(a: Address, b: Address | None) -> bool:
    if b is None:
        return False
    if a.kind == "unix" and b.kind == "unix":
        return os.path.normpath(a.path) == os.path.normpath(b.path)
    return a == b

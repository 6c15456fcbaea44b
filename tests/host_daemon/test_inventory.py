"""The inventory file and entries: what is accepted, and one clear message for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_daemon.auth import GuestAuth
from host_daemon.inventory import Inventory, InventoryError, parse_entry
from shared.errors import RemoteProtocolError
from shared.runtime.addresses import Address

VM1 = """
[guest.vm1]
memory = "1GiB"
listen = "unix:/run/balloon/vm1.sock"
ram_file = "/dev/shm/balloon/vm1.ram"
min_memory = "256MiB"
max_memory = "1GiB"

[guest.shared-one]
memory = 1048576
token = "correct-horse"

[guest.by-uid]
memory = "64MiB"
uid = 1234
"""


def test_the_documented_format_loads(tmp_path):
    path = tmp_path / "guests.toml"
    path.write_text(VM1)
    inventory = Inventory.load(path, vm_ram_dirs=[Path("/dev/shm/balloon")])
    vm1 = inventory.get("vm1")
    assert vm1.pages == 262144 and vm1.listen == Address("unix", path="/run/balloon/vm1.sock")
    assert vm1.ram_file == Path("/dev/shm/balloon/vm1.ram")
    assert (vm1.min_pages, vm1.max_pages) == (65536, 262144)
    assert inventory.get("shared-one").pages == 256 and inventory.get("shared-one").token == "correct-horse"
    assert inventory.by_uid(1234).id == "by-uid" and inventory.by_uid(1) is None
    assert inventory.listeners() == {vm1.listen: "vm1"}
    assert vm1.to_json()["token"] is False and inventory.get("shared-one").to_json()["token"] is True
    assert "correct-horse" not in str(inventory.get("shared-one").to_json())


@pytest.mark.parametrize(("table", "message"), [
    ({}, "memory is required"),
    ({"memory": "1000"}, "whole 4096-byte pages"),
    ({"memory": "0"}, "memory must be"),
    ({"memory": "9" * 400}, "too large|not a size"),
    ({"memory": "9" * 400 + ".5"}, "too large|not a size"),
    ({"memory": True}, "must be a size"),
    ({"memory": "1GiB", "colour": "red"}, "unknown key 'colour'"),
    ({"memory": "1GiB", "listen": "udp:x"}, "unknown transport"),
    ({"memory": "1GiB", "listen": "unix:relative.sock"}, "absolute"),
    ({"memory": "1GiB", "listen": "tcp:127.0.0.1:0"}, "port 0"),
    ({"memory": "1GiB", "ram_file": "vm1.ram"}, "absolute"),
    ({"memory": "1GiB", "ram_file": 7}, "path string"),
    ({"memory": "1GiB", "token": "short"}, "8..256"),
    ({"memory": "1GiB", "uid": -1}, "uid must be"),
    ({"memory": "1GiB", "uid": "0"}, "uid must be"),
    ({"memory": "1GiB", "max_memory": "2GiB"}, "max_memory cannot exceed memory"),
    ({"memory": "1GiB", "min_memory": "512MiB", "max_memory": "256MiB"}, "min_memory cannot exceed"),
    ([1, 2], "must be a table"),
])
def test_bad_entries_say_what_is_wrong(table, message):
    with pytest.raises(InventoryError, match=message):
        parse_entry("vm1", table)


@pytest.mark.parametrize("guest", ["", "-x", "a/b", "x" * 64, "../etc"])
def test_bad_ids_are_refused(guest):
    with pytest.raises(InventoryError, match="not a valid guest id"):
        parse_entry(guest, {"memory": "1GiB"})


def test_clashes_between_entries_are_refused(tmp_path):
    inventory = Inventory([parse_entry("a", {"memory": "1GiB", "listen": "unix:/run/a.sock",
                                             "ram_file": "/dev/shm/a.ram", "uid": 5})], vm_ram_dirs=["/dev/shm"])
    for table, what in (({"listen": "unix:/run/./a.sock"}, "listen"), ({"ram_file": "/dev/shm/a.ram"}, "ram_file"),
                        ({"uid": 5}, "uid")):
        with pytest.raises(InventoryError, match=f"{what} .* is already guest a's"):
            inventory.put(parse_entry("b", {"memory": "1GiB", **table}))
    inventory.put(parse_entry("a", {"memory": "2GiB", "listen": "unix:/run/a.sock"}))  # replacing itself is fine
    assert inventory.get("a").pages == 524288


def test_a_provisioned_file_inside_the_ram_dir_must_carry_its_own_id(tmp_path):
    inventory = Inventory(ram_dir=tmp_path)
    with pytest.raises(InventoryError, match="must be named vm1.ram"):
        inventory.put(parse_entry("vm1", {"memory": "1GiB", "ram_file": str(tmp_path / "other.ram")}))
    inventory.put(parse_entry("vm1", {"memory": "1GiB", "ram_file": str(tmp_path / "vm1.ram")}))


@pytest.mark.parametrize(("text", "message"), [
    ("[guest.vm1\n", "not valid TOML"),
    ("[host]\nx = 1\n", "unknown table 'host'"),
    ("guest = 3\n", "must be tables"),
    ('[guest.vm1]\nmemory = "1GiB"\n[guest."bad id"]\nmemory = "1GiB"\n', "not a valid guest id"),
])
def test_bad_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "guests.toml"
    path.write_text(text)
    with pytest.raises(InventoryError, match=message) as caught:
        Inventory.load(path)
    assert str(path) in str(caught.value)


def _auth(**kw):
    inventory = Inventory([
        parse_entry("vm1", {"memory": "1GiB", "listen": "unix:/run/vm1.sock"}),
        parse_entry("tok", {"memory": "1GiB", "token": "correct-horse"}),
        parse_entry("uidg", {"memory": "1GiB", "uid": 4242}),
    ])
    return GuestAuth(kw.pop("tokens", None), inventory, **kw)


def _refused(auth, *args, **kw) -> str:
    with pytest.raises(RemoteProtocolError) as caught:
        auth.identify(*args, **kw)
    assert caught.value.code == "auth-failed"
    return caught.value.detail


def test_identity_comes_from_the_host_side():
    auth = _auth()
    assert auth.identify("vm1", None, "unix", listener_guest="vm1").id == "vm1"
    assert "belongs to guest 'vm1'" in _refused(auth, "tok", None, "unix", listener_guest="vm1")
    # a provisioned id on a shared listener: HELLO's name alone proves nothing, on any transport
    assert "own listener" in _refused(auth, "vm1", None, "unix", uid=0)
    assert "own listener" in _refused(auth, "vm1", "guess-guess", "tcp")
    assert auth.identify("tok", "correct-horse", "tcp").id == "tok"
    assert "token" in _refused(auth, "tok", "wrong-horse", "unix", uid=0)
    assert auth.identify("uidg", None, "unix", uid=4242).id == "uidg"
    _refused(auth, "uidg", None, "unix", uid=4243)
    _refused(auth, "uidg", None, "tcp", uid=4242)  # uids exist only on Unix sockets
    assert "uid 4242 is guest 'uidg'" in _refused(auth, "fresh", None, "unix", uid=4242)
    # open mode: Unix and vsock yes, TCP only with a token or --allow-open-tcp
    assert auth.identify("fresh", None, "unix", uid=0) is None
    assert auth.identify("fresh", None, "vsock") is None
    assert "--allow-open-tcp" in _refused(auth, "fresh", None, "tcp")
    assert _auth(allow_open_tcp=True).identify("fresh", None, "tcp") is None
    tokens = _auth(tokens={"listed": "listed-secret"})
    assert tokens.identify("listed", "listed-secret", "tcp") is None
    _refused(tokens, "listed", "nope-nope", "unix", uid=0)
    assert "provisioned guests only" in _refused(_auth(open_mode=False), "fresh", None, "unix", uid=0)

"""Nobody aims the punch but the host's configuration (issue 17 item 2): a provisioned ram_file —
from PUT /api/v1/guests/{id} or --guests — must lie under a VM RAM directory the host was given,
through no symlink, be a regular file with one link and an expected owner. Every refusal is a 400
(or a refused session) and the file it named keeps every byte and every block."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import aiohttp
import pytest
from hostkit import ERROR, WELCOME, RawGuest, eventually

from host_daemon.inventory import Inventory, InventoryError, parse_entry

MIB = 1 << 20


@pytest.fixture
def shm(tmp_path):
    """A tmpfs folder when there is one (a punch really frees blocks there), holding the VM RAM
    directory ``vmram`` and, beside it, ``elsewhere`` with a victim data file."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    root = Path(base) / f"balloon-aim-{os.getpid()}-{id(tmp_path)}"
    (root / "vmram").mkdir(parents=True)
    (root / "elsewhere").mkdir()
    victim = root / "elsewhere" / "victim.dat"
    victim.write_bytes(os.urandom(MIB) * 2)  # 2 MiB of data someone cares about
    yield root
    shutil.rmtree(root, ignore_errors=True)


def fingerprint(path: Path) -> tuple[int, int, str]:
    info = os.stat(path)
    return info.st_size, info.st_blocks, hashlib.sha256(path.read_bytes()).hexdigest()


async def put(host, guest: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{host.url}/api/v1/guests/{guest}", json=body, headers=host.admin_headers) as response:
            return response.status, await response.json()


def aims(shm: Path) -> list[tuple[str, str, str]]:
    """(case, ram_file, what the refusal says): every way to point the punch at the victim."""
    victim = shm / "elsewhere" / "victim.dat"
    vmram = shm / "vmram"
    (vmram / "via-link").symlink_to(shm / "elsewhere")  # a symlinked parent directory
    (vmram / "file-link.ram").symlink_to(victim)  # a symlinked file
    os.link(victim, vmram / "hard.ram")  # a hard link to a file elsewhere
    (vmram / "dir.ram").mkdir()  # not a regular file
    return [
        ("outside the allowed dirs", str(victim), "not under a directory this host uses for VM RAM"),
        ("dot-dot out of the allowed dir", f"{vmram}/../elsewhere/victim.dat", "not under"),
        ("through a symlinked parent", str(vmram / "via-link" / "victim.dat"), "symlink"),
        ("a symlink to the file", str(vmram / "file-link.ram"), "symlink"),
        ("a hard link to the file", str(vmram / "hard.ram"), "links"),
        ("a directory", str(vmram / "dir.ram"), "not a regular file"),
    ]


async def test_put_cannot_aim_the_punch_at_a_file_elsewhere(make_host, shm, tmp_path):
    """Issue 17's reproduction: PUT evil {ram_file: any file}, HELLO with its token, one REPORT —
    the data file was punched to 0 blocks. Every variant is now a 400 and the file is untouched."""
    victim = shm / "elsewhere" / "victim.dat"
    before = fingerprint(victim)
    host = await make_host(vm_ram_dirs=(shm / "vmram",))
    for case, ram_file, message in aims(shm):
        status, answer = await put(host, "evil", {"memory": "1MiB", "token": "evil-token-1", "ram_file": ram_file})
        assert status == 400, (case, status, answer)
        assert message in answer["error"], (case, answer)
        assert "evil" not in host.registry.inventory, case
    # what the attacker does next gets an open-mode guest with no file at all
    guest = await RawGuest.connect(host.unix)
    assert (await guest.hello("evil", 256, token="evil-token-1"))[0] == WELCOME
    await guest.report([(0, 256)])
    await guest.close()
    assert fingerprint(victim) == before
    assert os.stat(victim).st_nlink == 2  # (the hard link of the test itself)


async def test_a_file_of_another_owner_is_refused(make_host, shm):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    other = shm / "vmram" / "other.ram"
    other.write_bytes(b"x" * MIB)
    os.chown(other, 54321, 54321)
    before = fingerprint(other)
    host = await make_host(vm_ram_dirs=(shm / "vmram",))
    status, answer = await put(host, "vm1", {"memory": "1MiB", "ram_file": str(other)})
    assert status == 400 and "owned by uid 54321" in answer["error"], answer
    # giving the directory to that uid (as to the VMM's user) is how its files are allowed
    os.chown(shm / "vmram", 54321, 54321)
    status, answer = await put(host, "vm1", {"memory": "1MiB", "ram_file": str(other)})
    assert status == 201, answer
    assert fingerprint(other) == before


async def test_an_allowed_file_is_punched_and_a_symlink_swapped_in_later_is_not(make_host, shm, tmp_path):
    """The check at PUT is repeated at every open, on the descriptor that is then punched: a
    directory on the path swapped for a symlink after the PUT refuses the session."""
    sub = shm / "vmram" / "vm1"
    sub.mkdir()
    ram = sub / "vm1.ram"
    ram.write_bytes(b"\x01" * MIB)
    sock = tmp_path / "vm1.sock"
    host = await make_host(vm_ram_dirs=(shm / "vmram",))
    status, answer = await put(host, "vm1", {"memory": "1MiB", "listen": f"unix:{sock}", "ram_file": str(ram)})
    assert status == 201, answer
    guest = await RawGuest.connect(str(sock))
    assert (await guest.hello("vm1", 256))[0] == WELCOME
    blocks = os.stat(ram).st_blocks
    await guest.report([(0, 128)])
    if shm.parent == Path("/dev/shm"):
        assert os.stat(ram).st_blocks < blocks  # the allowed file really is punched
    await guest.close()
    await eventually(lambda: not host.registry.get("vm1").connected)

    # swap the directory for a symlink to where the victim lives, under the same name
    victim = shm / "elsewhere" / "vm1.ram"
    victim.write_bytes(os.urandom(MIB))
    before = fingerprint(victim)
    sub.rename(shm / "vmram" / "moved")
    sub.symlink_to(shm / "elsewhere")
    guest = await RawGuest.connect(str(sock))
    reply = await guest.hello("vm1", 256)
    assert reply[:2] == [ERROR, "internal"], reply
    await guest.close()
    assert fingerprint(victim) == before


def test_the_inventory_file_gets_the_same_rule(shm, tmp_path):
    victim = shm / "elsewhere" / "victim.dat"
    before = fingerprint(victim)
    path = tmp_path / "guests.toml"
    for case, ram_file, message in aims(shm):
        path.write_text(f'[guest.vm1]\nmemory = "1MiB"\nram_file = "{ram_file}"\n')
        with pytest.raises(InventoryError, match=message) as caught:
            Inventory.load(path, vm_ram_dirs=[shm / "vmram"])
        assert str(path) in str(caught.value) and "vm1" in str(caught.value), case
    path.write_text(f'[guest.vm1]\nmemory = "1MiB"\nram_file = "{shm}/vmram/vm1.ram"\n')
    assert Inventory.load(path, vm_ram_dirs=[shm / "vmram"]).get("vm1").ram_file == shm / "vmram" / "vm1.ram"
    with pytest.raises(InventoryError, match="no directory for VM RAM"):
        Inventory.load(path)  # no --ram-dir, no --vm-ram-dirs: no ram_file at all
    path.chmod(0o666)  # the file that aims the punch must not be writable by others
    with pytest.raises(InventoryError, match="writable by group or others"):
        Inventory.load(path, vm_ram_dirs=[shm / "vmram"])
    assert fingerprint(victim) == before


def test_a_not_yet_existing_file_is_accepted_and_checked_at_open(shm):
    """The VMM creates its RAM file when the VM starts, possibly after provisioning."""
    inventory = Inventory(vm_ram_dirs=[shm / "vmram"])
    inventory.put(parse_entry("vm1", {"memory": "1MiB", "ram_file": f"{shm}/vmram/later/vm1.ram"}))
    from host_daemon.reclaim import RamDirError, RamFile

    with pytest.raises(RamDirError, match="cannot open"):
        RamFile.open_provisioned(shm / "vmram" / "later" / "vm1.ram", 256, inventory.ram_dirs)
    assert not (shm / "vmram" / "later").exists()  # nothing created on the way


def test_the_allowed_dir_may_be_named_through_a_symlink_by_the_operator(shm):
    """The operator's own directory is resolved once at start; below it, no symlink is followed."""
    alias = shm / "alias"
    alias.symlink_to(shm / "vmram")
    inventory = Inventory(vm_ram_dirs=[alias])
    inventory.put(parse_entry("vm1", {"memory": "1MiB", "ram_file": f"{alias}/vm1.ram"}))
    inventory.put(parse_entry("vm2", {"memory": "1MiB", "ram_file": f"{shm}/vmram/vm2.ram"}))
    with pytest.raises(InventoryError, match="not under"):
        inventory.put(parse_entry("vm3", {"memory": "1MiB", "ram_file": f"{shm}/elsewhere/vm3.ram"}))

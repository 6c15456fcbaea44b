"""The admin token a host generates when it has no --admin-token-file: where it goes, who can read
it, that it goes away with the host, and that balloonctl finds it by the same rule."""

from __future__ import annotations

import asyncio
import os
import stat
import sys

import pytest
from hostkit import TARGET, WELCOME, RawGuest

from host_daemon.listeners import ListenError
from shared.runtime.admin_token import admin_token_path, default_admin_token_dir


async def test_the_generated_token_is_written_0600_and_removed_at_stop(make_host, tmp_path):
    run = tmp_path / "run"  # made by the host
    stale = admin_token_path(1, run)  # a file of an earlier run on another port stays as it is
    host = await make_host(admin_token_dir=run)
    path = admin_token_path(host.http_address[1], run)
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o750
    assert path.read_text() == host.admin_token + "\n" and len(host.admin_token) >= 43
    assert not stale.exists() and [p.name for p in run.iterdir()] == [path.name]  # no temporary left
    await host.stop()
    assert not path.exists()


async def test_a_new_token_every_start_replacing_a_stale_file(make_host, tmp_path):
    first = await make_host(admin_token_dir=tmp_path)
    port = first.http_address[1]
    path = admin_token_path(port, tmp_path)
    token = first.admin_token
    os.link(path, tmp_path / "kept")  # as if the host had been SIGKILLed: the file stays
    await first.stop()
    os.rename(tmp_path / "kept", path)
    second = await make_host(admin_token_dir=tmp_path, http=("127.0.0.1", port))
    assert second.admin_token != token and path.read_text().strip() == second.admin_token
    assert os.stat(path).st_nlink == 1  # a new file, not the old one rewritten


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777])
async def test_a_directory_others_can_write_is_refused(make_host, tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ListenError, match="another user could replace the admin token"):
        await make_host(admin_token_dir=shared)
    assert list(shared.iterdir()) == []


async def test_balloonctl_finds_the_token_of_a_host_with_default_settings(make_host):
    """No token given anywhere: the host writes it to the default directory (the default socket's,
    /run/balloon as root) and balloonctl, run as the same user, sends it by itself."""
    host = await make_host(admin_token_dir=default_admin_token_dir())
    path = admin_token_path(host.http_address[1])
    assert path.exists()
    guest = await RawGuest.connect(host.unix)
    assert (await guest.hello("g1", 16384))[0] == WELCOME
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALLOON_CTL_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "balloonctl", "--host", host.url, "setmem", "g1", "48MiB",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert await guest.recv() == [TARGET, 4096]  # 64 MiB - 48 MiB kept = a 16 MiB balloon
    await guest.close()
    await host.stop()
    assert not path.exists()

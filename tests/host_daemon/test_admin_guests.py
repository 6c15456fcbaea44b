"""Admin API writes of the inventory (PUT/DELETE /api/v1/guests/{id}) and bodies that used to 500."""

from __future__ import annotations

import aiohttp
import pytest
from hostkit import ERROR, WELCOME, RawGuest, eventually

TOKEN = "admin-secret-1"


@pytest.fixture
def admin_token(tmp_path):
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    return path


def _auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def _call(method: str, url: str, body=None, data=None, token: str | None = TOKEN):
    headers = _auth(token) if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, json=body, data=data, headers=headers) as response:
            text = await response.text()
            return response.status, (await response.json() if text and response.content_type == "application/json"
                                     else text)


async def test_put_provisions_a_guest_with_its_own_listener_and_delete_forgets_it(make_host, tmp_path, admin_token):
    host = await make_host(admin_token_file=admin_token)
    url = f"{host.url}/api/v1/guests/vm7"
    sock = str(tmp_path / "vm7.sock")
    body = {"memory": "16MiB", "listen": f"unix:{sock}", "min_memory": "4MiB"}
    assert (await _call("PUT", url, body, token=None))[0] == 401
    status, entry = await _call("PUT", url, body)
    assert status == 201, entry
    assert entry["memory_bytes"] == 16 << 20 and entry["listen"] == f"unix:{sock}" and entry["token"] is False
    status, guest = await _call("GET", url)
    assert status == 200 and guest["connected"] is False and guest["provisioned"]["min_memory_bytes"] == 4 << 20
    vm = await RawGuest.connect(sock)  # the new listener is vm7's
    welcome = await vm.hello("vm7", 4000)
    assert welcome[0] == WELCOME and welcome[1]["pages"] == 4096
    thief = await RawGuest.connect(host.unix)
    assert (await thief.hello("vm7", 4096))[:2] == [ERROR, "auth-failed"]
    status, answer = await _call("DELETE", url)
    assert status == 409 and "connected" in answer["error"]
    # a connected guest's size cannot change under it; policy bounds can
    assert (await _call("PUT", url, {**body, "memory": "32MiB"}))[0] == 409
    assert (await _call("PUT", url, {**body, "max_memory": "8MiB"}))[0] == 200
    await vm.close()
    await eventually(lambda: not host.registry.get("vm7").connected)
    assert (await _call("DELETE", url))[0] == 204
    assert (await _call("GET", url))[0] == 404
    assert (await _call("DELETE", url))[0] == 404
    import os

    assert not os.path.exists(sock)  # its listener is gone with it
    stranger = await RawGuest.connect(host.unix)  # and the id is an ordinary open id again
    assert (await stranger.hello("vm7", 16))[0] == WELCOME
    await stranger.close()


async def test_put_refuses_bad_entries_with_400_and_clashes(make_host, tmp_path, admin_token):
    host = await make_host(admin_token_file=admin_token)
    base = f"{host.url}/api/v1/guests"
    assert (await _call("PUT", f"{base}/a", {"memory": "16MiB", "uid": 77}))[0] == 201
    for guest, body, message in (
        ("b", {"memory": "16MiB", "uid": 77}, "already guest a's"),
        ("b", {"size": "16MiB"}, "unknown key"),
        ("b", {"memory": "9" * 400}, "not a size"),
        ("b", {"memory": "9" * 400 + ".5"}, "not a size"),
        ("b", {"memory": 10**400}, ""),
        ("b..", {"memory": "16MiB", "listen": f"unix:{host.unix}"}, "shared --listen"),
        ("-bad", {"memory": "16MiB"}, "not a valid guest id"),
    ):
        status, answer = await _call("PUT", f"{base}/{guest}", body)
        assert status in (400, 404, 409) and status != 500, (guest, body, status, answer)
        if message:
            assert message in answer["error"], answer


async def test_put_over_a_connected_open_guest_is_refused(make_host, admin_token):
    host = await make_host(admin_token_file=admin_token)
    squatter = await RawGuest.connect(host.unix)
    assert (await squatter.hello("wanted", 16))[0] == WELCOME
    status, answer = await _call("PUT", f"{host.url}/api/v1/guests/wanted", {"memory": "16MiB"})
    assert status == 409 and "open-mode" in answer["error"]
    await squatter.close()
    await eventually(lambda: not host.registry.get("wanted").connected)
    assert (await _call("PUT", f"{host.url}/api/v1/guests/wanted", {"memory": "16MiB"}))[0] == 201
    assert host.registry.get("wanted").provisioned is not None


@pytest.mark.parametrize("body", [
    b"[" * 3000,
    b'{"size": "' + b"9" * 400 + b'"}',
    b'{"size": "' + b"9" * 400 + b'.5"}',
    b'{"bytes": ' + b"9" * 400 + b"}",
    b'{"bytes": 1e400}',
    b'{"bytes": ' + b"9" * 5000 + b"}",
])
async def test_admin_bodies_that_used_to_answer_500_get_400(make_host, body):
    """Issue 9 item 9 (admin part): nesting and huge numbers are a client error with a clear message."""
    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    await guest.hello("g1", 4096)
    for path in ("/api/v1/guests/g1/target", "/api/v1/guests/g1"):
        method = "POST" if path.endswith("target") else "PUT"
        status, answer = await _call(method, host.url + path, data=body, token=None)
        assert status in (400, 413), (path, status, answer)
        assert (answer["error"] if status == 400 else "request body size" in answer), answer
    await guest.close()

"""Admin API writes of the inventory (PUT/DELETE /api/v1/guests/{id}), bodies that used to 500,
the admin token on every call that changes something, and the status code of every call."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from hostkit import ERROR, HINT_START, TARGET, WELCOME, RawGuest, eventually

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
        status, answer = await _call(method, host.url + path, data=body, token=host.admin_token)
        assert status in (400, 413), (path, status, answer)
        assert (answer["error"] if status == 400 else "request body size" in answer), answer
    await guest.close()


# -- the admin token: every call that changes something needs it --------------------------------

MUTATING = [
    ("PUT", "/api/v1/guests/newvm", {"memory": "16MiB"}),
    ("DELETE", "/api/v1/guests/g1", None),
    ("POST", "/api/v1/guests/g1/target", {"size": "4MiB"}),
    ("POST", "/api/v1/guests/g1/hint", {}),
    ("POST", "/api/v1/policy", {"guest_memory_budget": "1GiB"}),
]


@pytest.mark.parametrize("with_file", [False, True], ids=["generated", "admin-token-file"])
async def test_every_mutating_call_needs_the_token_and_a_refused_one_changes_nothing(make_host, admin_token,
                                                                                     with_file):
    """Issue 17 item 2: no token → 401, a wrong one → 403, with the host's default settings too
    (no --admin-token-file: a generated token, never "open to whoever reaches the port")."""
    host = await make_host(**({"admin_token_file": admin_token} if with_file else {}))
    assert host.admin_token == TOKEN if with_file else len(host.admin_token) >= 32
    guest = await RawGuest.connect(host.unix)
    assert (await guest.hello("g1", 4096, features=["hinting"]))[0] == WELCOME
    budget = host.policy.to_json()["guest_memory_budget"]
    for method, path, body in MUTATING:
        for token, status in ((None, 401), ("wrong-token-123", 403), (host.admin_token[:-1], 403),
                              (host.admin_token + "x", 403), ("", 401)):
            got, answer = await _call(method, host.url + path, body, token=token)
            assert got == status, (method, path, token, got, answer)
            assert "admin token" in answer["error"], answer
        async with aiohttp.ClientSession() as http:  # other schemes are not a bearer token
            async with http.request(method, host.url + path, json=body,
                                    headers={"Authorization": f"Basic {host.admin_token}"}) as response:
                assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    # nothing happened: no entry, g1 still known and connected, no TARGET, no hint, same policy
    assert "newvm" not in host.registry.inventory and host.registry.get("newvm") is None
    assert host.registry.get("g1").connected and host.registry.get("g1").target_pages is None
    assert host.policy.to_json()["guest_memory_budget"] == budget
    with pytest.raises(TimeoutError):
        await guest.recv(timeout=0.2)  # no TARGET, no HINT_START reached the guest
    # reads stay open; the right token works
    assert (await _call("GET", f"{host.url}/api/v1/guests/g1", token=None))[0] == 200
    assert (await _call("POST", f"{host.url}/api/v1/guests/g1/target", {"size": "4MiB"},
                        token=host.admin_token))[0] == 202
    assert await guest.recv() == [TARGET, 1024]
    await guest.close()


async def test_status_code_of_every_admin_call(make_host, tmp_path, caplog):
    """Issue 17 item 4: each call's documented status, good and bad, with INFO logging on (a log
    call that raised made every PUT a 500 only when INFO records were really built)."""
    caplog.set_level(logging.INFO)
    host = await make_host()
    url = host.url
    guest = await RawGuest.connect(host.unix)
    assert (await guest.hello("g1", 4096, features=["hinting"]))[0] == WELCOME
    plain = await RawGuest.connect(host.unix)
    assert (await plain.hello("plain", 4096))[0] == WELCOME
    token = host.admin_token
    calls = [
        ("GET", "/healthz", None, 200),
        ("GET", "/readyz", None, 200),
        ("GET", "/metrics", None, 200),
        ("GET", "/api/v1/guests", None, 200),
        ("GET", "/api/v1/guests/g1", None, 200),
        ("GET", "/api/v1/guests/nobody", None, 404),
        ("GET", "/api/v1/guests/bad%20id", None, 404),
        ("PUT", "/api/v1/guests/vm1", {"memory": "16MiB"}, 201),
        ("PUT", "/api/v1/guests/vm1", {"memory": "32MiB"}, 200),
        ("PUT", "/api/v1/guests/vm2", {"memory": "32TiB"}, 400),
        ("PUT", "/api/v1/guests/vm2", {"memory": "16EiB"}, 400),
        ("PUT", "/api/v1/guests/vm2", {"memory": "16MiB", "ram_file": "/etc/passwd"}, 400),
        ("PUT", "/api/v1/guests/vm2", {"memory": "16MiB", "ram_file": "relative.ram"}, 400),
        ("PUT", "/api/v1/guests/vm2", {}, 400),
        ("PUT", "/api/v1/guests/vm2", [1], 400),
        ("PUT", "/api/v1/guests/-bad", {"memory": "16MiB"}, 400),
        ("PUT", "/api/v1/guests/plain", {"memory": "16MiB"}, 409),
        ("POST", "/api/v1/guests/g1/target", {"size": "4MiB"}, 202),
        ("POST", "/api/v1/guests/g1/target", {"bytes": 0}, 202),
        ("POST", "/api/v1/guests/g1/target", {"size": "1GiB"}, 400),
        ("POST", "/api/v1/guests/g1/target", {"bytes": -1}, 400),
        ("POST", "/api/v1/guests/g1/target", {}, 400),
        ("POST", "/api/v1/guests/nobody/target", {"bytes": 0}, 404),
        ("POST", "/api/v1/guests/g1/hint", {}, 202),
        ("POST", "/api/v1/guests/plain/hint", {}, 409),
        ("POST", "/api/v1/guests/nobody/hint", {}, 404),
        ("GET", "/api/v1/policy", None, 200),
        ("GET", "/api/v1/policy?history=5000", None, 400),
        ("POST", "/api/v1/policy", {"guest_memory_budget": "1GiB"}, 200),
        ("POST", "/api/v1/policy", {"guest_memory_budget": "0"}, 400),
        ("POST", "/api/v1/policy", {"no_such_knob": 1}, 400),
        ("DELETE", "/api/v1/guests/plain", None, 409),
        ("DELETE", "/api/v1/guests/vm1", None, 204),
        ("DELETE", "/api/v1/guests/vm1", None, 404),
        ("PATCH", "/api/v1/guests/g1", {}, 405),
    ]
    for method, path, body, status in calls:
        got, answer = await _call(method, url + path, body, token=token)
        assert got == status, (method, path, body, got, answer)
        if status >= 400 and method != "PATCH" and path != "/readyz":
            assert isinstance(answer, dict) and answer["error"], (method, path, answer)
    # PUT answers the entry itself (the token is never shown)
    got, entry = await _call("PUT", f"{url}/api/v1/guests/vm3", {"memory": "16MiB", "token": "vm3-secret"}, token=token)
    assert got == 201 and entry == {
        "id": "vm3", "memory_bytes": 16 << 20, "pages": 4096, "listen": None, "ram_file": None, "token": True,
        "uid": None, "min_memory_bytes": None, "max_memory_bytes": None, "qmp": None, "ram_map": None}
    got, answer = await _call("PUT", f"{url}/api/v1/guests/vm2", {"memory": "32TiB"}, token=token)
    assert "16TiB" in answer["error"], answer
    assert (await guest.recv())[0] == TARGET and (await guest.recv())[0] == TARGET
    assert (await guest.recv())[0] == HINT_START
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    await guest.close()
    await plain.close()

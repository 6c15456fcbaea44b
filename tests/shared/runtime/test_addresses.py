"""Channel address syntax: unix:/path, tcp:HOST:PORT, vsock:CID:PORT."""

import pytest

from shared.runtime.addresses import Address, default_socket_path, parse_address, split_host_port


@pytest.mark.parametrize("text, expected", [
    ("unix:/run/balloon/host.sock", Address("unix", path="/run/balloon/host.sock")),
    ("tcp:127.0.0.1:9460", Address("tcp", host="127.0.0.1", port=9460)),
    ("tcp:[::1]:9460", Address("tcp", host="::1", port=9460)),
    ("tcp:localhost:0", Address("tcp", host="localhost", port=0)),
    ("vsock:3:1024", Address("vsock", cid=3, port=1024)),
])
def test_parse_round_trips(text, expected):
    assert parse_address(text) == expected
    assert str(parse_address(text)) == text


@pytest.mark.parametrize("text", [
    "", "/run/x.sock", "unix:", "tcp:9460", "tcp:host:", "tcp:host:70000", "tcp:host:port",
    "vsock:x:1", "vsock:3", "udp:1.2.3.4:5", "tcp:[::1:5",
])
def test_rejects_with_value_error(text):
    with pytest.raises(ValueError):
        parse_address(text)


def test_split_host_port():
    assert split_host_port("127.0.0.1:9470") == ("127.0.0.1", 9470)
    assert split_host_port("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        split_host_port(":80")


@pytest.mark.parametrize("uid, environ, path", [
    (0, {"XDG_RUNTIME_DIR": "/run/user/0"}, "/run/balloon/host.sock"),  # root: the deploy/ path
    (1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/balloon/host.sock"),
    (1000, {}, "/tmp/balloon-1000/host.sock"),
    (1000, {"XDG_RUNTIME_DIR": "relative"}, "/tmp/balloon-1000/host.sock"),
])
def test_one_default_socket_path_for_host_guest_and_load(uid, environ, path):
    assert default_socket_path(uid, environ) == path

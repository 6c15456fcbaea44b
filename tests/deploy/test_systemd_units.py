"""deploy/systemd: `systemd-analyze verify` prints nothing for either unit (it exits 0 even on
unknown keys, so silence is the bar), and the sandbox keeps `systemd-analyze security` low."""

import shutil
import subprocess

import pytest
from deployfiles import DEPLOY, unavailable

UNITS = DEPLOY / "systemd"


def _systemd_analyze():
    path = shutil.which("systemd-analyze")
    if path is None:
        unavailable("systemd-analyze not installed (apt-get install systemd)")
    return path


@pytest.fixture
def units(tmp_path):
    """The units with ExecStart pointed at stub executables (verify checks the binary exists)
    and the template instantiated as balloon-guest@g1, as `systemctl start` would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("balloon-host", "balloon-guest"):
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    out = {}
    for source, target in (("balloon-host.service", "balloon-host.service"),
                           ("balloon-guest@.service", "balloon-guest@g1.service")):
        text = (UNITS / source).read_text()
        assert "ExecStart=/opt/balloon-hints/bin/" in text
        path = tmp_path / target
        path.write_text(text.replace("/opt/balloon-hints/bin/", f"{bin_dir}/"))
        out[target] = path
    return out


def _verify(*paths):
    return subprocess.run([_systemd_analyze(), "verify", *map(str, paths)], capture_output=True, text=True,
                          timeout=120, env={"SYSTEMD_LOG_LEVEL": "notice", "PATH": "/usr/bin:/bin"})


def test_units_verify_clean(units):
    result = _verify(*units.values())
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", \
        result.stdout + result.stderr


def test_verify_catches_a_typo(units, tmp_path):
    broken = tmp_path / "broken.service"
    broken.write_text(units["balloon-host.service"].read_text().replace("ProtectSystem=strict", "ProtectSystem=strictly"))
    result = _verify(broken)
    assert "strictly" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["balloon-host.service", "balloon-guest@g1.service"])
def test_sandbox_exposure_is_low(units, name):
    """`systemd-analyze security` scores 0 (locked down) .. 10 (unprotected); keep each unit <= 2.5
    (2.1 now). Whether the sandbox lets the daemons run: test_container.py, under a real systemd."""
    result = subprocess.run([_systemd_analyze(), "security", "--offline=yes", "--threshold=25", str(units[name])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr


@pytest.mark.parametrize("name", ["balloon-host.service", "balloon-guest@.service"])
def test_required_sandboxing_options(name):
    text = (UNITS / name).read_text()
    for option in ("User=balloon", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                   "ProtectHome=yes", "CapabilityBoundingSet=\n"):
        assert option in text, f"{name} lacks {option.strip()}"
    assert "PrivateDevices=yes" not in text, "a private /dev hides the shared RAM files in /dev/shm"


def test_host_owns_the_socket_runtime_directory():
    host = (UNITS / "balloon-host.service").read_text()
    guest = (UNITS / "balloon-guest@.service").read_text()
    assert "RuntimeDirectory=balloon" in host
    # A guest instance stopping must not delete the host's socket directory.
    assert "RuntimeDirectory=" not in guest
    assert "unix:/run/balloon/host.sock" in host and "unix:/run/balloon/host.sock" in guest


def test_roots_balloonctl_finds_the_hosts_admin_token():
    """The unit's PrivateTmp hides the balloon user's default token directory, so the unit names
    /run/balloon, which is where balloonctl run as root looks (shared.runtime.admin_token.default_admin_token_dir)."""
    from shared.runtime.admin_token import default_admin_token_dir

    host = (UNITS / "balloon-host.service").read_text()
    assert f"Environment=BALLOON_HOST_ADMIN_TOKEN_DIR={default_admin_token_dir(0, {})}\n" in host
    assert "RuntimeDirectoryMode=0750" in host  # the token directory may not be writable by others


def test_a_refused_guest_is_not_restarted_in_a_loop():
    """balloon-guest exits 2 when the host refuses it for good (bad-size, auth-failed, ...) or an
    option is wrong; systemd must not restart that every RestartSec, only a crash."""
    settings = dict(line.split("=", 1) for line in (UNITS / "balloon-guest@.service").read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Restart"] == "on-failure"
    assert "2" in settings["RestartPreventExitStatus"].split()

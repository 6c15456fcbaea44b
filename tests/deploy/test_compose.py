"""deploy/compose.yaml against the compose-spec schema, and wired the way the stack needs:
guests share the host's socket and tmpfs RAM dir, Prometheus and Grafana get the shipped files."""

import subprocess
import tomllib

import yaml
from deployfiles import COMPOSE, DEPLOY, PROMETHEUS_CONFIG, ROOT, tool


def check_compose_schema(path):
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_spec_schema():
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_compose_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("cap_drop: [ALL]", "cap_drop: ALL"))
    result = check_compose_schema(broken)
    assert result.returncode != 0
    assert "cap_drop" in result.stdout + result.stderr


def _compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_three_guests_with_different_workloads_share_socket_and_ram_with_the_host():
    services = _compose()["services"]
    host = services["balloon-host"]
    guests = {name: svc for name, svc in services.items() if svc.get("command") == ["balloon-guest"]}
    assert {svc["environment"]["BALLOON_GUEST_WORKLOAD"] for svc in guests.values()} == {"idle", "churn", "burst"}
    socket_path = host["environment"]["BALLOON_HOST_LISTEN"].removeprefix("unix:")
    ram_dir = host["environment"]["BALLOON_HOST_RAM_DIR"]
    for name, guest in guests.items():
        env = guest["environment"]
        assert env["BALLOON_GUEST_CONNECT"] == f"unix:{socket_path}", name
        assert env["BALLOON_GUEST_ID"] == name, "the guest id is the service name the scrape config targets"
        assert env["BALLOON_GUEST_HTTP"].startswith("0.0.0.0:"), name
        assert guest["volumes"] == host["volumes"], name
    mounts = {target: source for source, target in (v.split(":")[:2] for v in host["volumes"])}
    assert any(socket_path.startswith(target + "/") for target in mounts)
    assert ram_dir in mounts


def test_ram_volume_is_tmpfs_owned_by_the_image_user():
    ram = _compose()["volumes"]["ram"]["driver_opts"]
    assert ram["type"] == "tmpfs"
    assert "uid=10001" in ram["o"] and "gid=10001" in ram["o"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "--uid 10001" in dockerfile and "--gid 10001" in dockerfile


def test_scrape_targets_are_the_compose_services():
    services = _compose()["services"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            for target in group["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in services, f"{job['job_name']} scrapes {target}, not a compose service"
                env = services[host]["environment"]
                http = env.get("BALLOON_HOST_HTTP") or env.get("BALLOON_GUEST_HTTP")
                assert http.endswith(f":{port}"), target


def test_prometheus_and_grafana_mount_the_shipped_files():
    services = _compose()["services"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{service} mounts missing {source}"
    assert any(v.startswith("./prometheus:/etc/prometheus") for v in services["prometheus"]["volumes"])
    assert any(v.startswith("./grafana/provisioning:/etc/grafana/provisioning") for v in services["grafana"]["volumes"])
    # Published ports only on loopback: the demo stack has no authentication.
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_the_compose_schema_is_bundled_not_fetched(tmp_path):
    """check-jsonschema's vendor.compose-spec ships in the package: it works with no network."""
    import os
    import shutil

    import pytest

    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to run without a network namespace")
    result = subprocess.run([unshare, "--net", tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_holds_every_package_pyproject_installs():
    """A package pyproject.toml installs but the Dockerfile does not copy (balloonctl/, when it
    left host_daemon/) would make an image whose console script cannot import."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [pattern.rstrip("*") for pattern in include]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for package in packages:
        assert f"COPY {package} ./{package}\n" in dockerfile, package
        assert f" {package}/__init__.py" in dockerfile, package  # the stub of the dependencies layer

"""`make container-test`: the image from deploy/Dockerfile, built with podman (runc, the project's
deploy/podman/containers.conf) on a base made locally by debootstrap, runs a host and a guest
container that meet at a shared socket volume and a tmpfs RAM volume; both are scraped. Then the
daemon half of deploy/compose.yaml (host and three guests) is brought up with podman-compose, and
the deploy/systemd units run, sandbox and all, under a real systemd in a privileged container.

Skipped unless BALLOON_CONTAINER_TEST=1 (the make target sets it): it needs root, podman, the
Debian mirror and PyPI, and takes minutes the first time. Step timings go to
build/container/timings.json and are printed (docs/OPERATIONS.md records them).
"""

import json
import os
import subprocess
import time
import uuid

import pytest
from deployfiles import (
    COMPOSE,
    DEPLOY,
    ROOT,
    free_port,
    http_get,
    referenced_balloon_metrics,
    scrape,
    tool,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(os.environ.get("BALLOON_CONTAINER_TEST") != "1",
                       reason="container build and run: `make container-test` (root, podman, minutes)"),
    pytest.mark.timeout(1800),
]

BASE_IMAGE = "localhost/balloon-base:bookworm"
IMAGE = "localhost/balloon-hints:test"
CACHE = ROOT / "build" / "container"
TIMINGS: dict[str, float] = {}


def podman_env():
    return {**os.environ, "CONTAINERS_CONF": str(DEPLOY / "podman" / "containers.conf")}


def podman(*args, check=True, timeout=600):
    result = subprocess.run([tool("podman"), *args], capture_output=True, text=True, timeout=timeout,
                            env=podman_env())
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def timed(step, command, **kwargs):
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=podman_env(), **kwargs)
    TIMINGS[step] = round(time.monotonic() - start, 1)
    assert result.returncode == 0, f"{step} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def image():
    tool("podman"), tool("runc"), tool("debootstrap")
    assert os.geteuid() == 0, "podman with runc and debootstrap need root here"
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}").stdout.strip()
    assert info == "runc", f"containers.conf should select runc, podman uses {info}"
    CACHE.mkdir(parents=True, exist_ok=True)
    timed("base image (debootstrap + podman import, or cached)",
          [str(DEPLOY / "podman" / "build-base.sh"), BASE_IMAGE, str(CACHE)], cwd=ROOT, timeout=1200)
    ca = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    secret = ["--secret", f"id=pip-ca,src={ca}"] if os.path.exists(ca) else []
    timed("image build (podman build, pip from PyPI)",
          [tool("podman"), "build", "--format", "docker", "--network", "host", *secret,
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f", "deploy/Dockerfile", "-t", IMAGE, "."],
          cwd=ROOT, timeout=1500)
    yield IMAGE
    (CACHE / "timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")
    print("\ncontainer-test timings (s):")
    for step, seconds in TIMINGS.items():
        print(f"  {seconds:7.1f}  {step}")


def test_image_runs_non_root_with_the_project_ulimits(image):
    out = podman("run", "--rm", "--network", "none", image, "sh", "-c",
                 "id -u; grep -E 'Max (open files|processes)' /proc/self/limits; balloon-host --help >/dev/null && echo ok").stdout
    lines = out.split("\n")
    assert lines[0] == "10001"
    assert "20000" in next(line for line in lines if "open files" in line)
    assert "32768" in next(line for line in lines if "processes" in line)
    assert "ok" in lines


@pytest.fixture
def stack(image):
    """A host and an idle guest container sharing a socket volume and a tmpfs RAM volume."""
    tag = uuid.uuid4().hex[:8]
    sockets, ram = f"balloon-test-sock-{tag}", f"balloon-test-ram-{tag}"
    host, guest = f"balloon-test-host-{tag}", f"balloon-test-guest-{tag}"
    host_port, guest_port = free_port(), free_port()
    podman("volume", "create", sockets)
    podman("volume", "create", "--opt", "type=tmpfs", "--opt", "device=tmpfs",
           "--opt", "o=uid=10001,gid=10001,mode=0770", ram)
    common = ["run", "-d", "--network", "host", "--health-interval", "disable",
              "-v", f"{sockets}:/run/balloon", "-v", f"{ram}:/var/lib/balloon/ram"]
    try:
        start = time.monotonic()
        podman(*common, "--name", host, "-e", f"BALLOON_HOST_HTTP=127.0.0.1:{host_port}",
               "-e", "BALLOON_HOST_RAM_DIR=/var/lib/balloon/ram", image, "balloon-host")
        podman(*common, "--name", guest, "-e", f"BALLOON_GUEST_HTTP=127.0.0.1:{guest_port}",
               "-e", "BALLOON_GUEST_ID=ct-g1", "-e", "BALLOON_GUEST_MEMORY=128MiB",
               "-e", "BALLOON_GUEST_WORKLOAD=idle", "-e", "BALLOON_GUEST_SHARED_RAM=true", image, "balloon-guest")
        yield {"host": host, "guest": guest, "start": start,
               "host_url": f"http://127.0.0.1:{host_port}", "guest_url": f"http://127.0.0.1:{guest_port}"}
    finally:
        for name in (host, guest):
            logs = podman("logs", "--tail", "20", name, check=False)
            print(f"--- {name} ---\n{logs.stdout}{logs.stderr}")
        podman("rm", "-f", "-t", "5", host, guest, check=False)
        podman("volume", "rm", "-f", sockets, ram, check=False)


def _value(samples, name, **labels):
    for sample_labels, value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return None


def test_host_and_guest_containers_converge_and_are_scraped(stack):
    def converged():
        host = scrape(stack["host_url"] + "/metrics")
        guest = scrape(stack["guest_url"] + "/metrics")
        at_host = _value(host, "balloon_reported_bytes", guest="ct-g1")
        at_guest = _value(guest, "balloon_guest_reported_bytes")
        if at_host and at_host == at_guest and _value(guest, "balloon_guest_connected") == 1:
            return host, guest
        return None

    host, guest = wait_for(converged, 120, "the host's reported bytes to equal the guest's")
    TIMINGS["run host + guest until converged"] = round(time.monotonic() - stack["start"], 1)
    memory = _value(host, "balloon_guest_memory_bytes", guest="ct-g1")
    assert memory == 128 * 2**20
    assert _value(host, "balloon_reported_bytes", guest="ct-g1") >= memory / 2
    # Real reclaim happened in the shared tmpfs volume: holes read back from the kernel.
    assert _value(host, "balloon_reclaimed_bytes", guest="ct-g1") > 0
    # The image's HEALTHCHECK passes in both containers.
    for name in (stack["host"], stack["guest"]):
        assert podman("healthcheck", "run", name, check=False).returncode == 0, f"{name} unhealthy"
    # Every balloon_* metric the dashboard and rules read is exposed by one of the two (declared
    # counts: error counters have no series until an error happens; the live Prometheus test
    # provokes them).
    exposed = set(scrape(stack["host_url"] + "/metrics", declared=True)) | set(
        scrape(stack["guest_url"] + "/metrics", declared=True))
    missing = {name: sorted(uses) for name, uses in referenced_balloon_metrics().items() if name not in exposed}
    assert not missing, f"not exposed by the containers: {missing}"


def test_compose_stack_daemons_come_up_and_report(image):
    """The host and the three guests of deploy/compose.yaml, as shipped, with podman-compose.

    Prometheus and Grafana are left out: their images come from Docker Hub, which this machine
    cannot reach. Their config is exercised by test_live_prometheus.py against the same daemons.
    """
    compose = tool("podman-compose")
    project = f"balloontest{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {**podman_env(), "BALLOON_IMAGE": image, "BALLOON_HOST_PORT": str(port)}
    base = [compose, "-f", str(COMPOSE), "-p", project]
    guests = {"guest-idle", "guest-churn", "guest-burst"}
    start = time.monotonic()
    up = subprocess.run([*base, "up", "-d", "--no-build", "balloon-host", *sorted(guests)], capture_output=True,
                        text=True, env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]

        def all_reporting():
            listed = json.loads(http_get(f"http://127.0.0.1:{port}/api/v1/guests"))["guests"]
            ready = {g["id"] for g in listed if g["connected"] and g["reported_bytes"] > 0 and g["reclaimed_bytes"] > 0}
            return ready >= guests

        wait_for(all_reporting, 120, "all three compose guests connected, reporting and reclaimed")
        TIMINGS["compose: host + 3 guests until all report"] = round(time.monotonic() - start, 1)
        names = podman("ps", "--filter", f"label=io.podman.compose.project={project}",
                       "--format", "{{.Names}}").stdout.split()
        assert len(names) == 4, names
        for name in names:
            assert podman("healthcheck", "run", name, check=False).returncode == 0, f"{name} unhealthy"
    finally:
        down = subprocess.run([*base, "down", "-v", "-t", "5"], capture_output=True, text=True, env=env, timeout=300)
        print(down.stdout[-1000:], down.stderr[-1000:])
        # `down` can leave containers behind that a restart policy brought back meanwhile: force.
        label = f"label=io.podman.compose.project={project}"
        left = podman("ps", "-a", "-q", "--filter", label, check=False).stdout.split()
        if left:
            podman("rm", "-f", "-t", "2", *left, check=False)
        podman("network", "rm", "-f", f"{project}_default", check=False)
        for volume in ("sockets", "ram"):
            podman("volume", "rm", "-f", f"{project}_{volume}", check=False)


def _in(container: str, script: str, check=True):
    return podman("exec", container, "sh", "-c", script, check=check)


def test_systemd_units_run_sandboxed_under_a_real_systemd(image):
    """`systemd-analyze verify` only reads the units; this starts them. Sandboxing options often
    break a daemon at run time (a seccomp filter killing it with SIGSYS, a read-only path it
    writes, a socket it cannot reach), so the host and a guest must come up, converge with real
    reclaim in /dev/shm/balloon, and stop cleanly on SIGTERM. systemd needs namespaces to apply the
    sandbox, hence --privileged (test container only)."""
    systemd_image = "localhost/balloon-systemd-test:test"
    timed("systemd test image (systemd from Debian + the app venv)",
          [tool("podman"), "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
           "--build-arg", f"APP_IMAGE={image}", "-f", str(DEPLOY / "podman" / "systemd-test.Containerfile"),
           "-t", systemd_image, str(DEPLOY / "podman")], cwd=ROOT, timeout=900)
    name = f"balloon-test-systemd-{uuid.uuid4().hex[:8]}"
    host_port, guest_port = free_port(), free_port()
    podman("run", "-d", "--name", name, "--privileged", "--systemd=always", "--network", "host",
           "-v", f"{DEPLOY / 'systemd'}:/units:ro", systemd_image)
    try:
        wait_for(lambda: _in(name, "systemctl is-system-running", check=False).stdout.strip()
                 in ("running", "degraded"), 60, "systemd in the container to finish booting")
        _in(name, f"""
            cp /units/balloon-host.service '/units/balloon-guest@.service' /etc/systemd/system/
            cp /units/balloon.sysusers.conf /etc/sysusers.d/balloon.conf && systemd-sysusers
            cp /units/balloon.tmpfiles.conf /etc/tmpfiles.d/balloon.conf && systemd-tmpfiles --create
            echo BALLOON_HOST_HTTP=127.0.0.1:{host_port} > /etc/balloon/host.env
            sed 's/127.0.0.1:9471/127.0.0.1:{guest_port}/; s/512MiB/64MiB/' /units/guest.env.example > /etc/balloon/guest-g1.env
            systemctl daemon-reload
            systemctl start balloon-host 'balloon-guest@g1'
        """)

        def converged():
            host = scrape(f"http://127.0.0.1:{host_port}/metrics")
            guest = scrape(f"http://127.0.0.1:{guest_port}/metrics")
            at_host = _value(host, "balloon_reported_bytes", guest="g1")
            if at_host and at_host == _value(guest, "balloon_guest_reported_bytes"):
                return host
            return None

        try:
            host = wait_for(converged, 60, "g1 reported bytes equal at host and guest under systemd")
        except BaseException:
            print(_in(name, "systemctl --no-pager status balloon-host 'balloon-guest@g1'; "
                            "journalctl --no-pager -n 30", check=False).stdout)
            raise
        assert _value(host, "balloon_reclaimed_bytes", guest="g1") > 0
        users = _in(name, "stat -c %U /run/balloon/host.sock /dev/shm/balloon/g1.ram").stdout.split()
        assert users == ["balloon", "balloon"]
        _in(name, "systemctl stop 'balloon-guest@g1' balloon-host")
        results = _in(name, "systemctl show -p Result --value balloon-host 'balloon-guest@g1'").stdout.split()
        assert results == ["success", "success"], "a unit did not stop cleanly on SIGTERM"
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)

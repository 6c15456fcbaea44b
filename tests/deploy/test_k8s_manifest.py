"""deploy/k8s: the manifests validate strictly (unknown fields are errors) against the Kubernetes
schemas bundled with kubernetes-validate, and the DaemonSet runs the host locked down."""

import subprocess

import yaml
from deployfiles import DEPLOY, tool

MANIFEST = DEPLOY / "k8s" / "balloon-host-daemonset.yaml"


def _validate(path):
    return subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(path)],
                          capture_output=True, text=True, timeout=300)


def test_manifests_validate_strictly():
    result = _validate(MANIFEST)
    assert result.returncode == 0, result.stdout + result.stderr


def test_validation_rejects_an_unknown_field(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace("periodSeconds: 5", "periodSecond: 5"))
    result = _validate(broken)
    assert result.returncode != 0 and "periodSecond" in result.stdout + result.stderr


def test_daemonset_runs_the_host_non_root_with_probes_and_node_paths():
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["args"] == ["balloon-host"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["BALLOON_HOST_LISTEN"] == "unix:/run/balloon/host.sock"
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/run/balloon", env["BALLOON_HOST_RAM_DIR"]}

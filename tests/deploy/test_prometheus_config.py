"""deploy/prometheus as shipped: promtool accepts the config and rules, the rule unit tests pass,
and every alert is unit-tested both ways and links a runbook section that exists."""

import re
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml
from deployfiles import (
    OPERATIONS,
    PROMETHEUS_CONFIG,
    ROOT,
    RULE_FILES,
    RULE_TESTS,
    RULES,
    load_rules,
    metric_names,
    referenced_balloon_metrics,
    tool,
)


def promtool(*args):
    result = subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_promtool_check_config():
    out = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert "SUCCESS" in out


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(rule_file):
    out = promtool("check", "rules", str(rule_file))
    assert "SUCCESS" in out


def test_promtool_test_rules():
    out = promtool("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in out and "FAILED" not in out


def test_promtool_test_rules_catches_a_broken_threshold(tmp_path):
    """The rule tests can fail: raise one alert's threshold tenfold and promtool must object."""
    broken = RULES.read_text().replace("p99_5m > 0.05", "p99_5m > 0.5")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = subprocess.run([tool("promtool"), "test", "rules", str(tmp_path / RULE_TESTS.name)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "BalloonAckLatencyHigh" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_quiet():
    alerts = {rule.name for rule in load_rules() if rule.kind == "alert"}
    assert len(alerts) >= 5
    firing, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown staying quiet"


def test_required_alerts_exist():
    """Issue 7: a guest gone, ack latency p99 high, protocol errors, window stalls, reclaim stuck."""
    exprs = {rule.name: rule.expr for rule in load_rules() if rule.kind == "alert"}
    needs = {
        "guest gone": "balloon_guest_connected",
        "ack latency p99": "ack_latency_seconds:p99",
        "protocol errors": "protocol_errors",
        "window stalls": "window_stall",
        "reclaim stuck": "reclaim_lag",
    }
    for what, fragment in needs.items():
        assert any(fragment in expr for expr in exprs.values()), f"no alert for {what}"


def _anchors(markdown: str) -> set[str]:
    """GitHub-style heading anchors."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*)$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_alert_has_labels_annotations_and_a_runbook_that_exists():
    anchors = _anchors(OPERATIONS.read_text())
    for rule in load_rules():
        if rule.kind != "alert":
            continue
        assert rule.raw["labels"]["severity"] in {"warning", "critical"}, rule.name
        notes = rule.raw["annotations"]
        assert notes.get("summary") and notes.get("description"), rule.name
        runbook = notes.get("runbook_url", "")
        # absolute: Alertmanager and its receivers have nothing to resolve a relative link against
        assert runbook.startswith(f"{SHIPPED_BASE}#"), f"{rule.name}: {runbook}"
        assert runbook.split("#", 1)[1] in anchors, f"{rule.name}: no heading for {runbook}"


SHIPPED_BASE = re.search(r"^RUNBOOK_BASE_SHIPPED := (\S+)$", (ROOT / "Makefile").read_text(),
                         flags=re.MULTILINE).group(1)


def test_shipped_runbook_base_is_an_absolute_url_to_operations_md():
    parts = urlsplit(SHIPPED_BASE)
    assert parts.scheme == "https" and parts.netloc and parts.path.endswith("docs/OPERATIONS.md")


def test_make_rules_swaps_the_runbook_base_and_the_unit_tests_still_pass(tmp_path):
    base = "https://wiki.example.org/ops/balloon"
    build = ROOT / "build" / "prometheus"
    result = subprocess.run(["make", "-s", "rules", f"RUNBOOK_BASE={base}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = load_rules(build / RULES.name)
    urls = [rule.raw["annotations"]["runbook_url"] for rule in rules if rule.kind == "alert"]
    assert urls and all(url.startswith(f"{base}#") for url in urls), urls
    assert SHIPPED_BASE not in (build / RULE_TESTS.name).read_text()
    out = promtool("test", "rules", str(build / RULE_TESTS.name))
    assert "SUCCESS" in out


def test_make_rules_refuses_a_relative_base():
    result = subprocess.run(["make", "-s", "rules", "RUNBOOK_BASE=docs/OPERATIONS.md"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "RUNBOOK_BASE=https://" in result.stdout + result.stderr


def test_recording_rules_follow_the_naming_convention_and_are_defined_before_use():
    rules = load_rules()
    recorded = [rule.name for rule in rules if rule.kind == "record"]
    for name in recorded:
        assert re.fullmatch(r"[a-z_]+:balloon_[a-z0-9_]+:[a-z0-9_]+|[a-z_]+:balloon_[a-z0-9_]+", name), name
    assert len(set(recorded)) == len(recorded)
    for rule in rules:
        used = {name for name in metric_names(rule.expr) if ":" in name}
        assert used <= set(recorded), f"{rule.name} uses undefined recorded series {used - set(recorded)}"


def test_scrape_config_names_both_jobs_and_labels_guests():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"balloon-host", "balloon-guest"} <= set(jobs)
    guest_job = jobs["balloon-guest"]
    targets = [group for group in guest_job["static_configs"]]
    assert all(group.get("labels", {}).get("guest") for group in targets)
    assert any(relabel.get("target_label") == "guest" for relabel in guest_job["relabel_configs"])
    assert {path.name for path in RULE_FILES} >= set(config["rule_files"])


def test_dashboard_and_rules_use_no_deprecated_metric_name():
    from guest_agent.metrics import DEPRECATED as GUEST_DEPRECATED
    from host_daemon.metrics import DEPRECATED as HOST_DEPRECATED

    deprecated = set(HOST_DEPRECATED) | {f"balloon_guest_{old}" for old in GUEST_DEPRECATED}
    used = referenced_balloon_metrics()
    assert {name: used[name] for name in deprecated & set(used)} == {}

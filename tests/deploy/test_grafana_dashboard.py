"""deploy/grafana as shipped: the dashboard type-checks against Grafana's published schema
(@grafana/schema with tsc), uses the templated datasource and $__rate_interval, and only names
recorded series the rules define. Whether each query returns data: test_live_prometheus.py."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from deployfiles import (
    DASHBOARD,
    DEPLOY,
    all_panels,
    dashboard_queries,
    load_dashboard,
    load_rules,
    metric_names,
    unavailable,
    variable_queries,
)

SCHEMA_PROJECT = Path(__file__).parent / "grafana-schema"


def test_no_exported_datasource_placeholders():
    assert "${DS_" not in DASHBOARD.read_text()
    assert "__inputs" not in load_dashboard()


def test_every_panel_and_query_uses_the_templated_datasource():
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_rates_use_rate_interval():
    for query in dashboard_queries():
        for window in re.findall(r"\b(?:rate|irate|increase)\([^\[]*\[([^\]]+)\]", query.expr):
            assert window == "$__rate_interval", f"{query.panel}: {query.expr}"


def test_guest_variable_drives_repeated_per_guest_rows():
    dashboard = load_dashboard()
    guest = {v["name"]: v for v in dashboard["templating"]["list"]}["guest"]
    assert guest["multi"] and guest["includeAll"]
    assert "guest" in variable_queries(dashboard)["guest"]
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert any(row.get("repeat") == "guest" for row in rows)
    titles = " ".join(row["title"].lower() for row in rows)
    for section in ("fleet", "rate", "errors", "duration", "backpressure", "apply latency"):
        assert section in titles, f"no {section} row"


def test_panel_ids_unique_and_inside_the_grid():
    panels = all_panels(load_dashboard())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]


def test_recorded_series_used_by_the_dashboard_are_defined_by_the_rules():
    recorded = {rule.name for rule in load_rules() if rule.kind == "record"}
    used = {name for query in dashboard_queries() for name in metric_names(query.expr) if ":" in name}
    assert used, "the dashboard should read the recording rules for its heavy queries"
    assert used <= recorded, used - recorded


def test_provisioning_points_at_the_dashboard_and_a_fixed_datasource_uid():
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["uid"] == "prometheus"
    current = {v["name"]: v for v in load_dashboard()["templating"]["list"]}["datasource"]["current"]
    assert current["value"] == prometheus["uid"]
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/balloon.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    (provider,) = providers["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]


def _npm_project_ready() -> str:
    """node_modules of tests/deploy/grafana-schema, installed with `npm ci` when missing.

    make test runs this when npm exists (npm ci needs the npm registry; a few seconds);
    it skips when node/npm are missing or npm ci fails, and make deploy-test fails instead.
    """
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        unavailable("node/npm not installed: cannot type-check the dashboard with tsc")
    lock = SCHEMA_PROJECT / "package-lock.json"
    marker = SCHEMA_PROJECT / "node_modules" / ".package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=SCHEMA_PROJECT,
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            unavailable(f"npm ci failed (npm registry unreachable?): {result.stderr.strip()[-500:]}")
    return npm


def _tsc_check():
    npm = _npm_project_ready()
    return subprocess.run([npm, "run", "--silent", "check"], cwd=SCHEMA_PROJECT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})


def test_dashboard_type_checks_against_grafana_schema():
    result = _tsc_check()
    assert result.returncode == 0, result.stdout + result.stderr


def test_type_check_rejects_a_misspelled_key_and_a_bad_enum_value(tmp_path):
    """The check can fail: a copy with a typo in a key and an unknown color mode is refused."""
    dashboard = load_dashboard()
    timeseries = next(p for p in all_panels(dashboard) if p["type"] == "timeseries")
    timeseries["fieldConfig"]["defaults"]["color"]["mode"] = "palette-classik"
    row = next(p for p in dashboard["panels"] if p["type"] == "row")
    row["colapsed"] = row.pop("collapsed")
    npm = _npm_project_ready()
    source = tmp_path / "broken.json"
    source.write_text(json.dumps(dashboard))
    result = subprocess.run([npm, "run", "--silent", "check"], cwd=SCHEMA_PROJECT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "NO_COLOR": "1", "DASHBOARD_JSON": str(source)})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "palette-classik" in output and "colapsed" in output



def test_compose_runs_the_grafana_version_the_dashboard_is_checked_against():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    tag = compose["services"]["grafana"]["image"].rsplit(":", 1)[1]
    schema = json.loads((SCHEMA_PROJECT / "package.json").read_text())["devDependencies"]["@grafana/schema"]
    assert tag == schema.lstrip("^~")

"""What tests/deploy reads out of deploy/: paths, rules, dashboard queries, and PromQL helpers.

The PromQL helpers are deliberately small: they only need to find metric names in an expression
and to split an alert's threshold comparison from the series it compares, for expressions written
the way deploy/ writes them. They are not a PromQL parser.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted(p for p in PROMETHEUS_DIR.glob("*rules*.yml") if "test" not in p.name)
RULES = PROMETHEUS_DIR / "balloon-rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "balloon-rules-test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "balloon.json"
COMPOSE = DEPLOY / "compose.yaml"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
VENV_BIN = ROOT / ".venv" / "bin"


STRICT = os.environ.get("BALLOON_DEPLOY_STRICT") == "1"
STACK = DEPLOY / "stack.py"


def load_stack():
    """deploy/stack.py as a module (deploy/ is not a package: it is run as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("balloon_deploy_stack", STACK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable(reason: str):
    """Skip for a missing tool; under `make deploy-test` (BALLOON_DEPLOY_STRICT=1) fail instead,
    so the slow suite cannot pass by skipping what it exists to check."""
    if STRICT:
        pytest.fail(f"{reason} (BALLOON_DEPLOY_STRICT=1: missing tools are failures)")
    pytest.skip(reason)


def tool(name: str) -> str:
    """Path of a command-line tool, or skip the test saying how to get it."""
    path = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if path is None:
        hint = {"promtool": "apt-get install prometheus (make system-deps does it)",
                "prometheus": "apt-get install prometheus (make system-deps does it)"}.get(name, "")
        unavailable(f"{name} not installed {hint}".strip())
    return path


def daemons_available() -> str | None:
    """Why the daemons cannot run here, or None when balloon-host and balloon-guest answer --help."""
    for name in ("balloon-host", "balloon-guest"):
        path = VENV_BIN / name
        if not path.exists():
            return f"{name} is not installed in .venv (run make install)"
        result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            return f"{name} --help failed: {(result.stderr or result.stdout).strip()[-300:]}"
    return None


# --- rules -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    kind: str  # "record" or "alert"
    name: str
    expr: str
    raw: dict


def load_rules(path: Path = RULES) -> list[Rule]:
    rules = []
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            kind = "alert" if "alert" in rule else "record"
            rules.append(Rule(kind, rule[kind], " ".join(rule["expr"].split()), rule))
    return rules


# --- dashboard ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return panels


def dashboard_queries(dashboard: dict | None = None) -> list[PanelQuery]:
    dashboard = dashboard or load_dashboard()
    return [PanelQuery(panel.get("title", "?"), target.get("refId", "?"), target["expr"])
            for panel in all_panels(dashboard) for target in panel.get("targets", [])
            if target.get("expr")]


def variable_queries(dashboard: dict | None = None) -> dict[str, str]:
    """Templating variables of type query → their PromQL (label_values(...) form)."""
    dashboard = dashboard or load_dashboard()
    out = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            out[variable["name"]] = query["query"] if isinstance(query, dict) else query
    return out


def label_values_as_promql(query: str) -> str:
    """Grafana's ``label_values(SELECTOR, LABEL)`` as the instant query Grafana runs for it."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
    if not match:
        raise ValueError(f"not a label_values() query: {query}")
    return f"count by ({match.group(2)}) ({match.group(1)})"


# --- PromQL ------------------------------------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w:$.])[A-Za-z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names (including recorded ones) that ``expr`` selects."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)      # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)     # range and subquery durations
    text = re.sub(r"\$\{?\w+\}?", " ", text)    # Grafana variables
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue  # an operator keyword, or a function / aggregation name
        names.add(name)
    return names


def balloon_metric_names(expr: str) -> set[str]:
    return {name for name in metric_names(expr) if name.startswith("balloon_")}


_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_SET_OPS = ("and", "or", "unless")


def _top_level_split(expr: str, operators: tuple[str, ...], words: bool) -> list[str]:
    """Split ``expr`` at operators outside (), {}, [] and strings."""
    parts, depth, start, i = [], 0, 0, 0
    quote = None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif depth == 0:
            for op in operators:
                if words:
                    if re.match(rf"(?<![\w:]){op}(?![\w:])", expr[i:]) and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")):
                        parts.append(expr[start:i])
                        i += len(op)
                        start = i
                        break
                elif expr.startswith(op, i) and not (op in ("<", ">") and expr.startswith(op + "=", i)):
                    parts.append(expr[start:i])
                    i += len(op)
                    start = i
                    break
            else:
                i += 1
                continue
            continue
        i += 1
    parts.append(expr[start:])
    return [part.strip() for part in parts]


def _strip_modifiers(operand: str) -> str:
    operand = re.sub(r"^bool\b", "", operand.strip()).strip()
    operand = re.sub(r"^(on|ignoring)\s*\([^)]*\)", "", operand).strip()
    operand = re.sub(r"^(group_left|group_right)\s*(\([^)]*\))?", "", operand).strip()
    return operand


def _is_literal(operand: str) -> bool:
    return re.fullmatch(r"[\d\s.*+/()e-]+", operand) is not None


def threshold_operands(expr: str) -> list[str]:
    """The series an alert compares: for ``A > 0.05`` → [A]; for ``(A == 0) or (B == 0)`` → [A, B].

    Set operators are split first, then comparisons; numeric literals (the thresholds) are
    dropped. An expression with no comparison is returned whole.
    """
    operands = []
    for side in _top_level_split(expr, _SET_OPS, words=True):
        side = _strip_modifiers(side)
        while side.startswith("(") and side.endswith(")") and _balanced(side[1:-1]):
            side = side[1:-1].strip()
        if len(_top_level_split(side, _SET_OPS, words=True)) > 1:
            operands.extend(threshold_operands(side))
            continue
        pieces = [_strip_modifiers(p) for p in _top_level_split(side, _COMPARISONS, words=False)]
        operands.extend(p for p in pieces if p and not _is_literal(p))
    return operands


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += c == "("
        depth -= c == ")"
        if depth < 0:
            return False
    return depth == 0


# --- live processes ------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("_sum", "_count", ""), "gauge": ("",), "untyped": ("",), "info": ("_info",)}


def scrape(url: str, declared: bool = False) -> dict[str, list[tuple[dict, float]]]:
    """Sample name → [(labels, value)] from a /metrics endpoint.

    With ``declared``, families announced by HELP/TYPE but with no sample yet (a labelled counter
    nothing has incremented) are included with an empty list, under their sample names.
    """
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(http_get(url)):
        if declared:
            for suffix in _SUFFIXES.get(family.type, ("",)):
                samples.setdefault(family.name + suffix, [])
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    """Poll ``condition()`` until it returns something truthy (returned) or fail after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - the endpoint may not be up yet
            last_error = error
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error!r})" if last_error else ""))


def referenced_balloon_metrics() -> dict[str, set[str]]:
    """Every balloon_* sample name the dashboard or the rules select → where it is used."""
    used: dict[str, set[str]] = {}
    for rule in load_rules():
        for name in balloon_metric_names(rule.expr):
            used.setdefault(name, set()).add(f"rule {rule.name}")
    for query in dashboard_queries():
        for name in balloon_metric_names(query.expr):
            used.setdefault(name, set()).add(f"panel {query.panel!r}")
    for variable, query in variable_queries().items():
        for name in balloon_metric_names(query):
            used.setdefault(name, set()).add(f"variable ${variable}")
    return used

"""Text log lines cannot be forged by what a peer sent (issue 9 item 9, log part)."""

from __future__ import annotations

import json
import logging

import pytest

from shared.runtime.logfmt import JsonFormatter, TextFormatter, field


def _record(msg: str, **extra) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "balloon.host.session", "levelname": "INFO", "levelno": 20,
                                    "msg": msg})
    for key, value in extra.items():
        setattr(record, key, value)
    return record


FORGERIES = [
    "bye: done\n2026-12-01 12:00:00,000 ERROR   balloon.host: host compromised",
    "x\r\nlevel=error",
    "a\u2028b",
    "tab\tand\x1b[2Jclear",
    'quote" guest=admin',
    "back\\slash",
    "",
]


@pytest.mark.parametrize("reason", FORGERIES)
def test_a_field_from_the_peer_stays_on_its_line_and_round_trips(reason):
    line = TextFormatter().format(_record("session end", guest="g1", reason=reason))
    assert "\n" not in line and "\r" not in line and "\u2028" not in line and "\x1b" not in line
    assert line.endswith(" guest=g1 reason=" + json.dumps(reason))
    assert json.loads(line.split(" reason=", 1)[1]) == reason


def test_plain_values_stay_unquoted():
    assert field("unix:/run/balloon/host.sock#pid=1,uid=0") == '"unix:/run/balloon/host.sock#pid=1,uid=0"'
    assert field("vm1") == "vm1" and field(42) == "42" and field("tcp:127.0.0.1:9") == "tcp:127.0.0.1:9"


def test_the_message_itself_is_escaped_and_tracebacks_still_follow():
    record = _record("guest error %s", code="x")
    record.args = ("bad\ncode",)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    text = TextFormatter().format(record)
    first, *rest = text.split("\n")
    assert first.endswith("guest error bad\\ncode code=x") and rest[0].startswith("Traceback")


def test_json_lines_are_one_object_per_line():
    line = JsonFormatter().format(_record("session end", reason=FORGERIES[0]))
    assert "\n" not in line and json.loads(line)["reason"] == FORGERIES[0]

"""docs/PROTOCOL.md cannot rot: its generated parts are regenerated here and must match.

The hex dumps, the state table and the error table are produced from the code by
tests/shared/protocol_examples.py; if the code changes what goes on the wire, this fails
until the doc is regenerated with ``.venv/bin/python tests/shared/protocol_examples.py --update``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from shared.errors import CODES
from shared.messages import MessageType

HERE = Path(__file__).resolve().parent
DOC = (HERE.parents[1] / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")


def _examples_module():
    spec = importlib.util.spec_from_file_location("protocol_examples", HERE / "protocol_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLES = _examples_module()


REGENERATE = "regenerate with: .venv/bin/python tests/shared/protocol_examples.py --update"


@pytest.mark.parametrize("title,dump", EXAMPLES.examples(), ids=lambda v: v if len(v) < 20 else None)
def test_hex_dump_in_doc_matches_the_code(title, dump):
    assert f"```text\n{dump}\n```" in DOC, f"the {title} example in docs/PROTOCOL.md is stale; {REGENERATE}"


def test_every_generated_part_is_up_to_date():
    assert EXAMPLES.update_doc(DOC) == DOC, REGENERATE


def test_required_examples_are_there():
    titles = [title for title, _ in EXAMPLES.examples()]
    for needed in ("HELLO", "WELCOME", "REPORT", "ACK", "ERROR"):
        assert needed in titles
    report = dict(EXAMPLES.examples())["REPORT"]
    assert "(inline)" in report and "= escape" in report and "count word" in report


def test_state_table_matches_the_rules():
    assert EXAMPLES.state_table() in DOC, REGENERATE


def test_every_error_code_is_documented():
    assert EXAMPLES.error_table() in DOC, REGENERATE
    for code in CODES:
        assert f"`{code}`" in DOC


def test_every_message_type_is_documented():
    for kind in MessageType:
        assert f"| {int(kind)} | {kind.name} |" in DOC
        assert f"{kind.name} ({int(kind)})" in DOC or f"({int(kind)})" in DOC


@pytest.mark.parametrize("feature", ["ranges52", "pfn32", "hinting", "stats", "shared-ram", "deflate-on-oom"])
def test_features_are_documented(feature):
    assert f"| `{feature}` |" in DOC


@pytest.mark.parametrize("form", ["unix:/path", "tcp:HOST:PORT", "vsock:CID:PORT"])
def test_addresses_are_documented(form):
    assert f"`{form}`" in DOC

"""The house: every citation can be followed, and the modules form no circle.

- A comment, docstring or doc line that cites a file must cite one a reader of this repo can
  open: ``docs/PROTOCOL.md §8``, not a design brief or a team's notes that live elsewhere. The
  scan covers code, tests, docs, deploy/, README.md, Makefile and pyproject.toml.
- The project's modules import each other without a circle, counting imports made inside
  functions and under ``TYPE_CHECKING`` (a function-level import hides an arrow, it does not
  remove it).
- No module reads another module's private attribute (``tracker._compiled``): what a module
  needs from another is that module's public surface.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the project's own packages (the import graph's nodes) and what else the scans read
PACKAGES = ("shared", "guest_agent", "host_daemon", "balloonctl", "bench")
SCANNED = (*PACKAGES, "tests", "docs", "deploy", "README.md", "Makefile", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".json", ".service", ".conf", ".sh",
                 ".example", ".Containerfile", ".mjs", ".ts", ".js", ".html", ".css", ""}
SKIP_PARTS = {"__pycache__", "node_modules", "vendor", ".venv"}

#: Documents that were never part of this repo, however they are written. Built from pieces
#: so that this file does not cite them itself.
MISSING_DOCS = re.compile(
    r"\b" + "DES" + r"IGN\b"                  # the design brief ("DESIGN §6")
    + r"|\b" + "CON" + r"TRACT\b"             # the interface contract ("CONTRACT.md")
    + r"|\bcon" + r"tract §"                  # ... and its sections
    + r"|\.\./" + r"shared/"                  # the team's folder beside the checkout
    + r"|\b(?:" + "VM|STY" + "LE|NO" + r"TES)\.md\b"
)
#: a file name ending in .md, possibly with a path in front
MD_REFERENCE = re.compile(r"(?<![\w/.:-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def scanned_files() -> list[Path]:
    """The text files a reader of the repo reads (generated and vendored files excepted)."""
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in candidates:
            if not file.is_file() or SKIP_PARTS & set(file.relative_to(ROOT).parts):
                continue
            if file.suffix in TEXT_SUFFIXES or file.name in ("Makefile", "Dockerfile"):
                files.append(file)
    return files


def inside(root: Path, path: Path) -> bool:
    """``path`` exists and is in the repo (``../`` may not climb out of it)."""
    return path.exists() and path.resolve().is_relative_to(root.resolve())


def missing_citations(text: str, here: Path, root: Path, basenames: set[str]) -> list[str]:
    """Citations in ``text`` (a file in folder ``here``) of documents ``root`` does not hold.

    A bare ``NAME.md`` is fine when some file of the repo has that name; a path is fine when
    it exists from the repo's root or from ``here``. URLs and absolute paths are not checked
    (they point outside on purpose: a deployment's copy, a temporary file).
    """
    found = [match.group(0) for match in MISSING_DOCS.finditer(text)]
    for match in MD_REFERENCE.finditer(text):
        name = match.group(1)
        if "/" not in name:
            if name not in basenames:
                found.append(name)
        elif not any(inside(root, base / name) for base in (root, here)):
            found.append(name)
    return found


def test_every_cited_file_is_in_the_repo():
    files = scanned_files()
    basenames = {path.name for path in ROOT.rglob("*.md") if ".venv" not in path.parts}
    me = Path(__file__).resolve()
    problems = []
    for file in files:
        if file == me:
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            for cited in missing_citations(line, file.parent, ROOT, basenames):
                problems.append(f"{file.relative_to(ROOT)}:{lineno}: {cited!r} in {line.strip()!r}")
    assert not problems, "citations of files that are not in the repo:\n" + "\n".join(problems)


@pytest.mark.parametrize(("line", "cited"), [
    ("the bar (" + "DES" + "IGN §6): within 3x", ["DES" + "IGN"]),
    ("over urllib (" + "CON" + "TRACT.md)", ["CON" + "TRACT", "CON" + "TRACT.md"]),
    ("measured in ../" + "shared/VM.md", ["../" + "shared/", "VM.md", "../" + "shared/VM.md"]),
    ("see docs/NOWHERE.md §2", ["docs/NOWHERE.md"]),
    ("see docs/PROTOCOL.md §8 and API.md", []),
    ("https://example.org/wiki/OPERATIONS.md and /opt/x/NOPE.md", []),
])
def test_the_citation_scan_finds_what_it_should(line, cited):
    """The scan is only as good as its patterns: planted citations are found, real ones are not."""
    basenames = {"PROTOCOL.md", "API.md", "OPERATIONS.md"}
    assert sorted(missing_citations(line, ROOT / "docs", ROOT, basenames)) == sorted(cited)

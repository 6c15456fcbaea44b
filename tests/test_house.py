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

import ast
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


# -- the import graph --------------------------------------------------------------------------

def project_modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted name → file for every module of the project's packages."""
    modules = {}
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            if SKIP_PARTS & set(file.parts):
                continue
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = file
    return modules


def imports_of(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (functions and TYPE_CHECKING too).

    ``from a.b import c`` is an arrow to module ``a.b.c`` when there is one, else to ``a.b``.
    """
    is_package = file.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    arrows = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c of a non-module c: a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                arrows.add(target)
    return arrows


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {name: imports_of(name, file, modules) for name, file in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_import_scan_counts_imports_inside_functions(tmp_path):
    """A circle closed by a function-level import, a relative import of a sibling module and
    ``from package import module`` are all arrows; an import of a name is one to its module."""
    plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/server.py": "from .admin import App\nERROR = 1\n",
        "pkg/admin.py": "def provision():\n    from .server import ERROR\n",
        "pkg/cli.py": "from pkg import server\nimport pkg.admin\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.cli"] == {"pkg.server", "pkg.admin"}
    assert circles(graph) == [["pkg.admin", "pkg.server"]]
    plant(tmp_path, {"pkg/admin.py": "from .errors import ERROR\n", "pkg/errors.py": "ERROR = 1\n"})
    assert circles(import_graph(tmp_path, ("pkg",))) == []


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles (function-level imports count):\n" + "\n".join(
        " <-> ".join(component) for component in found)


#: What the sans-IO core (``shared/*.py``) may not import: I/O, event loops, clocks, threads, the
#: daemons' plumbing (``shared.runtime``) or anything of the programs built on it.
NOT_IN_THE_CORE = ("asyncio", "socket", "selectors", "time", "threading", "logging", "os", "aiohttp",
                   "prometheus_client", "uvloop", "shared.runtime", "host_daemon", "guest_agent",
                   "balloonctl")


def imported_names(file: Path, package: str) -> set[str]:
    """Every module name ``file`` imports (relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package, base] if base else [package])
            names.update([base] + [f"{base}.{alias.name}" for alias in node.names])
    return names


def test_the_protocol_core_is_sans_io():
    """shared/ is the protocol as a pure object; what the daemons share besides lives in
    shared/runtime/, and the core never reaches for it."""
    problems = []
    for file in sorted((ROOT / "shared").glob("*.py")):
        for name in sorted(imported_names(file, "shared")):
            if any(name == banned or name.startswith(banned + ".") for banned in NOT_IN_THE_CORE):
                problems.append(f"shared/{file.name} imports {name}")
    assert not problems, "\n".join(problems)


# -- private attributes ------------------------------------------------------------------------

#: Private names of the standard library's public API (namedtuple's ``_replace``, ``os._exit``).
STDLIB_PRIVATE = frozenset({"_replace", "_asdict", "_fields", "_make", "_exit", "_getframe"})
#: Reads of a library's private attribute that have no public equivalent, with the reason.
ALLOWED_PRIVATE = {
    # argparse has no public way to list a parser's options or tell a flag from an option;
    # resolve_settings layers the environment and a file under the command line with them.
    ("shared/runtime/config.py", "argparse._StoreTrueAction"),
    ("shared/runtime/config.py", "argparse._StoreFalseAction"),
    ("shared/runtime/config.py", "argparse._AppendAction"),
    ("shared/runtime/config.py", "parser._actions"),
}


def own_attributes(tree: ast.AST) -> set[str]:
    """Attribute names a module's own code defines: set on an object, in a class body, slots."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(item.name)
                for target in getattr(item, "targets", [getattr(item, "target", None)]):
                    if isinstance(target, ast.Name):
                        names.add(target.id)
                    if isinstance(target, ast.Name) and target.id == "__slots__":
                        names.update(elt.value for elt in ast.walk(item.value)
                                     if isinstance(elt, ast.Constant) and isinstance(elt.value, str))
    return names


def module_aliases(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Names bound to a module by an import (``import argparse``, ``from . import tracker``)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(alias.asname or alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            aliases.update(alias.asname or alias.name for alias in node.names
                           if any(name.endswith("." + alias.name) for name in modules))
    return aliases


def private_reads(file: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """``obj._name`` in ``file`` that is not the module's own business.

    ``self._x`` and ``cls._x`` are a class's own (inherited ones included); ``module._x`` is
    always another module's; any other ``obj._x`` is fine only when this module defines
    attribute ``_x`` itself.
    """
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    own = own_attributes(tree) | STDLIB_PRIVATE
    aliases = module_aliases(tree, modules)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            continue
        receiver = node.value.id if isinstance(node.value, ast.Name) else None
        if receiver in ("self", "cls"):
            continue
        if node.attr in own and receiver not in aliases:
            continue
        if node.attr in STDLIB_PRIVATE:
            continue
        found.append((node.lineno, f"{ast.unparse(node.value)}.{node.attr}"))
    return sorted(found)


def test_no_module_reads_another_modules_private_attributes():
    modules = project_modules()
    problems = []
    for file in modules.values():
        where = str(file.relative_to(ROOT))
        problems += [f"{where}:{line}: {expr}" for line, expr in private_reads(file, modules)
                     if (where, expr) not in ALLOWED_PRIVATE]
    assert not problems, "private attributes read across modules:\n" + "\n".join(problems)


def test_the_private_scan_tells_own_attributes_from_another_modules(tmp_path):
    """``tracker._compiled`` and ``self.flow._holds`` are found; the module's own ``_x`` (set on
    self, in a class body or its slots, read through another instance) is not."""
    plant(tmp_path, {"pkg/__init__.py": "", "pkg/tracker.py": "", "pkg/server.py": """
from . import tracker
import os

class Session:
    __slots__ = ("_window",)

    def __init__(self, flow):
        self.flow = flow
        self._window = 0

    def same(self, other):
        return other._window == self._window and self._helper()

    def paused(self):
        return self.flow._holds or tracker._compiled or os._exit
"""})
    modules = project_modules(tmp_path, ("pkg",))
    found = [expr for _, expr in private_reads(tmp_path / "pkg" / "server.py", modules)]
    assert found == ["self.flow._holds", "tracker._compiled"]


def test_balloonctl_imports_nothing_from_the_daemons():
    """The CLI is its own package: installing or reading it must not need a daemon's modules."""
    graph = import_graph()
    reached, todo = set(), [name for name in graph if name.partition(".")[0] == "balloonctl"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += graph[name]
    assert {name.partition(".")[0] for name in reached} <= {"balloonctl", "shared"}, sorted(reached)

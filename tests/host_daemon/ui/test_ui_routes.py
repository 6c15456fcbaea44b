"""/ui as served: a fixed list of files with a same-origin-only policy, nothing from a CDN,
the vendored chart library byte-for-byte what VENDOR.md records, and all of it in the wheel."""

from __future__ import annotations

import hashlib
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import aiohttp

from host_daemon.ui import FILES, STATIC

ROOT = Path(__file__).resolve().parents[3]


async def test_ui_redirects_to_the_slash_and_serves_each_file_with_its_type_and_policy(make_host):
    host = await make_host()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{host.url}/ui?interval=1", allow_redirects=False) as response:
            assert response.status == 302 and response.headers["Location"] == "/ui/?interval=1"
        async with http.get(f"{host.url}/ui/") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/html")
            policy = response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "script-src 'self'" in policy
            assert "connect-src 'self'" in policy
            assert "dashboard.js" in await response.text()
        for name, (path, content_type) in FILES.items():
            async with http.get(f"{host.url}/ui/{name}") as response:
                assert response.status == 200, name
                assert response.headers["Content-Type"] == content_type
                assert await response.read() == (STATIC / path).read_bytes()
        for bad in ("nope.js", "..%2Fadmin.py", "vendor%2FuPlot.min.css", "%2e%2e%2F__init__.py"):
            async with http.get(f"{host.url}/ui/{bad}") as response:
                assert response.status == 404, bad


def test_the_page_loads_nothing_from_another_origin():
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", text), name
        assert "fetch(\"http" not in text and "import(" not in text, name


def test_vendored_files_are_what_vendor_md_records():
    table = (STATIC / "vendor" / "VENDOR.md").read_text()
    recorded = dict(re.findall(r"^\| `([^`]+)` \| `[^`]+` \| `([0-9a-f]{64})` \|$", table, flags=re.MULTILINE))
    assert set(recorded) == {"uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"}
    for name, digest in recorded.items():
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (STATIC / "vendor" / "uPlot.LICENSE").read_text()


def test_every_served_file_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["host_daemon"]
    for path, _ in FILES.values():
        relative = Path("ui/static", path)  # setuptools globs: '*' stays inside one folder
        assert any(relative.parent == Path(pattern).parent and fnmatch(relative.name, Path(pattern).name)
                   for pattern in patterns), relative

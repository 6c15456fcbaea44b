"""The host's live dashboard: ``GET /ui`` on the admin HTTP port, no Grafana needed.

Static files only: the page's script polls the same port's ``/api/v1/guests`` and
``/metrics`` and keeps the last minutes of history in the browser, so the host stores
nothing for it and the page shows exactly what balloonctl and Prometheus read. The chart
library (uPlot) is vendored in ``static/vendor`` (see its VENDOR.md), never loaded from a
CDN; the Content-Security-Policy below makes the browser refuse anything not from this
origin. Files are served from a fixed list, so no request path reaches the filesystem.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"

#: URL name under /ui/ -> (file under static/, content type)
FILES = {
    "index.html": ("index.html", "text/html; charset=utf-8"),
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "uPlot.LICENSE": ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
}

HEADERS = {
    # Same origin only: scripts, styles, and the fetches of the API and /metrics. uPlot sets
    # element styles from script, which style-src 'unsafe-inline' allows.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


async def _index_redirect(request: web.Request) -> web.Response:
    # The page fetches ../api/v1/... relative to /ui/, so the trailing slash matters.
    query = request.rel_url.query_string
    raise web.HTTPFound("/ui/" + (f"?{query}" if query else ""))


async def _file(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or "index.html"
    entry = FILES.get(name)
    if entry is None:
        raise web.HTTPNotFound(text=f"no {name!r} under /ui/")
    path, content_type = entry
    return web.Response(body=(STATIC / path).read_bytes(), headers={**HEADERS, "Content-Type": content_type})


def add_ui_routes(app: web.Application) -> None:
    """Serve the dashboard at /ui/ (and redirect /ui there)."""
    app.router.add_get("/ui", _index_redirect)
    app.router.add_get("/ui/", _file)
    app.router.add_get("/ui/{name}", _file)

"""The host's HTTP side (aiohttp): /metrics, /healthz, /readyz and the admin API.

JSON shapes are in docs/API.md (balloonctl consumes them). Binds 127.0.0.1 by default.
Reads (GET) are open to whoever reaches the port; every other method — the calls that move
balloons, provision guests and aim the hole punch — needs ``Authorization: Bearer <token>``,
always: the token of ``--admin-token-file``, or the one the host generated at start
(auth.AdminToken). One middleware checks it for every route, so a new route cannot forget.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from shared.messages import valid_guest_id
from shared.runtime.config import format_size, parse_size
from shared.vocabulary import HINTING, PAGE_SIZE

from .auth import same_secret
from .inventory import InventoryError, parse_entry
from .listeners import ListenError
from .metrics import render
from .registry import Conflict
from .ui import add_ui_routes

log = logging.getLogger("balloon.host.admin")
MAX_BODY = 4096


#: Methods that read only; everything else must carry the admin token.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class AdminApp:
    def __init__(self, host) -> None:
        self.host = host
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._authenticate])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/api/v1/guests", self.guests)
        app.router.add_get("/api/v1/guests/{id}", self.guest)
        app.router.add_put("/api/v1/guests/{id}", self.provision)
        app.router.add_delete("/api/v1/guests/{id}", self.delete)
        app.router.add_post("/api/v1/guests/{id}/target", self.target)
        app.router.add_post("/api/v1/guests/{id}/hint", self.hint)
        add_ui_routes(app)  # GET /ui: the live dashboard (static page over the two GETs above)
        app.router.add_get("/api/v1/policy", self.policy)
        app.router.add_post("/api/v1/policy", self.set_policy)
        self.app = app

    async def metrics(self, request: web.Request) -> web.Response:
        body = render(self.host.metrics_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.host.ready:
            return web.Response(text="ready")
        return web.Response(text="not ready", status=503)

    async def guests(self, request: web.Request) -> web.Response:
        records = sorted(self.host.registry.guests.values(), key=lambda r: r.id)
        return web.json_response({"guests": [r.to_json() for r in records]})

    def _record(self, request: web.Request):
        guest = request.match_info["id"]
        record = self.host.registry.get(guest) if valid_guest_id(guest) else None
        return guest, record

    async def guest(self, request: web.Request) -> web.Response:
        guest, record = self._record(request)
        if record is None:
            return _error(404, f"no guest {guest!r}")
        return web.json_response(record.to_json())

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        """401 without a bearer token, 403 with a wrong one, for every method but reads —
        before the body is read or the guest looked up, so a refused caller learns nothing."""
        if request.method in READ_METHODS:
            return await handler(request)
        token = self.host.admin_token
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            same_secret(None, token)  # the same work as a comparison
            where = self.host.admin_token_where
            return _error(401, f"{request.method} needs the admin token: send 'Authorization: Bearer "
                               f"<token>' ({where})",
                          headers={"WWW-Authenticate": 'Bearer realm="balloon-host"'})
        if not same_secret(given, token):
            log.warning("admin call with a wrong token refused", extra={
                "method": request.method, "path": request.path[:200], "peer": request.remote})
            return _error(403, "wrong admin token")
        return await handler(request)

    async def _json_body(self, request: web.Request) -> dict:
        try:
            body = json.loads(await request.read() or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text=json.dumps({"error": "the body is not JSON"}),
                                     content_type="application/json") from None
        except RecursionError:  # "[" x 3000 fits in MAX_BODY and nests past the parser's stack
            raise web.HTTPBadRequest(text=json.dumps({"error": "the body nests too deeply"}),
                                     content_type="application/json") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": "the body must be a JSON object"}),
                                     content_type="application/json")
        return body

    async def target(self, request: web.Request) -> web.Response:
        """Set the balloon size: body {"bytes": N} or {"size": "256MiB"} → 202 {"target_pages": n}.

        The size rounds down to whole pages and may not exceed the guest's RAM. A guest that
        is disconnected gets its TARGET right after its next WELCOME.
        """
        guest, record = self._record(request)
        if record is None:
            return _error(404, f"no guest {guest!r}")
        body = await self._json_body(request)
        try:
            if "bytes" in body:
                size = body["bytes"]
                if type(size) is not int or size < 0:
                    raise ValueError("bytes must be a non-negative integer")
            elif "size" in body:
                size = parse_size(str(body["size"]))
            else:
                raise ValueError('give {"bytes": N} or {"size": "256MiB"}')
        except ValueError as error:
            return _error(400, str(error))
        pages = size // PAGE_SIZE
        if pages > record.pages:
            return _error(400, f"a balloon of {format_size(size)} exceeds the guest's "
                               f"{format_size(record.pages * PAGE_SIZE)} of memory")
        self.host.set_target(record.id, pages)  # a disconnected guest gets it after its next WELCOME
        return web.json_response({"target_pages": pages}, status=202)

    async def hint(self, request: web.Request) -> web.Response:
        """Start a free page hinting command: 202 {"cmd_id": n}; 409 if the guest cannot hint now."""
        guest, record = self._record(request)
        if record is None:
            return _error(404, f"no guest {guest!r}")
        session = record.connection
        if session is None or HINTING not in record.features:
            return _error(409, f"guest {guest!r} is not connected with the hinting feature")
        cmd_id = self.host.start_hint(record.id)
        if cmd_id is None:
            return _error(409, f"guest {guest!r} is disconnecting or not reading")
        return web.json_response({"cmd_id": cmd_id}, status=202)

    async def provision(self, request: web.Request) -> web.Response:
        """Add or replace an inventory entry: body as a ``[guest.ID]`` table of ``--guests``.

        201 (new) or 200 with the entry; 400 for a bad entry; 409 when the id is connected
        as an open-mode guest, or its size/listener/RAM file would change under its session.
        """
        guest = request.match_info["id"]
        body = await self._json_body(request)
        registry = self.host.registry
        try:
            entry = parse_entry(guest, body)
        except InventoryError as error:
            return _error(400, str(error))
        old = registry.inventory.get(guest)
        moved = old is not None and old.listen != entry.listen
        try:
            registry.inventory.check(entry)
            if entry.listen is not None and (old is None or moved):
                await self.host.open_guest_listener(entry.listen, guest)
        except InventoryError as error:
            return _error(400, str(error))
        except ListenError as error:
            return _error(409, str(error))
        try:
            created = registry.provision(entry)
        except (Conflict, ValueError) as error:  # InventoryError is a ValueError: a bad entry is 400
            if entry.listen is not None and (old is None or moved):
                await self.host.close_guest_listener(entry.listen)
            return _error(409 if isinstance(error, Conflict) else 400, str(error))
        if moved and old.listen is not None:
            await self.host.close_guest_listener(old.listen)
        self.host.vmms.sync(guest)  # a new or changed qmp: (re)connect the VMM link
        log.info("guest provisioned", extra={"guest": guest, "new": created, "pages": entry.pages})
        return web.json_response(entry.to_json(), status=201 if created else 200)

    async def delete(self, request: web.Request) -> web.Response:
        """Forget a guest now (inventory entry, record, series, open-mode RAM file): 204; 409 if connected."""
        guest = request.match_info["id"]
        registry = self.host.registry
        entry = registry.inventory.get(guest)
        try:
            registry.unprovision(guest)
        except KeyError:
            return _error(404, f"no guest {guest!r:.80}")
        except Conflict as error:
            return _error(409, str(error))
        if entry is not None and entry.listen is not None:
            await self.host.close_guest_listener(entry.listen)
        self.host.vmms.sync(guest)  # its VMM link goes with it
        log.info("guest deleted", extra={"guest": guest, "provisioned": entry is not None})
        return web.Response(status=204)

    async def policy(self, request: web.Request) -> web.Response:
        """The policy's last tick: inputs, one decision per guest with its reason, recent changes
        (``?history=N``: the last N target changes, 0..1024, default 100)."""
        try:
            history = int(request.query.get("history", "100"))
            if not 0 <= history <= 1024:
                raise ValueError
        except ValueError:
            return _error(400, "history must be an integer 0..1024")
        return web.json_response(self.host.policy.to_json(history))

    async def set_policy(self, request: web.Request) -> web.Response:
        """Change the policy at runtime: {"guest_memory_budget": "512MiB"} and/or knobs as in
        --policy-config (e.g. {"policy": "balance", "block_low": "30s"}) → 200 with GET's body."""
        body = await self._json_body(request)
        budget = None
        try:
            if "guest_memory_budget" in body:
                budget = parse_size(body.pop("guest_memory_budget"))
                if budget <= 0:
                    raise ValueError("guest_memory_budget must be above 0")
            config = self.host.policy.config.with_table(body) if body else None
        except (ValueError, TypeError) as error:  # PolicyConfigError is a ValueError
            return _error(400, str(error))
        self.host.policy.reconfigure(config, budget)
        log.info("policy changed through the admin API", extra={"keys": ",".join(sorted(body)),
                                                                "guest_memory_budget": budget})
        return web.json_response(self.host.policy.to_json())

"""The HTTPS server of the management API, on the daemon's event loop (aiohttp).

aiohttp is a maintained asyncio HTTP/1.1 server: it runs on the loop ``serve``
already runs (uvloop or asyncio), so a request calls the admin layer directly,
with no thread and no second process, and it parses HTTP itself (no hand-written
parsing here). Each request:

1. is counted against :data:`MAX_ACTIVE` (in progress) and :data:`MAX_WAITING`
   (queued); past both it is refused at once with 503, so a flood costs the loop
   a TLS handshake and a few lines per request, never unbounded work;
2. authenticates its ``Authorization: Bearer`` token (401) and checks the route's
   role (403), then its JSON body (400);
3. runs its route (:mod:`.routes`), the admin requests one at a time with those of
   the admin socket; a refusal is 400, an unknown VM or snapshot 404;
4. is logged with the token's name, the method, path, status and duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from ...vm import NotFoundError
from ..actions.served import NOT_EXPORTED
from ..admin import AdminError, AdminServer
from .routes import ROUTES, BadRequest, Route, check_body, openapi
from .tls import self_signed, server_context
from .tokens import TokenError, TokenStore

log = logging.getLogger("iscsi_vmtarget.api")
#: Requests running at once; more wait, up to MAX_WAITING, then get 503.
MAX_ACTIVE = 4
MAX_WAITING = 64
MAX_BODY = 1 << 20


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _not_found(exc: AdminError) -> bool:
    text = str(exc)
    return isinstance(exc.__cause__, NotFoundError) or text.startswith(NOT_EXPORTED)


class ApiServer:
    """``serve --api HOST:PORT``: the routes of :mod:`.routes` over HTTPS."""

    def __init__(
        self,
        admin: AdminServer,
        state_dir: str,
        host: str,
        port: int,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        self.admin = admin
        if not log.isEnabledFor(logging.INFO):
            log.setLevel(logging.INFO)  # every call is logged, whatever -v says
        self.host = host
        self.port = port
        self.tokens = TokenStore(state_dir)
        if cert is None or key is None:
            cert, key = self_signed(state_dir, host)
        self.cert = cert
        self.ssl = server_context(cert, key)
        self._active = asyncio.Semaphore(MAX_ACTIVE)
        self._queued = 0
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/openapi.json", self._openapi)
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self._handler(route))
        return app

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi())

    def _handler(self, route: Route) -> Any:
        async def handle(request: web.Request) -> web.Response:
            started = time.monotonic()
            who = "-"
            try:
                if self._queued >= MAX_ACTIVE + MAX_WAITING:
                    response = _error(503, "busy: too many API requests in progress")
                else:
                    self._queued += 1
                    try:
                        async with self._active:
                            who, response = await self._answer(route, request)
                    finally:
                        self._queued -= 1
            except Exception as exc:  # never let a bug take the daemon down
                log.exception("api %s %s failed", request.method, request.path)
                response = _error(500, f"internal error: {exc!r}")
            log.info(
                "api %s %s %s -> %d (%.1f ms)",
                who,
                request.method,
                request.path_qs,
                response.status,
                1000 * (time.monotonic() - started),
            )
            return response

        return handle

    async def _answer(self, route: Route, request: web.Request) -> tuple[str, web.Response]:
        scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
        try:
            token = self.tokens.check(secret.strip()) if scheme.lower() == "bearer" else None
        except TokenError as exc:
            log.error("%s", exc)
            return "-", _error(500, "the API tokens cannot be read")
        if token is None:
            return "-", _error(401, "a valid token is needed: Authorization: Bearer <token>")
        if not token.allows(route.role):
            return token.name, _error(
                403, f"token {token.name!r} has role {token.role}; this needs {route.role}"
            )
        try:
            raw = await request.read()
            body = json.loads(raw) if raw.strip() else {}
            body = check_body(route, body)
        except ValueError as exc:  # JSON errors and BadRequest
            message = str(exc) if isinstance(exc, BadRequest) else f"malformed JSON: {exc}"
            return token.name, _error(400, message)
        except web.HTTPRequestEntityTooLarge:
            return token.name, _error(413, f"the request body is over {MAX_BODY} bytes")
        try:
            result = await route.handler(
                self.admin.run, dict(request.match_info), dict(request.query), body
            )
        except AdminError as exc:
            return token.name, _error(404 if _not_found(exc) else 400, str(exc))
        return token.name, web.json_response(result, status=route.status)

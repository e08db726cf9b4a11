"""Pure-ASGI middleware (no per-request task overhead): security headers and a request id on
every response."""

from __future__ import annotations

import logging
import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streams_service.observability import context, sentry

# Probes and scrapes, logged at DEBUG only: at INFO they would drown the log.
QUIET_PATHS = frozenset({"/health", "/health/ready", "/metrics"})
access_log = structlog.get_logger("streams_service.access")
# The same logger's stdlib side: its level check is cached, so a disabled access line is cheap.
_access_log = logging.getLogger("streams_service.access")

# Sent on every response, errors included (Durable Streams §12.7 and ordinary API hygiene).
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    # Streams are read cross-origin by browser clients; CORS decides who may read them.
    (b"cross-origin-resource-policy", b"cross-origin"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestContextMiddleware:
    """A request id on every request: the client's `X-Request-ID` if it is a sane token, else a
    new one; returned as `X-Request-ID` on every response and put, with the session id of the
    path, in the context every log line (and Sentry event) of the request reads.

    `access_log` writes one line per request at `access_level` (the stream hot path uses DEBUG,
    so it costs one cached level check). `tag_errors` puts the ids on Sentry's request scope
    when an error escapes (the FastAPI stack; the SDK reports it further out)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        access_level: int = logging.INFO,
        tag_errors: bool = False,
    ) -> None:
        self.app = app
        self.access_level = access_level
        self.tag_errors = tag_errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                raw = value
                break
        path: str = scope["path"]
        ctx = context.RequestContext(
            context.request_id_from(raw),
            session_id=context.session_from_path(path),
            state=scope.setdefault("state", {}),
        )
        header = (b"x-request-id", ctx.request_id.encode("ascii"))
        status = 500  # if the app fails before it answers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = context.enter(ctx)
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if self.tag_errors:
                sentry.tag_request_scope(ctx)
            raise
        finally:
            level = logging.DEBUG if path in QUIET_PATHS else self.access_level
            if _access_log.isEnabledFor(level):
                access_log.log(
                    level,
                    "request",
                    method=scope.get("method"),
                    path=path,
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                )
            context.leave(token)

"""App factory and lifespan: no work at import time; the lifespan owns engines and tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from db.engine import create_engine
from streams_service.config import Settings
from streams_service.durable.live import LiveHub, PostgresListener
from streams_service.durable.routes import PREFIX, StreamRoutes
from streams_service.durable.store import StreamStore
from streams_service.errors import (
    AppError,
    app_error_handler,
    http_exception_handler,
    validation_error_handler,
)
from streams_service.middleware import SecurityHeadersMiddleware

log = structlog.get_logger(__name__)

STREAM_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]
ALLOWED_REQUEST_HEADERS = [
    "Authorization",
    "Content-Type",
    "If-None-Match",
    "Stream-Seq",
    "Stream-TTL",
    "Stream-Expires-At",
    "Stream-Closed",
    "Producer-Id",
    "Producer-Epoch",
    "Producer-Seq",
    "Stream-Forked-From",
    "Stream-Fork-Offset",
    "Stream-Fork-Sub-Offset",
    "X-Request-ID",
]
EXPOSED_HEADERS = [
    "Stream-Next-Offset",
    "Stream-Cursor",
    "Stream-Up-To-Date",
    "Stream-Closed",
    "Stream-TTL",
    "Stream-Expires-At",
    "Stream-SSE-Data-Encoding",
    "Producer-Epoch",
    "Producer-Seq",
    "Producer-Expected-Seq",
    "Producer-Received-Seq",
    "ETag",
    "Location",
    "Retry-After",
    "X-Request-ID",
]


@dataclass
class Services:
    """Everything the lifespan builds; routes reach it through `request.app.state.services`."""

    settings: Settings
    read_engine: AsyncEngine
    hub: LiveHub
    store: StreamStore
    listener: PostgresListener | None
    sweeper: asyncio.Task[None]


def create_app(settings: Settings) -> FastAPI:
    stream_routes: list[StreamRoutes] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        read_engine = create_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
        hub = LiveHub()
        store = StreamStore(settings.database_url, read_engine, hub)
        await store.start()
        listener = None
        if not settings.is_sqlite:
            listener = PostgresListener(settings.database_url, hub)
            await listener.start()
        sweeper = asyncio.create_task(_sweep_forever(store, settings.streams_sweep_interval_s))
        routes = StreamRoutes(
            store,
            hub,
            long_poll_timeout_s=settings.streams_long_poll_timeout_ms / 1000,
            sse_max_duration_s=settings.streams_sse_max_duration_s,
            max_append_bytes=settings.streams_max_append_bytes,
            max_read_bytes=settings.streams_max_read_bytes,
        )
        stream_routes.append(routes)
        app.state.services = Services(settings, read_engine, hub, store, listener, sweeper)
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            hub.notify_all()
            await store.stop()
            if listener is not None:
                await listener.stop()
            await read_engine.dispose()

    app = ChatopsAPI(title="chatops streams service", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings

    async def streams_asgi(scope: Scope, receive: Receive, send: Send) -> None:
        await stream_routes[0].asgi(scope, receive, send)

    # The stream protocol is the hot path: it gets its own, shorter middleware chain.
    app.streams_app = SecurityHeadersMiddleware(
        CORSMiddleware(streams_asgi, **_cors_options(settings))
    )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready(request: Request) -> JSONResponse:
        services: Services = request.app.state.services
        try:
            async with services.read_engine.connect() as conn:
                await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=2)
        except Exception as exc:
            return JSONResponse(
                {"status": "unavailable", "detail": f"database: {type(exc).__name__}"},
                status_code=503,
            )
        return JSONResponse({"status": "ready"})

    app.add_exception_handler(AppError, app_error_handler)
    app.add_exception_handler(HTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_middleware(CORSMiddleware, **_cors_options(settings))
    app.add_middleware(SecurityHeadersMiddleware)
    return app


class ChatopsAPI(FastAPI):
    """FastAPI, except that `/v1/stream/...` goes straight to the protocol handler: every append
    and live read skips routing, dependency and exception layers it has no use for."""

    streams_app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.streams_app is not None
            and scope["type"] == "http"
            and scope["path"].startswith(PREFIX)
        ):
            await self.streams_app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _cors_options(settings: Settings) -> dict[str, Any]:
    return {
        "allow_origins": settings.cors_origin_list,
        "allow_methods": [*STREAM_METHODS, "PATCH"],
        "allow_headers": ALLOWED_REQUEST_HEADERS,
        "expose_headers": EXPOSED_HEADERS,
        "max_age": 600,
    }


async def _sweep_forever(store: StreamStore, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await store.sweep()
            if removed:
                log.info("streams_swept", removed=removed)
        except Exception as exc:
            log.warning("sweep_failed", error=type(exc).__name__)


def app_from_env() -> FastAPI:
    """Factory for uvicorn's worker processes: each builds its app from the environment."""
    return create_app(Settings())

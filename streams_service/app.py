"""App factory and lifespan: no work at import time; the lifespan owns engines and tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from db.engine import create_engine
from streams_service.access.auth import Authenticator, AuthMiddleware
from streams_service.access.limits import RateLimiter
from streams_service.access.principal import Principal
from streams_service.access.routes import router as access_router
from streams_service.access.service import AccessService
from streams_service.config import Settings
from streams_service.drain import RETRY_AFTER_S, Drain, chain_shutdown_signals
from streams_service.durable.live import LiveHub, PostgresListener
from streams_service.durable.routes import PREFIX, StreamRoutes
from streams_service.durable.store import StreamStore
from streams_service.errors import (
    DATABASE_UNAVAILABLE,
    AppError,
    app_error_handler,
    database_unavailable_handler,
    document_errors,
    http_exception_handler,
    validation_error_handler,
)
from streams_service.heap import freeze_startup_heap
from streams_service.llm.client import make_client
from streams_service.llm.models import load_catalog
from streams_service.llm.simulator import SimulatorConfig, run_simulator
from streams_service.middleware import RequestContextMiddleware, SecurityHeadersMiddleware
from streams_service.observability.metrics import Metrics
from streams_service.observability.metrics import router as metrics_router
from streams_service.observability.telemetry import Telemetry, running_telemetry
from streams_service.ops.rollup import sweep_forever as usage_rollup_sweep_forever
from streams_service.ops.routes import router as ops_router
from streams_service.sessions import repository as session_repo
from streams_service.sessions.control import CHANNEL as CONTROL_CHANNEL
from streams_service.sessions.control import ControlBus
from streams_service.sessions.generation import GenerationManager
from streams_service.sessions.history_routes import router as history_router
from streams_service.sessions.recovery import recover_interrupted
from streams_service.sessions.retention import sweep_forever as retention_sweep_forever
from streams_service.sessions.routes import router as sessions_router
from streams_service.sessions.service import SessionService
from streams_service.sessions.upkeep import run_upkeep

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
    sessions: SessionService
    generations: GenerationManager
    limiter: RateLimiter
    auth: Authenticator
    access: AccessService
    drain: Drain


async def _start_services(
    settings: Settings, stack: contextlib.AsyncExitStack, telemetry: Telemetry
) -> Services:
    """Start everything in dependency order; the exit stack stops it in reverse."""
    read_engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        read_only=True,
    )
    stack.push_async_callback(read_engine.dispose)
    # Session data is read and written in real transactions, on a pool of its own.
    app_engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )
    stack.push_async_callback(app_engine.dispose)
    sessionmaker = async_sessionmaker(app_engine, expire_on_commit=False)

    hub = LiveHub()
    store = StreamStore(settings.database_url, read_engine, hub)
    await store.start()
    stack.push_async_callback(store.stop)
    stack.callback(hub.notify_all)  # live readers re-check and end before the store stops
    # Stops and approvals for a generation running on another replica travel through
    # Postgres too; SQLite has a single process, so there is nowhere to forward them.
    control = None if settings.is_sqlite else ControlBus(sessionmaker)
    if control is not None:
        stack.push_async_callback(control.close)
        listener = PostgresListener(
            settings.database_url, hub, {CONTROL_CHANNEL: control.on_payload}
        )
        await listener.start()
        stack.push_async_callback(listener.stop)
    stack.push_async_callback(_cancel, asyncio.create_task(_sweep_forever(store, settings)))

    if settings.simulated:
        # No key: Claude is our simulator, served on a loopback port, through the same SDK path.
        base_url = await stack.enter_async_context(
            run_simulator(
                SimulatorConfig(
                    ttft_ms=settings.simulator_ttft_ms, tokens_per_s=settings.simulator_tokens_per_s
                )
            )
        )
        api_key = "simulated"
    else:
        base_url, api_key = settings.anthropic_base_url, settings.anthropic_api_key or ""
    client = make_client(base_url, api_key, settings.anthropic_max_retries)
    stack.push_async_callback(client.close)
    catalog = load_catalog()

    async def search_history(user_id: str | None, query: str, limit: int) -> list[dict[str, Any]]:
        async with sessionmaker() as db:
            return await session_repo.search_messages(db, user_id, query, limit)

    generations = GenerationManager(
        settings,
        store,
        sessionmaker,
        client,
        search_history,
        catalog.title_model,
        hub.instance,
        telemetry=telemetry,
    )
    try:
        await recover_interrupted(sessionmaker, store, generations)
    except Exception as exc:
        # A database that is down at boot must not stop the process: readiness reports it.
        log.warning("recovery_skipped", error=type(exc).__name__)
    if control is not None:
        control.generations = generations
    # A signal begins the drain (see create_app); the exit waits for it, or begins it now.
    # Pushed after the listener: forwarded stops and approvals still arrive while it runs.
    drain = Drain(hub, generations, settings.drain_timeout_s)
    stack.push_async_callback(drain.finish)
    limiter = RateLimiter(settings, sessionmaker, on_reject=telemetry.metrics.observe_rate_limited)
    auth = Authenticator(settings, sessionmaker, limiter)
    sessions = SessionService(
        settings, store, sessionmaker, generations, catalog, limiter, telemetry=telemetry
    )
    generations.on_first_exchange = sessions.generate_title
    sessions.control = control
    stack.push_async_callback(_cancel, asyncio.create_task(run_upkeep(sessions)))
    stack.push_async_callback(
        _cancel, asyncio.create_task(retention_sweep_forever(sessions, settings))
    )
    stack.push_async_callback(
        _cancel, asyncio.create_task(usage_rollup_sweep_forever(sessionmaker))
    )
    access = AccessService(settings, sessionmaker, auth)
    pools = {"read": read_engine, "app": app_engine}
    telemetry.metrics.watch(generations=generations, hub=hub, store=store, pools=pools)
    stack.push_async_callback(_cancel, asyncio.create_task(telemetry.metrics.sample_loop_lag()))
    return Services(
        settings, read_engine, hub, store, sessions, generations, limiter, auth, access, drain
    )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: Settings, *, handle_signals: bool = False) -> FastAPI:
    """`handle_signals` (set by `chatops serve` and its workers, where the app owns its
    process): SIGTERM and SIGINT begin the drain at once, before uvicorn's own handler runs
    (streams_service/drain.py says why), and the heap is frozen once started
    (`freeze_startup_heap`). Tests build many apps in one process and leave both alone."""
    stream_routes: list[StreamRoutes] = []
    started: list[Services] = []

    def authenticator() -> Authenticator | None:
        # None in dev mode: no credential to check, and the hot path stays as it was.
        auth = started[0].auth if started else None
        return auth if auth is not None and auth.enabled else None

    async def stream_access(who: Principal, scope: Scope) -> None:
        await started[0].auth.authorize_stream(who, scope["method"], scope["path"][len(PREFIX) :])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # First in, last out: logs, Sentry and PostHog outlive the services' shutdown.
            telemetry = await stack.enter_async_context(running_telemetry(settings, metrics))
            services = await _start_services(settings, stack, telemetry)
            if handle_signals:
                stack.callback(chain_shutdown_signals(services.drain.begin))
            stream_routes.append(
                StreamRoutes(
                    services.store,
                    services.hub,
                    long_poll_timeout_s=settings.streams_long_poll_timeout_ms / 1000,
                    sse_max_duration_s=settings.streams_sse_max_duration_s,
                    max_append_bytes=settings.streams_max_append_bytes,
                    max_read_bytes=settings.streams_max_read_bytes,
                    draining=lambda: services.drain.draining,
                )
            )
            app.state.services = services
            started.append(services)
            if handle_signals:  # this app owns its process (`chatops serve`, a worker)
                freeze_startup_heap()
            yield

    metrics = Metrics()  # per app: tests build many apps in one process
    app = ChatopsAPI(title="chatops streams service", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics

    async def stream_protocol(scope: Scope, receive: Receive, send: Send) -> None:
        await stream_routes[0].asgi(scope, receive, send)

    streams_asgi = AuthMiddleware(stream_protocol, authenticator, stream_access)

    # The stream protocol is the hot path: it gets its own, shorter middleware chain, and its
    # replies carry the security headers themselves. CORS only matters to browsers, which always
    # send Origin; requests without one skip it.
    cors = SecurityHeadersMiddleware(CORSMiddleware(streams_asgi, **_cors_options(settings)))

    async def streams_app(scope: Scope, receive: Receive, send: Send) -> None:
        for name, _ in scope["headers"]:
            if name == b"origin":
                await cors(scope, receive, send)
                return
        await streams_asgi(scope, receive, send)

    # Request ids on the hot path too; its access lines only at DEBUG.
    app.streams_app = RequestContextMiddleware(streams_app, access_level=logging.DEBUG)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready(request: Request) -> JSONResponse:
        services: Services = request.app.state.services
        if services.drain.draining:
            # Load balancers stop routing here; requests already here finish.
            return JSONResponse(
                {"status": "draining", "detail": "this replica is shutting down"},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            async with services.read_engine.connect() as conn:
                await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=2)
        except Exception as exc:
            return JSONResponse(
                {"status": "unavailable", "detail": f"database: {type(exc).__name__}"},
                status_code=503,
            )
        return JSONResponse({"status": "ready"})

    app.include_router(history_router)  # first: /v1/sessions/import is not a session id
    app.include_router(sessions_router)
    app.include_router(access_router)
    app.include_router(ops_router)
    app.include_router(metrics_router)
    app.add_exception_handler(AppError, app_error_handler)
    app.add_exception_handler(HTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    for database_error in DATABASE_UNAVAILABLE:
        app.add_exception_handler(database_error, database_unavailable_handler)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Added first, so it runs inside CORS: preflights pass, and a 401 still carries CORS headers.
    app.add_middleware(AuthMiddleware, authenticator=authenticator)
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

    def build_middleware_stack(self) -> ASGIApp:
        # Outside Starlette's ServerErrorMiddleware, so even a 500 carries its request id.
        return RequestContextMiddleware(super().build_middleware_stack(), tag_errors=True)


def _cors_options(settings: Settings) -> dict[str, Any]:
    return {
        "allow_origins": settings.cors_origin_list,
        "allow_methods": [*STREAM_METHODS, "PATCH"],
        "allow_headers": ALLOWED_REQUEST_HEADERS,
        "expose_headers": EXPOSED_HEADERS,
        "max_age": 600,
    }


async def _sweep_forever(store: StreamStore, settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.streams_sweep_interval_s)
        try:
            removed = await store.sweep()
            if removed:
                log.info("streams_swept", removed=removed)
        except Exception as exc:
            log.warning("sweep_failed", error=type(exc).__name__)


def app_from_env() -> FastAPI:
    """Factory for `chatops serve --workers N`: each worker process builds its own app."""
    return create_app(Settings(), handle_signals=True)

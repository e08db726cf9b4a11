"""Typed domain errors carrying their HTTP status; one handler renders them as JSON."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import structlog
from fastapi.exceptions import RequestValidationError
from sqlalchemy import exc as sqlalchemy_exc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = structlog.get_logger(__name__)


class AppError(Exception):
    """Base class: `status`, a stable `code`, a human `detail` and optional response headers."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(AppError):
    status = 400
    code = "bad_request"


class NotFound(AppError):
    status = 404
    code = "not_found"


class MethodNotAllowed(AppError):
    status = 405
    code = "method_not_allowed"


class Conflict(AppError):
    status = 409
    code = "conflict"


class Unauthorized(AppError):
    status = 401
    code = "unauthorized"

    def __init__(self, detail: str) -> None:
        # RFC 6750: tell the client which scheme to use and why this credential failed.
        super().__init__(
            detail, headers={"WWW-Authenticate": 'Bearer realm="chatops", error="invalid_token"'}
        )


class TooManyRequests(AppError):
    status = 429
    code = "rate_limited"


class Forbidden(AppError):
    status = 403
    code = "forbidden"


class Gone(AppError):
    status = 410
    code = "gone"


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"


class ServiceUnavailable(AppError):
    status = 503
    code = "unavailable"


def error_response(exc: AppError) -> Response:
    return JSONResponse(
        {"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers
    )


async def app_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return error_response(exc)


async def http_exception_handler(_request: Request, exc: Exception) -> Response:
    """Framework-raised errors (unknown route, wrong method) in the same JSON shape as ours."""
    assert isinstance(exc, HTTPException)
    try:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    except ValueError:
        code = "http_error"
    return JSONResponse(
        {"error": code, "detail": str(exc.detail)},
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


# Database failures that mean "not now" rather than "never": the server went away, refused the
# connection, or the pool had none to give. Answered 503 with Retry-After, like the stream store.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    sqlalchemy_exc.OperationalError,
    sqlalchemy_exc.InterfaceError,
    sqlalchemy_exc.TimeoutError,
)


async def database_unavailable_handler(_request: Request, exc: Exception) -> Response:
    # The type and SQLSTATE only: a driver message can quote a statement's parameters.
    orig = getattr(exc, "orig", None)
    log.warning(
        "database_unavailable",
        error=type(orig or exc).__name__,
        sqlstate=getattr(orig, "sqlstate", None),
    )
    return error_response(
        ServiceUnavailable(
            "the database is unavailable; nothing was changed, retry shortly",
            headers={"Retry-After": "1"},
        )
    )


async def validation_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        for err in exc.errors()
    )
    return JSONResponse({"error": "validation_error", "detail": problems}, status_code=422)


# The one error body of every 4xx/5xx, as OpenAPI documents it.
ERROR_SCHEMA: dict[str, object] = {
    "title": "Error",
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "stable machine-readable code"},
        "detail": {"type": "string", "description": "what went wrong, for people"},
    },
    "required": ["error", "detail"],
}


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents its own 422 body; ours is `{error, detail}` (validation_error_handler)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["HTTPValidationError"] = ERROR_SCHEMA
    components.pop("ValidationError", None)
    return schema

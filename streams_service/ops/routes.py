"""Ops routes (DESIGN §3): usage, error events, the audit trail, rate limits. Thin: parse,
call the service, shape the answer. Query parameters arrive as text and are validated by the
service, so a bad one is a 400 that names it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from streams_service.access.principal import Caller
from streams_service.ops.schemas import AuditOut, ErrorsOut, RateLimitsOut, UsageOut
from streams_service.ops.service import OpsService

router = APIRouter(prefix="/v1", tags=["ops"])


def _service(request: Request) -> OpsService:
    services = request.app.state.services
    return OpsService(services.settings, services.read_engine, services.limiter)


def _json(model: type[BaseModel], data: dict[str, Any]) -> Response:
    body = model.model_validate(data).model_dump(mode="json", by_alias=True, exclude_unset=True)
    return JSONResponse(body)


@router.get("/usage", response_model=UsageOut)
async def get_usage(
    request: Request,
    who: Caller,
    from_: str | None = Query(None, alias="from", description="ISO date or time (UTC)"),
    to: str | None = Query(None, description="exclusive; a date includes that whole day"),
    group_by: str | None = Query(None, description="day|hour|model|user|session, comma list"),
    user: str | None = Query(None, description="one user's rows (ops and admins)"),
) -> Response:
    out = await _service(request).usage(
        who, raw_from=from_, raw_to=to, raw_group_by=group_by, raw_user=user
    )
    return _json(UsageOut, out)


@router.get("/errors", response_model=ErrorsOut)
async def get_errors(
    request: Request,
    who: Caller,
    from_: str | None = Query(None, alias="from"),
    to: str | None = None,
    type: str | None = None,
    session_id: str | None = None,
    limit: str | None = None,
    cursor: str | None = None,
) -> Response:
    out = await _service(request).errors(
        who,
        raw_from=from_,
        raw_to=to,
        raw_type=type,
        raw_session_id=session_id,
        raw_limit=limit,
        raw_cursor=cursor,
    )
    return _json(ErrorsOut, out)


@router.get("/audit", response_model=AuditOut)
async def get_audit(
    request: Request,
    who: Caller,
    from_: str | None = Query(None, alias="from"),
    to: str | None = None,
    action: str | None = None,
    limit: str | None = None,
    cursor: str | None = None,
) -> Response:
    out = await _service(request).audit(
        who, raw_from=from_, raw_to=to, raw_action=action, raw_limit=limit, raw_cursor=cursor
    )
    return _json(AuditOut, out)


@router.get("/ratelimits", response_model=RateLimitsOut)
async def get_ratelimits(
    request: Request,
    who: Caller,
    from_: str | None = Query(None, alias="from"),
    to: str | None = None,
    bucket: str | None = Query(None, description="hour (default) or day"),
) -> Response:
    out = await _service(request).ratelimits(who, raw_from=from_, raw_to=to, raw_bucket=bucket)
    return _json(RateLimitsOut, out)

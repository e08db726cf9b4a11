"""Session routes (DESIGN §3): thin — parse, call the service, shape the answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from streams_service.access.principal import Caller
from streams_service.drain import accepting_work
from streams_service.sessions.schemas import (
    Approval,
    CreateSession,
    ForkRequest,
    SendAccepted,
    SendMessage,
    SessionOut,
)
from streams_service.sessions.service import SessionService

router = APIRouter(prefix="/v1", tags=["sessions"])
# Routes that start new work: a draining replica answers them 503 `draining` + Retry-After.
NEW_WORK = [Depends(accepting_work)]


def _service(request: Request) -> SessionService:
    service: SessionService = request.app.state.services.sessions
    return service


def _json(model: type[BaseModel], data: dict[str, Any], status: int = 200) -> Response:
    return JSONResponse(model.model_validate(data).model_dump(mode="json"), status_code=status)


@router.post("/sessions", status_code=201, response_model=SessionOut, dependencies=NEW_WORK)
async def create_session(
    request: Request, who: Caller, body: CreateSession | None = None
) -> Response:
    _created, out = await _service(request).create(None, body or CreateSession(), who)
    return _json(SessionOut, out, 201)


@router.put("/sessions/{session_id}", response_model=SessionOut, dependencies=NEW_WORK)
async def put_session(
    session_id: str, request: Request, who: Caller, body: CreateSession | None = None
) -> Response:
    created, out = await _service(request).create(session_id, body or CreateSession(), who)
    return _json(SessionOut, out, 201 if created else 200)


@router.get("/sessions/{session_id}", response_model=SessionOut)
async def get_session(session_id: str, request: Request, who: Caller) -> Response:
    return _json(SessionOut, await _service(request).get(session_id, who))


@router.post(
    "/sessions/{session_id}/messages",
    status_code=202,
    response_model=SendAccepted,
    dependencies=NEW_WORK,
)
async def send_message(
    session_id: str, body: SendMessage, request: Request, who: Caller
) -> SendAccepted:
    return await _service(request).send(session_id, body, who)


@router.post(
    "/sessions/{session_id}/regenerate",
    status_code=202,
    response_model=SendAccepted,
    dependencies=NEW_WORK,
)
async def regenerate(session_id: str, request: Request, who: Caller) -> SendAccepted:
    return await _service(request).regenerate(session_id, who)


@router.post("/sessions/{session_id}/stop")
async def stop(session_id: str, request: Request, who: Caller) -> dict[str, Any]:
    return await _service(request).stop(session_id, who)


@router.post("/sessions/{session_id}/approvals/{tool_call_id}")
async def approve(
    session_id: str, tool_call_id: str, body: Approval, request: Request, who: Caller
) -> dict[str, Any]:
    return await _service(request).approve(session_id, tool_call_id, body.approved, who)


@router.post(
    "/sessions/{session_id}/fork", status_code=201, response_model=SessionOut, dependencies=NEW_WORK
)
async def fork(session_id: str, body: ForkRequest, request: Request, who: Caller) -> Response:
    out = await _service(request).fork(session_id, body.at_message_id, who)
    return _json(SessionOut, out, 201)


@router.post("/sessions/{session_id}/end", response_model=SessionOut)
async def end(session_id: str, request: Request, who: Caller) -> Response:
    return _json(SessionOut, await _service(request).end(session_id, who))


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    service = _service(request)
    return {"simulated": service.settings.simulated, "models": service.catalog.public_list()}

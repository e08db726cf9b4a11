"""History routes (DESIGN §3): list/search, rename, trash, restore, purge, export, import.

Registered before the session routes, so `/v1/sessions/import` is never taken for a session id.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from streams_service.access.principal import Caller
from streams_service.drain import accepting_work
from streams_service.errors import BadRequest, PayloadTooLarge
from streams_service.sessions.history import HistoryService, ListParams
from streams_service.sessions.history_schemas import (
    ExportDocument,
    Purged,
    SessionPage,
    UpdateSession,
)
from streams_service.sessions.schemas import SessionOut

router = APIRouter(prefix="/v1", tags=["history"])

# Largest import document accepted (a long chat with tool output is a few MB).
IMPORT_MAX_BYTES = 32 * 1024 * 1024


def _history(request: Request) -> HistoryService:
    return HistoryService(request.app.state.services.sessions)


def _json(model: type[BaseModel], data: dict[str, Any], status: int = 200) -> Response:
    return JSONResponse(model.model_validate(data).model_dump(mode="json"), status_code=status)


@router.get("/sessions", response_model=SessionPage)
async def list_sessions(
    request: Request,
    who: Caller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    created_from: Annotated[str | None, Query(alias="from", max_length=40)] = None,
    created_to: Annotated[str | None, Query(alias="to", max_length=40)] = None,
    trash: bool = False,
    user: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    params = ListParams(limit, cursor, q, model, created_from, created_to, trash, user)
    return _json(SessionPage, await _history(request).list(who, params))


# An import makes a new session: a draining replica refuses it like any new work.
@router.post(
    "/sessions/import",
    status_code=201,
    response_model=SessionOut,
    dependencies=[Depends(accepting_work)],
)
async def import_session(request: Request, who: Caller) -> Response:
    """Takes the document `GET /v1/sessions/{id}/export?format=json` produced."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > IMPORT_MAX_BYTES:
        raise PayloadTooLarge(f"an import document may be at most {IMPORT_MAX_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > IMPORT_MAX_BYTES:
            raise PayloadTooLarge(f"an import document may be at most {IMPORT_MAX_BYTES} bytes")
    if not body:
        raise BadRequest("send the JSON document of an export")
    try:
        doc = ExportDocument.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    return _json(SessionOut, await _history(request).import_(doc, who), 201)


@router.patch("/sessions/{session_id}", response_model=SessionOut)
async def update_session(
    session_id: str, body: UpdateSession, request: Request, who: Caller
) -> Response:
    return _json(SessionOut, await _history(request).update(session_id, body, who))


@router.delete("/sessions/{session_id}", response_model=SessionOut | Purged)
async def delete_session(
    session_id: str, request: Request, who: Caller, purge: bool = False
) -> Response:
    service = _history(request)
    if purge:
        return _json(Purged, await service.purge(session_id, who))
    return _json(SessionOut, await service.delete(session_id, who))


@router.post("/sessions/{session_id}/restore", response_model=SessionOut)
async def restore_session(session_id: str, request: Request, who: Caller) -> Response:
    return _json(SessionOut, await _history(request).restore(session_id, who))


@router.get("/sessions/{session_id}/export")
async def export_session(
    session_id: str,
    request: Request,
    who: Caller,
    format: Literal["md", "json"] = "json",
) -> Response:
    exported = await _history(request).export(session_id, who, format)
    return Response(
        exported.body,
        media_type=exported.media_type,
        headers={"Content-Disposition": f'attachment; filename="{exported.filename}"'},
    )

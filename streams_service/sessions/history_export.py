"""Export a session (a readable Markdown transcript, or a versioned JSON document) and import
that JSON document back as a new session of the caller's, in the database and on a new stream.

An import is all or nothing: the stream is written first, then the rows and their audit entry
in one transaction; if anything fails the new stream is deleted again.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic_core import to_jsonable_python

from db.models import ChatMessage, ChatSession
from streams_service.access.limits import SESSION_CREATE
from streams_service.access.principal import Principal
from streams_service.durable.model import CreateRequest
from streams_service.durable.offsets import format_offset
from streams_service.errors import BadRequest, PayloadTooLarge
from streams_service.ops import audit
from streams_service.sessions import records
from streams_service.sessions.attachments import image_parts
from streams_service.sessions.history_schemas import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    ExportDocument,
    ExportedMessage,
    ImagePart,
)
from streams_service.sessions.schemas import Attachment
from streams_service.sessions.service import SessionService, stream_path


@dataclass(frozen=True)
class Exported:
    body: bytes
    media_type: str
    filename: str


def export_document(row: ChatSession, messages: list[ChatMessage], now: datetime) -> dict[str, Any]:
    doc = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "exported_at": now,
        "session": {
            "id": row.id,
            "title": row.title,
            "model": row.model,
            "message_count": row.message_count,
            "cost_usd": format(Decimal(row.cost_usd).normalize(), "f"),
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "ended_at": row.ended_at,
        },
        "messages": [
            {
                "id": m.id,
                "role": m.role,
                "status": m.status,
                "created_at": m.created_at,
                "parts": m.parts,
            }
            for m in messages
        ],
    }
    out: dict[str, Any] = to_jsonable_python(doc)
    return out


def export(row: ChatSession, messages: list[ChatMessage], fmt: str, now: datetime) -> Exported:
    if fmt == "json":
        body = json.dumps(export_document(row, messages, now), ensure_ascii=False, indent=2)
        return Exported(body.encode(), "application/json", filename(row, "json"))
    if fmt == "md":
        return Exported(
            markdown(row, messages, now).encode(),
            "text/markdown; charset=utf-8",
            filename(row, "md"),
        )
    raise BadRequest("format must be md or json")


def filename(row: ChatSession, extension: str) -> str:
    slug = "-".join(re.findall(r"[a-z0-9]+", (row.title or "").lower()))[:48].strip("-")
    return f"chatops-{slug or 'session'}-{row.id[:8]}.{extension}"


def _when(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def markdown(row: ChatSession, messages: list[ChatMessage], now: datetime) -> str:
    lines = [
        f"# {row.title or 'Untitled chat'}",
        "",
        f"- Session: `{row.id}`",
        f"- Model: {row.model}",
        f"- Started: {_when(row.created_at)}",
    ]
    if row.ended_at is not None:
        lines.append(f"- Ended: {_when(row.ended_at)}")
    lines += [
        f"- Messages: {row.message_count} · cost ${Decimal(row.cost_usd):.4f}",
        f"- Exported: {_when(now)}",
        "",
        "---",
    ]
    for m in messages:
        if m.status == "superseded":
            continue  # replaced by a regenerated answer
        who = "You" if m.role == "user" else "Claude"
        note = "" if m.status == "complete" else f" _({m.status})_"
        lines += ["", f"### {who} · {_when(m.created_at)}{note}", ""]
        lines += _parts_markdown(m.parts)
    return "\n".join(lines).rstrip() + "\n"


def _parts_markdown(parts: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for part in parts:
        kind = part.get("type")
        if kind == "text" and part.get("content"):
            out += [str(part["content"]).strip(), ""]
        elif kind == "thinking" and part.get("content"):
            out += [
                "<details><summary>Thinking</summary>",
                "",
                str(part["content"]).strip(),
                "",
                "</details>",
                "",
            ]
        elif kind == "tool-call":
            out += [f"> **Tool call** `{part.get('name')}` `{part.get('arguments') or '{}'}`", ""]
        elif kind == "image":
            out += [f"_[image: {part.get('name') or 'image'}]_", ""]
        elif kind == "tool-result":
            label = "Tool error" if part.get("state") == "error" else "Tool result"
            out += [f"> **{label}:** {_one_line(str(part.get('content', '')))}", ""]
    return out


def _one_line(text: str, limit: int = 500) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


# ---------------------------------------------------------------------- import


def message_text(m: ExportedMessage) -> str:
    """The plain text stored for search and for the next request, as send and generation do."""
    return "".join(p.content for p in m.parts if p.type == "text")


async def import_document(
    sessions: SessionService, doc: ExportDocument, who: Principal
) -> dict[str, Any]:
    model = sessions.model_or_400(doc.session.model)
    _check(sessions, doc)
    if not who.is_system:
        # An import makes a session: it counts against the same limit as creating one.
        await sessions.limiter.hit(SESSION_CREATE, who.user_id or who.email, user_id=who.user_id)
    sid = str(uuid.uuid4())
    now = datetime.now(UTC)
    budget = None
    if sessions.settings.session_budget_usd > 0:
        budget = Decimal(str(sessions.settings.session_budget_usd))
    row = ChatSession(
        id=sid,
        user_id=who.user_id,
        title=doc.session.title,
        model=model.id,
        message_count=sum(1 for m in doc.messages if m.status != "superseded"),
        cost_usd=Decimal(0),
        reserved_usd=Decimal(0),
        budget_usd=budget,
        created_at=now,
        updated_at=now,
    )
    path = stream_path(sid)
    await sessions.store.create(path, CreateRequest(content_type="application/json"))
    try:
        await sessions._publish_session(row)
        outcomes = await sessions.store.append_many(
            path,
            [
                records.append(batch)
                for batch in whole_message_records(
                    [
                        WholeMessage(
                            m.id,
                            m.role,
                            [p.model_dump(exclude_unset=True) for p in m.parts],
                            m.status,
                            m.created_at,
                        )
                        for m in doc.messages
                    ],
                    who.user_id or "user",
                )
            ],
        )
        async with sessions.sessionmaker.begin() as db:
            db.add(row)
            await db.flush()
            for ordinal, (m, outcome) in enumerate(zip(doc.messages, outcomes, strict=True), 1):
                assert outcome.next_offset_pos is not None
                db.add(
                    ChatMessage(
                        session_id=sid,
                        id=m.id,
                        ordinal=ordinal,
                        role=m.role,
                        content=message_text(m),
                        parts=[p.model_dump(exclude_unset=True) for p in m.parts],
                        status=m.status,
                        stream_offset=format_offset(outcome.next_offset_pos),
                        created_at=m.created_at.astimezone(UTC),
                    )
                )
            await audit.record(
                db,
                who,
                "session.import",
                "session",
                sid,
                {"source_session_id": doc.session.id, "messages": len(doc.messages)},
            )
    except BaseException:
        # Nothing half-written: without its rows, the new stream goes too.
        with contextlib.suppress(Exception):
            await sessions.store.delete(path)
        raise
    return sessions.session_out(row)


def _check(sessions: SessionService, doc: ExportDocument) -> None:
    """What the schema cannot say: unique ids, user messages as a send would accept them
    (text within the size limit, real images), images only from users."""
    seen: set[str] = set()
    for m in doc.messages:
        if m.id in seen:
            raise BadRequest(f"message id {m.id!r} appears twice")
        seen.add(m.id)
        if m.role == "user":
            if any(p.type not in ("text", "image") for p in m.parts):
                raise BadRequest(f"user message {m.id!r} may only have text and image parts")
            # Images pass the same checks as when they were sent (base64, size, real type).
            image_parts(
                [
                    Attachment(type="image", name=p.name, media_type=p.mediaType, data=p.data)
                    for p in m.parts
                    if isinstance(p, ImagePart)
                ]
            )
            if len(message_text(m).encode()) > sessions.settings.message_max_bytes:
                raise PayloadTooLarge(
                    f"user message {m.id!r} is larger than "
                    f"{sessions.settings.message_max_bytes} bytes"
                )
        elif any(p.type == "image" for p in m.parts):
            raise BadRequest(f"assistant message {m.id!r} cannot have image parts")


@dataclass(frozen=True)
class WholeMessage:
    """A finished message, to be written to a stream whole (an import, a rebuilt stream)."""

    id: str
    role: str
    parts: list[dict[str, Any]]
    status: str
    created_at: datetime


def whole_message_records(
    messages: list[WholeMessage], user_actor: str
) -> list[list[dict[str, Any]]]:
    """Each message (in order) as the stream holds a finished one: a whole-message chunk; a
    superseded answer is followed by the notice regenerate writes, naming the answer that
    replaced it (the next assistant message, found in one pass from the end)."""
    out: list[list[dict[str, Any]]] = []
    next_answer: str | None = None
    for m in reversed(messages):
        out.append(_whole_records(m, user_actor, next_answer))
        if m.role == "assistant":
            next_answer = m.id
    out.reverse()
    return out


def _whole_records(
    m: WholeMessage, user_actor: str, next_answer: str | None
) -> list[dict[str, Any]]:
    created = records.iso(m.created_at)
    message = {"id": m.id, "role": m.role, "parts": m.parts, "createdAt": created}
    out = [
        records.chunk_record(
            message_id=m.id,
            actor_id=user_actor if m.role == "user" else "claude",
            role=m.role,
            seq=0,
            chunk={"type": "whole-message", "message": message},
            created_at=created,
        )
    ]
    if m.status == "superseded":
        out.append(
            records.chunk_record(
                message_id=m.id,
                actor_id="claude",
                role="assistant",
                seq=10**9,
                chunk=records.event(
                    "CUSTOM",
                    name="message-superseded",
                    data={"messageId": m.id, "by": next_answer},
                ),
                created_at=created,
            )
        )
    return out

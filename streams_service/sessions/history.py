"""Session history: list and search, rename, trash (delete/restore), purge, export and import.

Pagination is keyset on (created_at, id), newest first: created_at never changes, so a page
boundary never moves — new sessions land before the first page, none is skipped or repeated.
Every change here writes its audit entry in the same transaction as the change itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import ChatMessage, ChatSession
from streams_service.access.principal import Principal
from streams_service.durable.model import AppendRequest, CreateRequest
from streams_service.durable.offsets import format_offset
from streams_service.errors import AppError, BadRequest, Conflict, Forbidden, Gone, NotFound
from streams_service.ops import audit
from streams_service.sessions import history_export, records
from streams_service.sessions import history_repo as hrepo
from streams_service.sessions import repository as repo
from streams_service.sessions.history_schemas import ExportDocument, UpdateSession
from streams_service.sessions.service import SessionService, parse_session_id, stream_path

log = structlog.get_logger(__name__)

CURSOR_VERSION = 1
# How long a delete or purge waits for a running generation to end after asking it to stop.
STOP_WAIT_S = 10.0


@dataclass(frozen=True)
class ListParams:
    limit: int = 50
    cursor: str | None = None
    q: str | None = None
    model: str | None = None
    created_from: str | None = None
    created_to: str | None = None
    trash: bool = False
    user: str | None = None


def encode_cursor(key: hrepo.Keyset) -> str:
    raw = json.dumps(
        {"v": CURSOR_VERSION, "t": key.created_at.astimezone(UTC).isoformat(), "id": key.id},
        separators=(",", ":"),
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> hrepo.Keyset:
    invalid = BadRequest("cursor is not one this service issued; list again without it")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
            raise invalid
        created = datetime.fromisoformat(data["t"])
        session_id = data["id"]
    except (binascii.Error, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise invalid from None
    if created.tzinfo is None or not isinstance(session_id, str) or len(session_id) > 64:
        raise invalid
    return hrepo.Keyset(created.astimezone(UTC), session_id)


def parse_when(raw: str, name: str, *, end: bool) -> datetime:
    """An ISO 8601 date or date-time; without a zone it is UTC. A bare date as the end of a
    range includes that whole day."""
    text = raw.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{name} must be an ISO 8601 date or date-time (e.g. 2026-11-26 or "
            f"2026-11-26T09:30:00Z); got {raw!r}"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def item_out(row: ChatSession, email: str | None, name: str | None) -> dict[str, Any]:
    return {
        "id": row.id,
        "title": row.title,
        "model": row.model,
        "message_count": row.message_count,
        "cost_usd": row.cost_usd,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "ended_at": row.ended_at,
        "deleted_at": row.deleted_at,
        "user": None if row.user_id is None else {"id": row.user_id, "email": email, "name": name},
    }


class HistoryService:
    """History operations on top of the session service (its store, database and generations)."""

    def __init__(self, sessions: SessionService) -> None:
        self.sessions = sessions
        self.store = sessions.store
        self.sessionmaker = sessions.sessionmaker
        self.generations = sessions.generations

    # ------------------------------------------------------------------ list and search

    async def list(self, who: Principal, params: ListParams) -> dict[str, Any]:
        terms: tuple[str, ...] = ()
        if params.q is not None and params.q.strip():
            terms = hrepo.search_terms(params.q)
            if not terms:
                raise BadRequest("q has no words to search for")
        created_from = (
            parse_when(params.created_from, "from", end=False) if params.created_from else None
        )
        created_to = parse_when(params.created_to, "to", end=True) if params.created_to else None
        if created_from and created_to and created_from >= created_to:
            raise BadRequest("from must be before to")
        after = decode_cursor(params.cursor) if params.cursor else None
        f = hrepo.ListFilter(
            user_id=_scope(who, params.user),
            trash=params.trash,
            model=params.model,
            created_from=created_from,
            created_to=created_to,
            terms=terms,
        )
        async with self.sessionmaker() as db:
            rows = await hrepo.list_sessions(db, f, after, params.limit + 1)
        page = rows[: params.limit]
        more = len(rows) > params.limit
        last = page[-1][0] if page else None
        return {
            "items": [item_out(row, email, name) for row, email, name in page],
            "next_cursor": encode_cursor(hrepo.Keyset(last.created_at, last.id))
            if more and last is not None
            else None,
        }

    # ------------------------------------------------------------------ changes

    async def update(self, session_id: str, body: UpdateSession, who: Principal) -> dict[str, Any]:
        sid = parse_session_id(session_id)
        if body.title is None and body.model is None:
            raise BadRequest("nothing to change: send a title, a model or both")
        title = None if body.title is None else " ".join(body.title.split())
        if title == "":
            raise BadRequest("title must not be empty")
        model = self.sessions.model_or_400(body.model).id if body.model is not None else None
        async with self.sessionmaker.begin() as db:
            row = await self._managed(db, sid, who, deleted=False)
            detail: dict[str, Any] = {}
            if title is not None and title != row.title:
                detail["title"] = {"from": row.title, "to": title}
                row.title = title
            if model is not None and model != row.model:
                detail["model"] = {"from": row.model, "to": model}
                row.model = model
            if detail:
                row.updated_at = datetime.now(UTC)
                action = "session.rename" if "title" in detail else "session.set_model"
                await audit.record(db, who, action, "session", sid, detail)
        if detail:
            await self._publish(row)
        return self.sessions.session_out(row)

    async def delete(self, session_id: str, who: Principal) -> dict[str, Any]:
        """Soft delete: into the trash (restorable). A running generation is stopped; what it
        wrote is kept with the session, and its usage row stays."""
        sid = parse_session_id(session_id)
        async with self.sessionmaker.begin() as db:
            row = await self._managed(db, sid, who, deleted=False)
            row.deleted_at = datetime.now(UTC)
            await audit.record(db, who, "session.delete", "session", sid)
        # Marked first, so no new message can start one while the running one stops.
        if not await self._stop_generation(sid, row.active_generation_id):
            log.warning("deleted_session_generation_still_running", session_id=sid)
        async with self.sessionmaker() as db:
            row = await repo.get_session(db, sid) or row
        await self._publish(row)
        return self.sessions.session_out(row)

    async def restore(self, session_id: str, who: Principal) -> dict[str, Any]:
        sid = parse_session_id(session_id)
        async with self.sessionmaker() as db:
            row = await self._managed(db, sid, who, deleted=None)
            if row.deleted_at is None:
                raise Conflict("this session is not in the trash")
        # The stream comes back first, while the session is still in the trash: no send can
        # append to it before its history is on it again.
        await self._ensure_stream(row)
        async with self.sessionmaker.begin() as db:
            row = await self._managed(db, sid, who, deleted=None)
            if row.deleted_at is None:
                raise Conflict("this session is not in the trash")
            row.deleted_at = None
            await audit.record(db, who, "session.restore", "session", sid)
        await self._publish(row)
        return self.sessions.session_out(row)

    async def purge(self, session_id: str, who: Principal) -> dict[str, Any]:
        """Delete for good (admin): messages, session row and stream. Generations (usage and
        cost) and audit entries stay, keyed by the session id."""
        sid = parse_session_id(session_id)
        async with self.sessionmaker() as db:
            row = await repo.get_session(db, sid)
        if row is None or not who.can_read(row.user_id):
            raise NotFound("no such session")
        if not who.is_admin:
            raise Forbidden("only an admin can purge a session; delete it to move it to the trash")
        if not await self._stop_generation(sid, row.active_generation_id):
            raise Conflict("a generation is still running in this session; try again shortly")
        await self.purge_now(sid, who, {})
        return {"id": sid, "purged": True}

    async def purge_now(self, sid: str, who: Principal, detail: dict[str, Any]) -> bool:
        """Remove the session's rows (with the audit entry, in one transaction), then its
        stream. False when there was nothing to purge."""
        async with self.sessionmaker.begin() as db:
            row = await repo.get_session(db, sid, for_update=True)
            if row is None:
                return False
            if row.active_generation_id is not None:
                raise Conflict("a generation is running in this session; stop it first")
            messages = await hrepo.delete_session_rows(db, sid)
            await audit.record(
                db, who, "session.purge", "session", sid, {"messages": messages, **detail}
            )
        # After the commit: a stream left behind by a failure holds nothing the API serves.
        await self.delete_stream(sid)
        return True

    async def delete_stream(self, sid: str) -> bool:
        """Delete the session's stream (hidden but kept while forks read it). False if that
        failed; a stream already gone counts as deleted."""
        try:
            await self.store.delete(stream_path(sid))
        except (NotFound, Gone):
            pass  # already expired, or kept only for its forks
        except AppError as exc:
            log.warning("session_stream_delete_failed", session_id=sid, error=exc.code)
            return False
        return True

    # ------------------------------------------------------------------ export / import

    async def export(self, session_id: str, who: Principal, fmt: str) -> history_export.Exported:
        sid = parse_session_id(session_id)
        async with self.sessionmaker() as db:
            row = await self.sessions._visible(db, sid, who, "read")
            messages = await repo.messages_of(db, sid)
        return history_export.export(row, messages, fmt, datetime.now(UTC))

    async def import_(self, doc: ExportDocument, who: Principal) -> dict[str, Any]:
        """A new session of the caller's holding the document's messages (and parts)."""
        return await history_export.import_document(self.sessions, doc, who)

    # ------------------------------------------------------------------ helpers

    async def _managed(
        self, db: AsyncSession, sid: str, who: Principal, *, deleted: bool | None
    ) -> ChatSession:
        """The session if `who` may change it (owner or admin). Someone who cannot even read
        it gets 404, like for a missing one; someone who can read but not change it (ops), 403.
        `deleted`: True/False to require that state (404 otherwise), None for either."""
        row = await repo.get_session(db, sid, for_update=True)
        if row is None or not who.can_read(row.user_id):
            raise NotFound("no such session")
        if deleted is not None and (row.deleted_at is not None) != deleted:
            raise NotFound("no such session")
        if not who.can_manage(row.user_id):
            raise Forbidden("only the session's owner or an admin can change it")
        return row

    async def _stop_generation(self, sid: str, generation_id: str | None) -> bool:
        """Stop the session's running generation, here or (through the control bus) on the
        replica that runs it. True once it has ended, or when none was running."""
        handle = await self.generations.stop(sid)
        if handle is not None:
            try:
                async with asyncio.timeout(STOP_WAIT_S):
                    await handle.done.wait()
            except TimeoutError:
                return False
            return True
        control = self.sessions.control
        if generation_id is None or control is None:
            return generation_id is None
        try:
            await control.stop(sid, generation_id)
        except AppError as exc:
            log.warning("generation_stop_not_confirmed", session_id=sid, error=exc.code)
            return False
        return True

    async def _publish(self, row: ChatSession) -> None:
        """Tell open tabs (the stream's `session` row). An ended session's stream is closed and
        an expired one is gone; the database holds the change either way."""
        if row.ended_at is not None:
            return
        try:
            await self.sessions._publish_session(row)
        except AppError as exc:
            log.info("session_publish_skipped", session_id=row.id, error=exc.code)

    async def _ensure_stream(self, row: ChatSession) -> None:
        """Give a session leaving the trash its stream back. Retention may have removed it
        meanwhile: one that forks still read was only hidden, and is shown again whole; one
        deleted outright is rebuilt from the history."""
        path = stream_path(row.id)
        try:
            await self.store.head(path)
            return
        except NotFound:
            pass
        except Gone:
            if await self.store.revive(path):
                log.info("restored_session_stream_revived", session_id=row.id)
            else:
                log.warning("restored_session_stream_not_revivable", session_id=row.id)
            return
        await self._rebuild_stream(row)

    async def _rebuild_stream(self, row: ChatSession) -> None:
        """A new stream holding the session's stored messages, each whole (as an import writes
        them), so the chat reads as before and can go on; the offsets that idempotent retries
        and forks use are updated to the new ones. Only the call that creates the stream
        writes it, so two racing restores cannot both replay the history."""
        path = stream_path(row.id)
        created = await self.store.create(path, CreateRequest(content_type="application/json"))
        if not created.created:
            return
        async with self.sessionmaker() as db:
            messages = await repo.messages_of(db, row.id)
        await self.sessions._publish_session(row)
        batches = history_export.whole_message_records(
            [
                history_export.WholeMessage(m.id, m.role, list(m.parts), m.status, m.created_at)
                for m in messages
            ],
            row.user_id or "user",
        )
        outcomes = await self.store.append_many(path, [records.append(b) for b in batches])
        async with self.sessionmaker.begin() as db:
            for message, outcome in zip(messages, outcomes, strict=True):
                assert outcome.next_offset_pos is not None
                await db.execute(
                    update(ChatMessage)
                    .where(ChatMessage.session_id == row.id, ChatMessage.id == message.id)
                    .values(stream_offset=format_offset(outcome.next_offset_pos))
                )
        if row.ended_at is not None:
            # An ended session is read-only: its stream is closed, as ending it left it.
            await self.store.append(path, AppendRequest(body=None, close=True))
        log.info("restored_session_stream_rebuilt", session_id=row.id, messages=len(messages))


def _scope(who: Principal, user: str | None) -> str | None:
    """Whose sessions to list: the caller's own by default; ops and admins may ask for one
    user's or `all`. Members asking for anyone else's get 403."""
    if user is None or user == "" or user == who.user_id:
        # The system principal owns nothing: its own view is everyone's.
        return who.user_id if who.user_id is not None else None
    if not who.reads_all:
        raise Forbidden("members can only list their own sessions")
    return None if user == "all" else user

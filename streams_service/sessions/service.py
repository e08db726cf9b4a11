"""Session logic: create, read, send (start a generation), stop, approve, regenerate, fork, end."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, TypeVar

import structlog
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db import pg_direct, scopes
from db.models import ChatMessage, ChatSession, Generation
from streams_service.access import budgets
from streams_service.access.limits import MESSAGE_SEND, SESSION_CREATE, RateLimited, RateLimiter
from streams_service.access.principal import LOCAL_ADMIN, Principal
from streams_service.config import Settings
from streams_service.durable.model import AppendRequest, CreateRequest, Producer
from streams_service.durable.offsets import format_offset, parse_offset
from streams_service.durable.store import StreamStore
from streams_service.errors import AppError, BadRequest, Conflict, NotFound, PayloadTooLarge
from streams_service.llm.models import (
    Catalog,
    ModelInfo,
    Usage,
    cost_usd,
    estimate_cost_usd,
    round_usd,
)
from streams_service.observability.context import bind_request
from streams_service.observability.telemetry import Telemetry
from streams_service.sessions import attachments, records
from streams_service.sessions import repository as repo
from streams_service.sessions.control import ControlBus
from streams_service.sessions.conversation import build_history, conversation
from streams_service.sessions.generation import GenerationManager
from streams_service.sessions.generation_types import GenerationSpec, Handle
from streams_service.sessions.memo import Memo, StoredRow
from streams_service.sessions.schemas import CreateSession, SendAccepted, SendMessage

Access = Literal["read", "manage", "own"]


class _SessionView(Protocol):
    """What access and budget checks read of a session: an ORM object or a plain row."""

    @property
    def user_id(self) -> str | None: ...
    @property
    def deleted_at(self) -> datetime | None: ...
    @property
    def budget_usd(self) -> Decimal | None: ...
    @property
    def cost_usd(self) -> Decimal: ...
    @property
    def reserved_usd(self) -> Decimal: ...


_V = TypeVar("_V", bound=_SessionView)

log = structlog.get_logger(__name__)

STREAM_PREFIX = "sessions/"
BUSY = "a generation is already running in this session; stop it first"


class PaymentRequired(AppError):
    status = 402
    code = "budget_exhausted"


def stream_path(session_id: str) -> str:
    return f"{STREAM_PREFIX}{session_id}"


def stream_url(session_id: str) -> str:
    return f"/v1/stream/{stream_path(session_id)}"


def parse_session_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise BadRequest("session ids are UUIDs") from None


class SessionService:
    def __init__(
        self,
        settings: Settings,
        store: StreamStore,
        sessionmaker: async_sessionmaker[AsyncSession],
        generations: GenerationManager,
        catalog: Catalog,
        limiter: RateLimiter,
        *,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sessionmaker = sessionmaker
        self.generations = generations
        self.catalog = catalog
        self.limiter = limiter
        # Metrics and analytics hooks (streams_service/observability/).
        self.telemetry = telemetry or generations.telemetry
        # Forwards stop and approvals to the replica running the generation (Postgres only;
        # set by the app after the listener that feeds it exists).
        self.control: ControlBus | None = None

    # ------------------------------------------------------------------ sessions

    def model_or_400(self, model_id: str | None) -> ModelInfo:
        if model_id is None:
            return self.catalog.default_model
        model = self.catalog.get(model_id)
        if model is None:
            allowed = ", ".join(m.id for m in self.catalog.models)
            raise BadRequest(f"model {model_id!r} is not allowed; choose one of: {allowed}")
        return model

    async def create(
        self, session_id: str | None, body: CreateSession, who: Principal
    ) -> tuple[bool, dict[str, Any]]:
        user_id = who.user_id
        sid = parse_session_id(session_id) if session_id else str(uuid.uuid4())
        model = self.model_or_400(body.model)
        async with self.sessionmaker.begin() as db:
            existing = await repo.get_session(db, sid)
            if existing is not None:
                # PUT of an id someone else holds must not reveal that it exists.
                if not who.owns(existing.user_id) or existing.deleted_at is not None:
                    raise NotFound("no such session")
                return False, self.session_out(existing)
        if not who.is_system:
            # Counted only when a session is really made: an idempotent repeat is free.
            await self.limiter.hit(SESSION_CREATE, who.user_id or who.email, user_id=who.user_id)
        # The stream first (idempotent), so a session row never exists without its stream.
        await self.store.create(stream_path(sid), CreateRequest(content_type="application/json"))
        now = datetime.now(UTC)
        budget = body.budget_usd
        if budget is None and self.settings.session_budget_usd > 0:
            budget = Decimal(str(self.settings.session_budget_usd))
        row = ChatSession(
            id=sid,
            user_id=user_id,
            title=body.title,
            model=model.id,
            message_count=0,
            cost_usd=Decimal(0),
            reserved_usd=Decimal(0),
            budget_usd=budget,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self.sessionmaker.begin() as db:
                db.add(row)
        except IntegrityError:
            # A concurrent PUT of the same id won; answer as the idempotent repeat.
            async with self.sessionmaker.begin() as db:
                again = await repo.get_session(db, sid)
                if again is None or not who.owns(again.user_id):
                    raise NotFound("no such session") from None
                return False, self.session_out(again)
        await self._publish_session(row)
        # The request's later log lines name the new session (and its generations' lines).
        bind_request(session_id=sid, user_id=user_id)
        self.telemetry.session_started(sid, model.id, user_id)
        return True, self.session_out(row)

    async def get(self, session_id: str, who: Principal) -> dict[str, Any]:
        sid = parse_session_id(session_id)
        async with self.sessionmaker() as db:
            row = await self._visible(db, sid, who, "read")
            messages = await repo.messages_of(db, sid)
        out = self.session_out(row)
        out["messages"] = [repo.message_out(m) for m in messages]
        return out

    async def _visible(
        self,
        db: AsyncSession,
        sid: str,
        who: Principal,
        need: Access,
        *,
        deleted: bool = False,
        for_update: bool = False,
    ) -> ChatSession:
        """The session if `who` may `need` it: "read" (owner, ops, admin), "manage" (owner,
        admin: stop, end, rename, delete) or "own" (the owner alone: send, regenerate, approve).

        Anything else — another user's session, or a deleted one unless `deleted` — is
        indistinguishable from a missing one (404, never 403).
        """
        row = await repo.get_session(db, sid, for_update=for_update)
        return _check_visible(row, who, need, deleted)

    def session_out(self, row: ChatSession) -> dict[str, Any]:
        return {
            "id": row.id,
            "streamUrl": stream_url(row.id),
            "title": row.title,
            "model": row.model,
            "simulated": self.settings.simulated,
            "message_count": row.message_count,
            "cost_usd": row.cost_usd,
            "budget_usd": row.budget_usd,
            "active_generation_id": row.active_generation_id,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "ended_at": row.ended_at,
            "deleted_at": row.deleted_at,
        }

    async def _publish_session(self, row: ChatSession) -> None:
        """Upsert the `session` row on the stream so open tabs see metadata changes live."""
        value = {
            "title": row.title,
            "model": row.model,
            "simulated": self.settings.simulated,
            "endedAt": records.iso(row.ended_at) if row.ended_at else None,
            "deletedAt": records.iso(row.deleted_at) if row.deleted_at else None,
            "updatedAt": records.iso(row.updated_at),
        }
        await self.store.append(
            stream_path(row.id), records.append([records.session_record(row.id, value)])
        )

    # ------------------------------------------------------------------ messages

    async def send(self, session_id: str, body: SendMessage, who: Principal) -> SendAccepted:
        try:
            return await self._send(session_id, body, who)
        except RateLimited as exc:
            # Recorded only now: the send's transaction has rolled back (SQLite's write lock).
            await self.limiter.record_rejection(exc)
            raise

    async def _send(self, session_id: str, body: SendMessage, who: Principal) -> SendAccepted:
        user_id = who.user_id
        bind_request(user_id=user_id)  # inherited by the generation's log lines
        sid = parse_session_id(session_id)
        content = body.content
        images = attachments.image_parts(body.attachments)
        if not content.strip() and not images:
            raise BadRequest("content must not be empty")
        if len(content.encode()) > self.settings.message_max_bytes:
            raise PayloadTooLarge(f"content is larger than {self.settings.message_max_bytes} bytes")
        parts = [{"type": "text", "content": content}, *images]
        model = self.model_or_400(body.model) if body.model else None
        now = datetime.now(UTC)
        message_id = f"msg_{uuid.uuid4().hex}"
        assistant_id = f"msg_{uuid.uuid4().hex}"
        generation_id = str(uuid.uuid4())
        appended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        handle: Handle | None = None
        try:
            # Claude first when this process knows the conversation (sessions/memo.py): the
            # request is on the wire during the session read below, which confirms it.
            handle = await self._start_early(
                sid, who, body, model, generation_id, assistant_id, message_id, appended
            )
            counted = handle is not None  # the rate limit has counted this send
            if handle is not None:
                # One loop turn: the upstream task builds and sends its request now, before
                # this send's database work (which it does not need, and which then overlaps
                # Claude's time to first token) rather than after it.
                await asyncio.sleep(0)
            async with scopes.begin(self.sessionmaker) as db:
                pg = await pg_direct.direct(db)
                # The session row stays locked (Postgres) until this commits: a generation that
                # is finishing saves its answer after we decide, never between our reads, so the
                # history, ordinals and counts below are the session's latest. The history is
                # read with it (one round trip), whether or not this send goes ahead.
                found, messages = await repo.send_row_and_history(
                    db, sid, body.client_message_id, pg
                )
                row = _check_visible(found, who, "own", False)
                model = model or self.catalog.get(row.model) or self.catalog.default_model
                history = None
                if row.active_generation_id is None:
                    history = conversation(messages, content, images)
                if handle is not None:
                    early = handle.spec
                    confirmed = (
                        row.earlier_message_id is None
                        and row.ended_at is None
                        and history == early.history
                        and model == early.model
                        and (row.message_count > 0 or bool(row.title))  # not a first exchange
                    )
                    if not confirmed:
                        handle, appended = await self._abandon_early(handle)
                if row.earlier_message_id is not None:
                    assert body.client_message_id is not None
                    earlier = await repo.message_by_client_id(db, sid, body.client_message_id)
                    if earlier is not None:
                        return await self._repeat_send(earlier)
                if not who.is_system and not counted:
                    await self.limiter.hit(
                        MESSAGE_SEND, sid, user_id=user_id, session_id=sid, record=False
                    )
                if row.ended_at is not None:
                    raise Conflict("this session has ended; fork it to continue")
                claimed = False
                if history is not None:
                    remaining, reserve = await self._budget(db, row, who, model, history, now)
                    if pg is None:
                        # Still conditional: SQLite takes no row lock, and a racing send must
                        # lose.
                        claimed = await repo.claim_generation(
                            db, sid, generation_id, reserve, now, count_message=True
                        )
                    else:
                        # Postgres: the row read above stays locked until this commits and has
                        # no active generation, so the claim cannot lose. It goes out with the
                        # inserts below, a round trip fewer before the upstream request.
                        claimed = True
                if not claimed:
                    if handle is not None:  # SQLite: a racing send claimed it first
                        handle, appended = await self._abandon_early(handle)
                    retry_after = self.generations.finishing(sid)
                    if retry_after is None:
                        raise Conflict(BUSY)
                else:
                    assert history is not None
                    ordinal = max((m.ordinal for m in messages), default=0) + 1
                    # What the next send will read, once this answer is saved (not kept with
                    # attachments: the memo would hold their data).
                    memo = (
                        None
                        if images
                        else Memo(
                            user_id,
                            row.model,
                            (*messages, StoredRow("user", content, parts, "complete", ordinal)),
                            body.client_message_id,
                        )
                    )
                    if handle is not None:
                        # Started early and confirmed: it may read from upstream now.
                        handle.spec.budget_remaining = remaining
                        handle.spec.reserved_usd = reserve
                        handle.spec.memo = memo
                        assert handle.spec.confirmed is not None
                        handle.spec.confirmed.set_result(None)
                        self.telemetry.early_start(True)
                    else:
                        # Claimed and reserved, so this send runs: its upstream request goes
                        # out now, and the rest of this transaction and the user message's
                        # append happen during Claude's time to first token instead of before
                        # it. The generation writes nothing to the stream until `appended`
                        # resolves, and is abandoned if either fails.
                        handle = self.generations.start(
                            GenerationSpec(
                                generation_id=generation_id,
                                session_id=sid,
                                user_id=user_id,
                                message_id=assistant_id,
                                model=model,
                                history=history,
                                stream_path=stream_path(sid),
                                budget_remaining=remaining,
                                reserved_usd=reserve,
                                is_first_exchange=row.message_count == 0 and not row.title,
                                first_user_text=content,
                                user_message_id=message_id,
                                user_appended=appended,
                                memo=memo,
                            )
                        )
                    # The claim and both rows as one statement on Postgres, committed in the
                    # same round trip. Should the claim lose after all (the locked row says it
                    # cannot), nothing is written and the send is refused as a lost claim is.
                    try:
                        async with pg_direct.combined(pg, commit=True):
                            if pg is not None:
                                await repo.submit_claim(
                                    pg,
                                    sid,
                                    generation_id,
                                    reserve,
                                    now,
                                    count_message=True,
                                    must_win=True,
                                )
                            await repo.insert_message(
                                db,
                                pg,
                                session_id=sid,
                                id=message_id,
                                ordinal=ordinal,
                                role="user",
                                content=content,
                                parts=parts,
                                status="complete",
                                client_message_id=body.client_message_id,
                                generation_id=generation_id,
                                created_at=now,
                            )
                            await repo.insert_generation(
                                db,
                                pg,
                                **self._running_generation(
                                    generation_id,
                                    sid,
                                    user_id,
                                    message_id,
                                    assistant_id,
                                    model,
                                    reserve,
                                    now,
                                ),
                            )
                    except pg_direct.CheckFailed:
                        raise Conflict(BUSY) from None
        except BaseException:
            await self._abandon(handle, appended)
            raise
        if handle is None:
            # The previous answer has ended on the stream and is only being saved: wait for it
            # (milliseconds) rather than refuse a client that reacted to its end.
            assert retry_after is not None
            await asyncio.wait({asyncio.ensure_future(retry_after.wait())}, timeout=5)
            return await self._send(session_id, body, who)
        try:
            offset = await self._append_user_message(sid, message_id, user_id, parts, now)
        except BaseException:
            await self._abandon(handle, appended)
            # Not on the stream, so not acknowledged: take the message back and free the session.
            async with self.sessionmaker.begin() as db:
                await db.execute(
                    delete(ChatMessage).where(
                        ChatMessage.session_id == sid, ChatMessage.id == message_id
                    )
                )
                await db.execute(delete(Generation).where(Generation.id == generation_id))
                await repo.release_generation(db, sid, generation_id, reserve)
                await db.execute(
                    update(ChatSession)
                    .where(ChatSession.id == sid)
                    .values(message_count=ChatSession.message_count - 1)
                )
            raise
        appended.set_result(offset)
        self.telemetry.message_sent(sid, user_id, content)
        return SendAccepted(message_id=message_id, generation_id=generation_id, offset=offset)

    async def _start_early(
        self,
        sid: str,
        who: Principal,
        body: SendMessage,
        model: ModelInfo | None,
        generation_id: str,
        assistant_id: str,
        message_id: str,
        appended: asyncio.Future[str],
    ) -> Handle | None:
        """The send's generation, started before the session is read, from the memo of its
        previous exchange here (sessions/memo.py); None without a usable one. It reads nothing
        from upstream until the send confirms it (GenerationSpec.confirmed) and is abandoned if
        the read disagrees. Counts the send against the rate limit first, as the send would:
        a refused send must not reach Claude."""
        if self.generations.running.get(sid) is not None or body.attachments:
            return None
        cid = body.client_message_id
        memo = self.generations.memos.take(
            sid,
            # Not another user's send (the read answers 404), nor a retry of the send that
            # left the memo (the read finds it answered): both leave it for the next send.
            lambda m: m.user_id == who.user_id and (cid is None or cid != m.client_message_id),
        )
        if memo is None:
            return None
        if not who.is_system:
            await self.limiter.hit(
                MESSAGE_SEND, sid, user_id=who.user_id, session_id=sid, record=False
            )
        history = conversation(memo.rows, body.content, [])
        return self.generations.start(
            GenerationSpec(
                generation_id=generation_id,
                session_id=sid,
                user_id=who.user_id,
                message_id=assistant_id,
                model=model or self.catalog.get(memo.model) or self.catalog.default_model,
                history=history,
                stream_path=stream_path(sid),
                budget_remaining=None,  # set by the send once confirmed
                reserved_usd=Decimal(0),
                first_user_text=body.content,
                user_message_id=message_id,
                user_appended=appended,
                confirmed=asyncio.get_running_loop().create_future(),
            )
        )

    async def _abandon_early(self, handle: Handle) -> tuple[None, asyncio.Future[str]]:
        """Abandon a generation started early (before any token) and give the send a fresh
        `appended`: cancelling the abandoned one cancelled the future it waited on."""
        self.telemetry.early_start(False)
        await self.generations.abandon(handle)
        return None, asyncio.get_running_loop().create_future()

    async def _abandon(self, handle: Handle | None, appended: asyncio.Future[str]) -> None:
        """A send failed after its generation started: end that generation, which has written
        nothing (its first write waits for `appended`, cancelled here) and saves nothing."""
        appended.cancel()
        if handle is not None:
            confirmed = handle.spec.confirmed
            if confirmed is not None and not confirmed.done():  # early, refused unconfirmed
                self.telemetry.early_start(False)
            await self.generations.abandon(handle)

    async def _repeat_send(self, earlier: ChatMessage) -> SendAccepted:
        """An idempotent retry: the same ids; the stream append is deduplicated by producer."""
        offset = earlier.stream_offset
        if offset is None:
            offset = await self._append_user_message(
                earlier.session_id, earlier.id, None, earlier.parts, earlier.created_at
            )
        return SendAccepted(
            message_id=earlier.id, generation_id=earlier.generation_id or "", offset=offset
        )

    async def _append_user_message(
        self,
        sid: str,
        message_id: str,
        user_id: str | None,
        parts: list[dict[str, Any]],
        created: datetime,
    ) -> str:
        record = records.user_message_record(
            message_id=message_id,
            actor_id=user_id or "user",
            parts=parts,
            created_at=records.iso(created),
        )
        outcome = await self.store.append(
            stream_path(sid),
            # One producer per message: a retried append is recognised, never doubled.
            records.append([record], Producer(f"msg-{message_id}", 0, 0)),
        )
        assert outcome.next_offset_pos is not None
        return format_offset(outcome.next_offset_pos)

    async def regenerate(self, session_id: str, who: Principal) -> SendAccepted:
        try:
            return await self._regenerate(session_id, who)
        except RateLimited as exc:
            await self.limiter.record_rejection(exc)
            raise

    async def _regenerate(self, session_id: str, who: Principal) -> SendAccepted:
        user_id = who.user_id
        """Answer the last user message again; the previous answer is marked superseded."""
        sid = parse_session_id(session_id)
        now = datetime.now(UTC)
        generation_id, assistant_id = str(uuid.uuid4()), f"msg_{uuid.uuid4().hex}"
        async with self.sessionmaker.begin() as db:
            row = await self._visible(db, sid, who, "own")
            if not who.is_system:
                await self.limiter.hit(
                    MESSAGE_SEND, sid, user_id=user_id, session_id=sid, record=False
                )
            if row.ended_at is not None:
                raise Conflict("this session has ended; fork it to continue")
            live = [m for m in await repo.messages_of(db, sid) if m.status != "superseded"]
            if len(live) < 2 or live[-1].role != "assistant" or live[-2].role != "user":
                raise Conflict("there is no answer to regenerate")
            previous, question = live[-1], live[-2]
            model = self.catalog.get(row.model) or self.catalog.default_model
            history = build_history(live[:-1])
            remaining, reserve = await self._budget(db, row, who, model, history, now)
            if not await repo.claim_generation(db, sid, generation_id, reserve, now):
                raise Conflict(BUSY)
            previous.status = "superseded"
            db.add(
                Generation(
                    **self._running_generation(
                        generation_id, sid, user_id, question.id, assistant_id, model, reserve, now
                    )
                )
            )
            row.message_count -= 1  # the superseded answer no longer counts
        # Tell open tabs the old answer is replaced, then run the new one.
        notice = records.chunk_record(
            message_id=previous.id,
            actor_id="claude",
            role="assistant",
            seq=10**9,
            chunk=records.event(
                "CUSTOM",
                name="message-superseded",
                data={"messageId": previous.id, "by": assistant_id},
            ),
            created_at=records.iso(now),
        )
        outcome = await self.store.append(
            stream_path(sid),
            records.append([notice]),
        )
        assert outcome.next_offset_pos is not None
        self.generations.start(
            GenerationSpec(
                generation_id=generation_id,
                session_id=sid,
                user_id=user_id,
                message_id=assistant_id,
                model=model,
                history=history,
                stream_path=stream_path(sid),
                budget_remaining=remaining,
                reserved_usd=reserve,
            )
        )
        return SendAccepted(
            message_id=question.id,
            generation_id=generation_id,
            offset=format_offset(outcome.next_offset_pos),
        )

    def _running_generation(
        self,
        generation_id: str,
        sid: str,
        user_id: str | None,
        user_message_id: str,
        assistant_id: str,
        model: ModelInfo,
        reserve: Decimal,
        now: datetime,
    ) -> dict[str, Any]:
        """The columns of a new generation row (an ORM object or a Core insert takes them)."""
        return {
            "id": generation_id,
            "session_id": sid,
            "user_id": user_id,
            "user_message_id": user_message_id,
            "message_id": assistant_id,
            "model": model.id,
            "simulated": self.settings.simulated,
            "status": "running",
            "reserved_usd": reserve,
            "owner": self.generations.instance,
            "started_at": now,
            "heartbeat_at": now,
        }

    async def _budget(
        self,
        db: AsyncSession,
        row: _SessionView,
        who: Principal,
        model: ModelInfo,
        history: list[dict[str, Any]],
        now: datetime,
    ) -> tuple[Decimal | None, Decimal]:
        """(the budget the generation may spend or None, what to reserve now) — or 402.

        The session's cap is partly reservable; the user's daily cap must cover the full
        estimate, checked under a per-user lock held until this transaction commits, so
        concurrent sends in different sessions cannot together overspend it."""
        remaining = _remaining(row)
        if remaining is not None and remaining <= 0:
            raise PaymentRequired("this session's budget is used up")
        # The dev-mode local admin (no STREAMS_SECRET) has no daily cap: it is a one-person
        # install, and the session cap still applies.
        if who.user_id is not None and who != LOCAL_ADMIN:
            await budgets.lock_user_budget(db, who.user_id)
            user_left, _spent = await budgets.left_today(db, self.settings, who.user_id, now)
            if user_left is not None:
                full = self.reservation(model, history, None)
                if user_left < full:
                    raise PaymentRequired(
                        f"your daily budget has ${max(user_left, Decimal(0)):.4f} left; this "
                        f"message may cost up to ${full:.4f}. It resets at 00:00 UTC."
                    )
                remaining = user_left if remaining is None else min(remaining, user_left)
        return remaining, self.reservation(model, history, remaining)

    def reservation(
        self, model: ModelInfo, history: list[dict[str, Any]], remaining: Decimal | None
    ) -> Decimal:
        """The estimated cost reserved before the upstream call, capped by what is left."""
        tokens = attachments.estimate_tokens(history)
        reserve = round_usd(
            estimate_cost_usd(model, tokens, self.settings.generation_max_output_tokens)
        )
        return reserve if remaining is None else min(reserve, remaining)

    async def generate_title(self, session_id: str, first_text: str) -> None:
        """After the first exchange: a short title from the cheap model, else the first words.
        Its cost is recorded like any generation's; it never overwrites a title someone set."""
        title, cost, usage_row = None, Decimal(0), None
        model = self.catalog.title_model
        try:
            reply = await self.generations.client.messages.create(
                model=model.id,
                max_tokens=24,
                messages=[
                    {
                        "role": "user",
                        "content": "Write a title of at most six words for a chat that starts "
                        "with the message below. Reply with the title only.\n\n"
                        + first_text[:2000],
                    }
                ],
            )
            text = "".join(b.text for b in reply.content if b.type == "text")
            title = _clean_title(text)
            usage = Usage.from_anthropic(reply.usage)
            cost = round_usd(cost_usd(model, usage))
            usage_row = usage
            self.telemetry.usage(model.id, usage, cost)
        except Exception as exc:
            log.info("title_model_unavailable", error=type(exc).__name__)
        if not title:
            title = _clean_title(" ".join(first_text.split()[:8]))
        now = datetime.now(UTC)
        async with self.sessionmaker.begin() as db:
            row = await repo.get_session(db, session_id)
            if row is None:
                return
            if usage_row is not None:
                db.add(
                    Generation(
                        id=str(uuid.uuid4()),
                        session_id=session_id,
                        user_id=row.user_id,
                        message_id="",
                        model=model.id,
                        simulated=self.settings.simulated,
                        status="completed",
                        finish_reason="title",
                        input_tokens=usage_row.input_tokens,
                        output_tokens=usage_row.output_tokens,
                        cache_read_tokens=usage_row.cache_read_tokens,
                        cache_write_5m_tokens=usage_row.cache_write_5m_tokens,
                        cache_write_1h_tokens=usage_row.cache_write_1h_tokens,
                        cost_usd=cost,
                        upstream_calls=1,
                        started_at=now,
                        finished_at=now,
                    )
                )
                row.cost_usd = Decimal(row.cost_usd) + cost
            if row.title:
                return
            row.title = title
            row.updated_at = now
        await self._publish_session(row)

    async def stop(self, session_id: str, who: Principal) -> dict[str, Any]:
        sid = parse_session_id(session_id)
        async with self.sessionmaker() as db:
            row = await self._visible(db, sid, who, "manage")
        handle = await self.generations.stop(sid)
        if handle is None:
            if row.active_generation_id is None:
                raise Conflict("no generation is running in this session")
            if self.control is None:
                raise Conflict("the running generation is owned by another replica")
            # It runs on another replica: its owner stops it, and this answers once it has
            # ended, as a local stop does.
            await self.control.stop(sid, row.active_generation_id)
            return {"generation_id": row.active_generation_id, "stopped": True}
        await handle.done.wait()
        return {"generation_id": handle.spec.generation_id, "stopped": True}

    async def approve(
        self, session_id: str, tool_call_id: str, approved: bool, who: Principal
    ) -> dict[str, Any]:
        sid = parse_session_id(session_id)
        async with self.sessionmaker() as db:
            row = await self._visible(db, sid, who, "own")
        answered = self.generations.answer_approval(sid, tool_call_id, approved)
        running_elsewhere = (
            row.active_generation_id is not None and sid not in self.generations.running
        )
        if not answered and running_elsewhere and self.control is not None:
            # The owner answers whether that tool call was waiting there.
            assert row.active_generation_id is not None
            answered = await self.control.approve(
                sid, row.active_generation_id, tool_call_id, approved
            )
        if not answered:
            raise NotFound("no tool call is waiting for approval under that id")
        return {"tool_call_id": tool_call_id, "approved": approved}

    async def end(self, session_id: str, who: Principal) -> dict[str, Any]:
        sid = parse_session_id(session_id)
        async with self.sessionmaker() as db:
            row = await self._visible(db, sid, who, "manage")
        if row.ended_at is None:
            ended = await self.close_session(sid)
            if ended is not None:
                return self.session_out(ended)
            # Not ended by this call: a generation runs, or a concurrent end got there first.
            async with self.sessionmaker() as db:
                row = await self._visible(db, sid, who, "manage")
            if row.ended_at is None:
                raise Conflict("a generation is running; stop it before ending the session")
        # Ended already: an end cut short by a crash may have left the stream open.
        await self.store.append(stream_path(sid), AppendRequest(body=None, close=True))
        return self.session_out(row)

    async def close_session(
        self, sid: str, *, idle_before: datetime | None = None
    ) -> ChatSession | None:
        """End an open session in which nothing runs (with `idle_before`: only if untouched
        since then). Every end passes here — POST /end and every replica's idle sweep — and the
        conditional UPDATE lets exactly one caller win: it publishes the end, closes the stream
        and gets the row; the others get None. End-of-session hooks belong here."""
        now = datetime.now(UTC)
        async with self.sessionmaker.begin() as db:
            if not await repo.mark_ended(db, sid, now, idle_before):
                return None
            row = await repo.get_session(db, sid)
        assert row is not None
        assert row.ended_at is not None
        self.telemetry.session_ended(
            sid, row.user_id, row.message_count, row.created_at, row.ended_at
        )
        await self._publish_session(row)
        await self.store.append(stream_path(sid), AppendRequest(body=None, close=True))
        return row

    async def fork(self, session_id: str, at_message_id: str, who: Principal) -> dict[str, Any]:
        user_id = who.user_id
        sid = parse_session_id(session_id)
        async with self.sessionmaker() as db:
            row = await self._visible(db, sid, who, "read")
            messages = await repo.messages_of(db, sid)
        cut = next((i for i, m in enumerate(messages) if m.id == at_message_id), None)
        if cut is None:
            raise NotFound("no message with that id in this session")
        kept = messages[: cut + 1]
        if kept[-1].stream_offset is None:
            raise Conflict("that message is not on the stream yet; try again in a moment")
        if not who.is_system:
            # A fork makes a session: it counts against the same limit as creating one.
            await self.limiter.hit(SESSION_CREATE, who.user_id or who.email, user_id=user_id)
        new_id = str(uuid.uuid4())
        await self.store.create(
            stream_path(new_id),
            CreateRequest(
                content_type="application/json",
                forked_from=stream_path(sid),
                fork_pos=parse_offset(kept[-1].stream_offset),
            ),
        )
        now = datetime.now(UTC)
        fork_row = ChatSession(
            id=new_id,
            user_id=user_id,
            title=f"{row.title or 'Untitled'} (fork)",
            model=row.model,
            message_count=len(kept),
            cost_usd=Decimal(0),
            reserved_usd=Decimal(0),
            budget_usd=row.budget_usd,
            created_at=now,
            updated_at=now,
        )
        async with self.sessionmaker.begin() as db:
            db.add(fork_row)
            await db.flush()
            for m in kept:
                db.add(
                    ChatMessage(
                        session_id=new_id,
                        id=m.id,
                        ordinal=m.ordinal,
                        role=m.role,
                        content=m.content,
                        parts=m.parts,
                        status=m.status,
                        generation_id=m.generation_id,
                        stream_offset=m.stream_offset,
                        created_at=m.created_at,
                    )
                )
        await self._publish_session(fork_row)
        self.telemetry.session_started(new_id, fork_row.model, user_id)
        return self.session_out(fork_row)


def _check_visible(row: _V | None, who: Principal, need: Access, deleted: bool) -> _V:
    if row is None or (row.deleted_at is not None) != deleted:
        raise NotFound("no such session")
    allowed = {
        "read": who.can_read,
        "manage": who.can_manage,
        "own": who.owns,
    }[need](row.user_id)
    if not allowed:
        raise NotFound("no such session")
    return row


def _remaining(row: _SessionView) -> Decimal | None:
    if row.budget_usd is None or row.budget_usd <= 0:
        return None
    return Decimal(row.budget_usd) - Decimal(row.cost_usd) - Decimal(row.reserved_usd)


def _clean_title(text: str) -> str:
    title = " ".join(text.split()).strip().strip("\"'`*#").strip()
    if title.lower().startswith("title:"):
        title = title[6:].strip()
    return title[:80]

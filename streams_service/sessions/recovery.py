"""Restart recovery: closing the generations a dead process left running, as far as their
stream shows they got.

Separate from the runner (sessions/runner.py): it runs at start and then periodically
(sessions/upkeep.py), for generations no live process runs, from the database and the stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ChatSession, Generation
from streams_service.durable.store import StreamStore
from streams_service.ops.error_events import generation_error
from streams_service.sessions import records
from streams_service.sessions import repository as repo
from streams_service.sessions.generation import GenerationManager
from streams_service.sessions.generation_types import INTERRUPTED_MESSAGE

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Outcome:
    status: str  # generations.status
    message_status: str  # chat_messages.status
    finish: str | None = None
    code: str | None = None
    message: str | None = None


def _recovered_outcome(terminal: dict[str, Any] | None) -> _Outcome:
    """How a generation left running by a dead process is closed: as its terminal event on the
    stream says when it got that far (it died between that write and saving the answer),
    otherwise as interrupted, the same status a drain gives the runs it cannot wait for."""
    if terminal is None:
        return _Outcome(
            "interrupted", "interrupted", code="interrupted", message=INTERRUPTED_MESSAGE
        )
    if terminal.get("type") == "RUN_ERROR":
        raw = terminal.get("error")
        error: dict[str, Any] = raw if isinstance(raw, dict) else {}
        code = str(error.get("code") or "internal")
        status = "interrupted" if code == "interrupted" else "error"
        return _Outcome(status, status, code=code, message=str(error.get("message") or "")[:300])
    finish = str(terminal.get("finishReason") or "stop")
    if finish in ("stop", "length", "content_filter", "tool_calls"):
        return _Outcome("completed", "complete", finish=finish)
    return _Outcome(finish, "stopped", finish=finish)  # stopped, budget


async def recover_interrupted(
    sessionmaker: async_sessionmaker[AsyncSession], store: StreamStore, manager: GenerationManager
) -> int:
    """Close generations a crashed process left running: the session accepts messages again,
    the partial answer on the stream is kept as an interrupted message, and readers get a
    terminal RUN_ERROR. Returns how many were closed."""
    now = datetime.now(UTC)
    async with sessionmaker() as db:
        stale = timedelta(seconds=manager.settings.generation_stale_after_s)
        leftovers = await repo.interrupted_leftovers(db, now - stale)
    # Generations this process runs are alive whatever their heartbeat says (this also runs
    # periodically, not only at start, so that a replica that died is cleaned up by the others).
    alive = {h.spec.generation_id for h in manager.running.values()}
    leftovers = [g for g in leftovers if g.id not in alive]
    closed = 0
    for gen in leftovers:
        path = f"sessions/{gen.session_id}"
        text, terminal = await _partial_text(store, path, gen.message_id, gen.id)
        outcome = _recovered_outcome(terminal)
        async with sessionmaker.begin() as db:
            # Conditional, so that when several replicas recover at once each generation is
            # closed (and its message saved, its RUN_ERROR written) exactly once.
            claimed = await db.execute(
                update(Generation)
                .where(Generation.id == gen.id, Generation.status == "running")
                .values(
                    status=outcome.status,
                    finish_reason=outcome.finish,
                    error_code=outcome.code,
                    error_message=outcome.message,
                    finished_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if getattr(claimed, "rowcount", 0) != 1:
                continue
            if outcome.code is not None:
                db.add(
                    generation_error(
                        at=now,
                        code=outcome.code,
                        message=outcome.message,
                        session_id=gen.session_id,
                        generation_id=gen.id,
                        user_id=gen.user_id,
                        model=gen.model,
                    )
                )
            await repo.insert_message(
                db,
                session_id=gen.session_id,
                id=gen.message_id,
                role="assistant",
                content=text,
                parts=[{"type": "text", "content": text}] if text else [],
                status=outcome.message_status,
                generation_id=gen.id,
                created_at=now,
            )
            await repo.release_generation(db, gen.session_id, gen.id, gen.reserved_usd)
            await db.execute(
                update(ChatSession)
                .where(ChatSession.id == gen.session_id)
                .values(message_count=ChatSession.message_count + 1, updated_at=now)
            )
        if terminal is not None:
            # Readers already saw how this run ended: the record now says the same, and
            # nothing more goes on the stream (a second terminal event would contradict it).
            closed += 1
            continue
        error = records.event(
            "RUN_ERROR", runId=gen.id, error={"message": INTERRUPTED_MESSAGE, "code": "interrupted"}
        )
        row = records.chunk_record(
            message_id=gen.message_id,
            actor_id="claude",
            role="assistant",
            seq=10**9,  # after anything the dead process wrote
            chunk=error,
            created_at=records.now_iso(),
        )
        try:
            await store.append(path, records.append([row]))
        except Exception as exc:
            log.warning("recovery_append_failed", error=type(exc).__name__)
        closed += 1
    if closed:
        log.info("generations_recovered", count=closed)
    return closed


async def _partial_text(
    store: StreamStore, path: str, message_id: str, run_id: str
) -> tuple[str, dict[str, Any] | None]:
    """The text a generation had streamed before it died, rebuilt from its stream records, and
    its terminal event (RUN_FINISHED or RUN_ERROR) if that had been written already."""
    pieces: list[str] = []
    terminal: dict[str, Any] | None = None
    position = 0
    try:
        while True:
            result = await store.read(path, position, 4 * 1024 * 1024)
            for _, data in result.chunks:
                for item in json.loads(b"[" + data + b"]"):
                    value = item.get("value") if isinstance(item, dict) else None
                    if not isinstance(value, dict) or value.get("messageId") != message_id:
                        continue
                    chunk = json.loads(value.get("chunk", "{}"))
                    kind = chunk.get("type")
                    if kind == "TEXT_MESSAGE_CONTENT":
                        pieces.append(chunk.get("delta", ""))
                    elif kind in ("RUN_FINISHED", "RUN_ERROR") and chunk.get("runId") == run_id:
                        terminal = chunk
            position = result.next_pos
            if result.up_to_date:
                break
    except Exception as exc:
        log.warning("partial_text_unavailable", error=type(exc).__name__)
    return "".join(pieces), terminal

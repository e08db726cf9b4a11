"""Generation as a task the service owns (DESIGN §2): it outlives the request that started it.

GenerationManager starts a process's generations, heartbeats them, lets routes stop them or
answer approvals, and drains them at shutdown. Each generation's own loop is in
sessions/runner.py; the close of generations a dead process left running in
sessions/recovery.py; the spec and handle both sides hold in sessions/generation_types.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import anthropic
import structlog
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db import pg_direct
from db.models import Generation
from streams_service.config import Settings
from streams_service.durable.store import StreamStore
from streams_service.llm.models import ModelInfo
from streams_service.observability.telemetry import Telemetry
from streams_service.sessions.chunks import Flusher
from streams_service.sessions.generation_types import GenerationSpec, Handle, cancel_quietly
from streams_service.sessions.memo import Memos
from streams_service.sessions.runner import Runner

log = structlog.get_logger(__name__)

# Concurrent generations the base flush interval holds for; beyond it the interval grows in
# proportion, keeping the process's write rate near (this many / base interval) per second.
FLUSH_BASE_GENERATIONS = 100


def flush_interval_s(running: int, base_ms: int, max_ms: int) -> float:
    """The coalescing interval for `running` concurrent generations: the base up to
    FLUSH_BASE_GENERATIONS, then proportionally longer, capped at `max_ms`."""
    stretched = base_ms * running / FLUSH_BASE_GENERATIONS
    return min(max(base_ms, max_ms), max(base_ms, stretched)) / 1000


class FlushPace:
    """`flush_interval_s` for a count of running generations, kept for the last count asked.
    The Flusher asks on every registration and every tick, tens of thousands of times a second
    at 500 generations, while the count changes at most once per start or end: the arithmetic
    each time was 1.5% of the event loop there (py-spy); through GenerationManager a call is
    ~0.47 µs recomputed, ~0.13 µs remembered."""

    def __init__(self, base_ms: int, max_ms: int) -> None:
        self._base_ms, self._max_ms = base_ms, max_ms
        self._running = -1
        self._interval = 0.0

    def __call__(self, running: int) -> float:
        if running != self._running:
            self._running = running
            self._interval = flush_interval_s(running, self._base_ms, self._max_ms)
        return self._interval


# Generation ids per heartbeat statement (bound parameters stay well under SQLite's limit).
HEARTBEAT_IDS_PER_STATEMENT = 500


class GenerationManager:
    """Runs generations of this process and lets routes stop them or answer approvals."""

    def __init__(
        self,
        settings: Settings,
        store: StreamStore,
        sessionmaker: async_sessionmaker[AsyncSession],
        client: anthropic.AsyncAnthropic,
        search_history: Callable[[str | None, str, int], Awaitable[list[dict[str, Any]]]],
        title_model: ModelInfo | None,
        instance: str,
        *,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sessionmaker = sessionmaker
        # Postgres: where a generation's usual finish, one statement, runs without a session.
        self.autocommit = pg_direct.autocommit_engine(sessionmaker.kw["bind"])
        self.client = client
        self.search_history = search_history
        self.title_model = title_model
        self.instance = instance
        # Metrics, analytics and error reports (streams_service/observability/).
        self.telemetry = telemetry or Telemetry()
        self.running: dict[str, Handle] = {}
        # Sessions whose next send can call Claude before reading them (sessions/memo.py).
        self.memos = Memos()
        # One timer writes every generation's pending deltas (sessions/chunks.py).
        self._pace = FlushPace(
            settings.stream_flush_interval_ms, settings.stream_flush_max_interval_ms
        )
        self.flusher = Flusher(self.flush_interval_s)
        # Called after a session's first exchange completes (titles); set by the session layer.
        self.on_first_exchange: Callable[[str, str], Coroutine[Any, Any, None]] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Refreshes the heartbeat of every generation running here while any runs.
        self._heartbeat: asyncio.Task[None] | None = None
        # Set once a drain has run out of time: a generation a racing send starts after that
        # ends at once as interrupted (it is saved and closed like the others).
        self.interrupting = False

    def flush_interval_s(self) -> float:
        """How long a generation's deltas may wait to be written, given how many run here."""
        return self._pace(len(self.running))

    def start(self, spec: GenerationSpec) -> Handle:
        handle = Handle(spec)
        self.memos.take(spec.session_id)  # this generation changes the conversation
        if self.interrupting:
            handle.stop_reason = "interrupted"
        handle.displaced = self.running.get(spec.session_id)
        self.running[spec.session_id] = handle
        runner = Runner(self, handle)
        # The upstream call is a task of its own (stop cancels it) started here, not from the
        # run task: its request then goes out on the loop's next turn, while the send finishes
        # its transaction, rather than one turn later (a turn is milliseconds under load).
        handle.inner = asyncio.create_task(runner.turns(), name=f"upstream-{spec.generation_id}")
        handle.task = asyncio.create_task(
            self._run(handle, runner), name=f"generation-{spec.generation_id}"
        )
        if self._heartbeat is None and not self.interrupting:
            self._heartbeat = asyncio.create_task(self._beat(), name="generation-heartbeats")
        return handle

    def generation_ids(self) -> list[str]:
        """The generations running in this process, a session's displaced one included."""
        ids = []
        for handle in self.running.values():
            current: Handle | None = handle
            while current is not None and not current.done.is_set():
                ids.append(current.spec.generation_id)
                current = current.displaced
        return ids

    async def _beat(self) -> None:
        """One statement refreshes every running generation's heartbeat, four times per
        staleness window (a live generation is never taken for a dead one), for as long as
        any runs; the next start starts it again. One per generation was a transaction each
        (three round trips through the ORM) every 15 s: at 500 generations 33 a second, ~2%
        of the event loop, and a task each."""
        try:
            while True:
                await asyncio.sleep(self.settings.generation_stale_after_s / 4)
                ids = self.generation_ids()
                if not ids:
                    return
                try:
                    async with self.sessionmaker.begin() as db:
                        now = datetime.now(UTC)
                        for at in range(0, len(ids), HEARTBEAT_IDS_PER_STATEMENT):
                            await db.execute(
                                update(Generation)
                                .where(
                                    Generation.id.in_(ids[at : at + HEARTBEAT_IDS_PER_STATEMENT])
                                )
                                .values(heartbeat_at=now)
                            )
                except Exception as exc:
                    log.warning("heartbeat_failed", error=type(exc).__name__)
        finally:
            if self._heartbeat is asyncio.current_task():
                self._heartbeat = None

    async def stop(self, session_id: str, reason: str = "stopped") -> Handle | None:
        handle = self.running.get(session_id)
        if handle is None:
            return None
        if handle.stop_reason is None:
            handle.stop_reason = reason
        if handle.inner is not None:
            handle.inner.cancel()
        for future in handle.approvals.values():
            if not future.done():
                future.set_result(False)
        return handle

    async def abandon(self, handle: Handle) -> None:
        """End a generation whose user message never reached the stream. It has written
        nothing (its writes wait for that append) and saves nothing: it is cancelled, upstream
        call included, and forgotten."""
        await cancel_quietly(handle.inner)
        await cancel_quietly(handle.task)
        self._forget(handle)  # its task's own cleanup never ran if it was cancelled unstarted

    def finishing(self, session_id: str) -> asyncio.Event | None:
        """The `done` event of this session's generation if it is past its terminal event."""
        handle = self.running.get(session_id)
        return handle.done if handle is not None and handle.finishing else None

    def answer_approval(self, session_id: str, tool_call_id: str, approved: bool) -> bool:
        handle = self.running.get(session_id)
        future = handle.approvals.get(tool_call_id) if handle else None
        if future is None or future.done():
            return False
        future.set_result(approved)
        return True

    async def shutdown(self, timeout_s: float) -> None:
        """Let running generations finish within `timeout_s`; end the rest as interrupted."""
        for task in list(self._background):
            task.cancel()
        # Re-read `running` on every round, never a snapshot: a send accepted just before the
        # drain began may start its generation a moment later, and it must be waited for too.
        await self._wait_running(timeout_s)
        self.interrupting = True
        for handle in list(self.running.values()):
            await self.stop(handle.spec.session_id, reason="interrupted")
        # Interrupted runs write their terminal event and save the partial answer: quick.
        await self._wait_running(10)
        await cancel_quietly(self._heartbeat)

    async def _wait_running(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.running and loop.time() < deadline:
            waits = {asyncio.ensure_future(h.done.wait()) for h in self.running.values()}
            _, pending = await asyncio.wait(
                waits, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            for w in pending:
                w.cancel()

    async def _run(self, handle: Handle, runner: Runner) -> None:
        try:
            await runner.run()
        except Exception:
            log.exception("generation_crashed", generation_id=handle.spec.generation_id)
        finally:
            self._forget(handle)

    def _forget(self, handle: Handle) -> None:
        sid = handle.spec.session_id
        if self.running.get(sid) is handle:
            previous = handle.displaced
            if previous is not None and not previous.done.is_set():
                self.running[sid] = previous
            else:
                del self.running[sid]
        handle.displaced = None
        handle.done.set()

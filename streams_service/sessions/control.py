"""Stop and approval requests that reach a replica other than the one running the generation.

A generation runs as a task in exactly one process (its `owner`). A stop or an approval sent to
another replica is forwarded through Postgres: NOTIFY on `chatops_control` with a small JSON
payload, which every process LISTENs to on the connection that already carries the stream
wake-ups (durable/live.py). Only the process running that generation acts on it:

    {"op": "stop", "session_id", "generation_id"}
    {"op": "approve", "session_id", "generation_id", "tool_call_id", "approved", "request_id"}
    {"op": "ack", "request_id", "ok"}        the owner's answer to an approval

A forwarded stop answers once the generation has ended (its row is no longer `running`), so it
means what a local stop means. A forwarded approval answers with the owner's verdict, so an
unknown tool call still gets a clear 404. On SQLite there is one process and none of this runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Coroutine
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from streams_service.errors import ServiceUnavailable
from streams_service.sessions import repository as repo
from streams_service.sessions.generation import GenerationManager

log = structlog.get_logger(__name__)

CHANNEL = "chatops_control"
# A forwarded stop waits this long for the generation to end. Bounded so that a replica that
# died mid-generation cannot hang the request; the crash recovery closes its generations.
STOP_WAIT_S = 15.0
STOP_POLL_S = 0.05
# A NOTIFY sent while the owner's listener was reconnecting is lost; a stop is idempotent, so it
# is simply sent again while waiting.
STOP_RESEND_S = 1.0
# How long an approval waits for the owner's answer (it answers in milliseconds when alive).
ACK_WAIT_S = 5.0
# Tool call ids are short (`toolu_...`); a longer one cannot be waiting, and NOTIFY payloads are
# capped at 8000 bytes.
MAX_ID_CHARS = 128


class OwnerUnavailable(ServiceUnavailable):
    code = "owner_unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "2"})


class ControlBus:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker
        # Set once the manager exists (the listener that feeds this bus starts before it).
        self.generations: GenerationManager | None = None
        self._acks: dict[str, asyncio.Future[bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ the replica that got the call

    async def stop(self, session_id: str, generation_id: str) -> None:
        """Ask the owner to stop the generation; return once it has ended."""
        payload = {"op": "stop", "session_id": session_id, "generation_id": generation_id}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_WAIT_S
        resend_at = loop.time()
        while True:
            if loop.time() >= resend_at:
                await self._publish(payload)
                resend_at = loop.time() + STOP_RESEND_S
            if not await self._running(generation_id):
                return
            if loop.time() >= deadline:
                raise OwnerUnavailable(
                    "the replica running this generation did not stop it in time; try again"
                )
            await asyncio.sleep(STOP_POLL_S)

    async def approve(
        self, session_id: str, generation_id: str, tool_call_id: str, approved: bool
    ) -> bool:
        """Forward an approval; True when the owner had a tool call waiting under that id."""
        if len(tool_call_id) > MAX_ID_CHARS:
            return False
        request_id = uuid.uuid4().hex
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks[request_id] = answer
        try:
            await self._publish(
                {
                    "op": "approve",
                    "session_id": session_id,
                    "generation_id": generation_id,
                    "tool_call_id": tool_call_id,
                    "approved": approved,
                    "request_id": request_id,
                }
            )
            try:
                async with asyncio.timeout(ACK_WAIT_S):
                    return await answer
            except TimeoutError:
                # Nobody answered: either the generation ended meanwhile (nothing is waiting),
                # or its replica is unreachable.
                if not await self._running(generation_id):
                    return False
                raise OwnerUnavailable(
                    "the replica running this generation did not answer; try again"
                ) from None
        finally:
            self._acks.pop(request_id, None)

    # ------------------------------------------------------------ every process

    def on_payload(self, payload: str) -> None:
        """Listener callback (synchronous): act on messages for generations this process runs."""
        try:
            message = json.loads(payload)
            op = message["op"]
        except (ValueError, KeyError, TypeError):
            log.warning("control_payload_invalid")
            return
        if op == "ack":
            answer = self._acks.get(str(message.get("request_id")))
            if answer is not None and not answer.done():
                answer.set_result(message.get("ok") is True)
            return
        generations = self.generations
        session_id = message.get("session_id")
        handle = generations.running.get(session_id) if generations and session_id else None
        if handle is None or handle.spec.generation_id != message.get("generation_id"):
            return  # not ours (or no longer running): the owner, if any, answers
        assert generations is not None
        if op == "stop":
            self._spawn(_discard(generations.stop(session_id)))
        elif op == "approve":
            ok = generations.answer_approval(
                session_id, str(message.get("tool_call_id")), message.get("approved") is True
            )
            self._spawn(
                self._publish({"op": "ack", "request_id": message.get("request_id"), "ok": ok})
            )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------ plumbing

    async def _publish(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":"))
        # NOTIFY is delivered to every listening process when this transaction commits.
        async with self.sessionmaker.begin() as db:
            await db.execute(
                text("SELECT pg_notify(:channel, :body)"), {"channel": CHANNEL, "body": body}
            )

    async def _running(self, generation_id: str) -> bool:
        async with self.sessionmaker() as db:
            generation = await repo.get_generation(db, generation_id)
            return generation is not None and generation.status == "running"

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(self._guard(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guard(work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception as exc:
            log.warning("control_action_failed", error=type(exc).__name__)


async def _discard(work: Coroutine[Any, Any, object]) -> None:
    await work

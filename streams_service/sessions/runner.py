"""One generation's run, the per-generation loop (DESIGN §2).

A runner calls Claude through the official SDK (against the simulator when no key is set), maps
the SDK's events to AG-UI events on the session stream, runs tools (asking for approval where a
tool needs it), and persists the assistant message, usage and cost when it finishes, stops or
fails. Only an explicit stop, the budget, a fault, the watchdog or shutdown ends it early.

Separate from sessions/generation.py, whose GenerationManager starts, stops and heartbeats the
runners: this module imports the manager for types only, since the manager imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2
import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from db import pg_direct
from streams_service.errors import DATABASE_UNAVAILABLE
from streams_service.llm import tools as tool_registry
from streams_service.llm.models import (
    EXACT_CONTEXT,
    PER_MTOK,
    ModelInfo,
    Usage,
    cost_usd,
    round_usd,
)
from streams_service.llm.stream import MessageAccumulator, UpstreamStalled, stream_message
from streams_service.ops.error_events import generation_error
from streams_service.sessions import records
from streams_service.sessions import repository as repo
from streams_service.sessions.chunks import STORAGE_RETRY_S, ChunkWriter
from streams_service.sessions.generation_types import INTERRUPTED_MESSAGE, Handle, cancel_quietly
from streams_service.sessions.memo import StoredRow

if TYPE_CHECKING:
    from streams_service.sessions.generation import GenerationManager

log = structlog.get_logger(__name__)

RATELIMIT_PREFIX = "anthropic-ratelimit-"
SYSTEM_PROMPT = (
    "You are Claude, the assistant in the company's internal chat console. Staff use you for "
    "their daily work. Be accurate and concise; use the tools you are given when they help."
)


class UpstreamCut(Exception):
    """The upstream stream ended before `message_stop` (SDK 2.x raises nothing for this)."""


class BudgetExceeded(Exception):
    pass


@dataclass
class _Part:
    kind: str  # text | thinking | tool-call | tool-result
    data: dict[str, Any]


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(code, message) of a failed generation, in the codes the UI can explain."""
    if isinstance(exc, anthropic.RateLimitError):
        return "rate_limited", "Claude's rate limit was reached; try again shortly."
    if isinstance(exc, anthropic.AuthenticationError | anthropic.PermissionDeniedError):
        return "auth", "The service's Anthropic credentials were rejected."
    if isinstance(
        exc,
        anthropic.BadRequestError | anthropic.NotFoundError | anthropic.UnprocessableEntityError,
    ):
        return "invalid_request", _upstream_message(exc, "Claude rejected the request.")
    if isinstance(exc, anthropic.APIStatusError):
        # 5xx, 529, and errors sent inside an open stream (status 200, e.g. overloaded_error).
        return "overloaded", _upstream_message(exc, "Claude is overloaded; try again shortly.")
    if isinstance(exc, UpstreamStalled):
        return "upstream_cut", "Claude stopped responding; the answer so far is kept."
    if isinstance(exc, UpstreamCut | anthropic.APIConnectionError | httpx2.TransportError):
        # A connection dropped mid-stream surfaces as the transport's own error (SDK 2.x).
        return "upstream_cut", "The connection to Claude was cut; the answer so far is kept."
    return "internal", "The generation failed unexpectedly."


def _upstream_message(exc: anthropic.APIStatusError, fallback: str) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:300]
    return fallback


class Runner:
    def __init__(self, manager: GenerationManager, handle: Handle) -> None:
        self.m = manager
        self.h = handle
        self.spec = handle.spec
        self.settings = manager.settings
        self.parts: list[_Part] = []
        self.text_open = False
        self.text_seen = False
        self.usage_calls: list[Usage] = []
        self.cost = Decimal(0)
        self.started = time.monotonic()
        self.ttft_ms: int | None = None
        self.ratelimit: dict[str, str] | None = None
        self.thinking_steps = 0
        spec = self.spec
        self.writer = ChunkWriter(
            manager.store,
            spec.stream_path,
            message_id=spec.message_id,
            producer_id=f"gen-{spec.generation_id}",
            flush_chars=self.settings.stream_flush_chars,
            flusher=manager.flusher,
            ready=spec.user_appended,
        )
        self.output_chars = 0
        self.current_input_tokens = 0
        self._allowance_key: tuple[Decimal, int] | None = None
        self._allowance = -1

    async def run(self) -> None:
        spec = self.spec
        inner = self.h.inner  # upstream first: its request is on the wire while RUN_STARTED is
        assert inner is not None  # written (GenerationManager.start)
        async with self.writer as writer:
            try:
                await writer.emit(
                    records.event("RUN_STARTED", runId=spec.generation_id, threadId=spec.session_id)
                )
            except BaseException:
                await cancel_quietly(inner)
                raise
            error: BaseException | None = None
            finish = "stop"
            try:
                finish = await inner
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                finish = self.h.stop_reason or "stopped"
            except BudgetExceeded:
                finish = "budget"
            except Exception as exc:
                error = exc
            await self._finish(finish, error)

    # ------------------------------------------------------------------ the tool loop

    async def turns(self) -> str:
        conversation = list(self.spec.history)
        for _turn in range(self.settings.max_tool_turns):
            final = await self._one_call(conversation)
            stop_reason = final.stop_reason
            if stop_reason != "tool_use":
                return {
                    "max_tokens": "length",
                    "refusal": "content_filter",
                }.get(stop_reason or "", "stop")
            content = final.content
            results = []
            for block in content:
                if block.get("type") == "tool_use":
                    tool_input = block.get("input")
                    results.append(
                        await self._run_tool(
                            str(block.get("id")),
                            str(block.get("name")),
                            dict(tool_input) if isinstance(tool_input, dict) else {},
                        )
                    )
            # Sent back as the API gave it (thinking signatures included), as the SDK would.
            conversation.append(
                {"role": "assistant", "content": [_without_nones(b) for b in content]}
            )
            conversation.append({"role": "user", "content": results})
        return "tool_calls"

    async def _one_call(self, conversation: list[dict[str, Any]]) -> MessageAccumulator:
        spec = self.spec
        params: dict[str, Any] = {
            "model": spec.model.id,
            "max_tokens": self.settings.generation_max_output_tokens,
            "system": SYSTEM_PROMPT,
            "messages": conversation,
            "tools": tool_registry.tool_specs(),
        }
        thinking = _thinking_param(spec.model, self.settings.generation_max_output_tokens)
        if thinking is not None:
            params["thinking"] = thinking
        stall = self.settings.generation_stall_timeout_s
        async with stream_message(self.m.client, params, stall_s=stall) as stream:
            if spec.confirmed is not None:
                await spec.confirmed  # a guess of the send's: see GenerationSpec.confirmed
            self.ratelimit = {
                k: v for k, v in stream.headers.items() if k.startswith(RATELIMIT_PREFIX)
            }
            # The watchdog: a read that waits longer than `stall` raises UpstreamStalled
            # (asyncio.timeout inside, not wait_for: it never swallows an outside cancel).
            async for event in stream.events(self._read_pause, read_timeout=stall):
                # Checked on every event as well as by cancelling the task: Python 3.11's
                # wait_for could lose a cancellation that raced a finishing read, so stop
                # must not rest on the cancellation alone.
                if self.h.stop_reason is not None:
                    raise asyncio.CancelledError()
                kind = event["type"]
                if kind == "content_block_delta":
                    # The token path, without a coroutine per delta: most only merge.
                    if self._on_delta(event):
                        await self.writer.flush()
                    continue
                if kind == "message_start":
                    self.current_input_tokens = _total_input(stream.accumulated.usage)
                await self._on_event(event, stream.accumulated)
        final = stream.accumulated
        usage = Usage.from_anthropic(final.usage)
        self.usage_calls.append(usage)
        self.cost += cost_usd(spec.model, usage)
        if not final.saw_stop:
            raise UpstreamCut()
        return final

    async def _on_event(self, event: dict[str, Any], message: MessageAccumulator) -> None:
        """Every event but the deltas, which `_one_call` hands to `_on_delta` directly."""
        kind = event["type"]
        mid = self.spec.message_id
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            btype = block.get("type")
            if btype == "text":
                if not self.text_open:
                    self.text_open = True
                    await self.writer.emit(
                        records.event("TEXT_MESSAGE_START", messageId=mid, role="assistant"),
                        defer=True,
                    )
                # Text after a tool call starts a new paragraph of the same message.
                lead = "\n\n" if any(p.kind == "text" for p in self.parts) else ""
                self.parts.append(_Part("text", {"type": "text", "content": lead}))
                if lead:
                    await self.writer.emit(
                        records.event("TEXT_MESSAGE_CONTENT", messageId=mid, delta=lead)
                    )
            elif btype == "thinking":
                self.thinking_steps += 1
                step = f"thinking-{self.thinking_steps}"
                self.parts.append(
                    _Part("thinking", {"type": "thinking", "content": "", "step": step})
                )
                await self.writer.emit(
                    records.event("STEP_STARTED", stepId=step, stepType="thinking"), defer=True
                )
            elif btype == "tool_use":
                self.parts.append(
                    _Part(
                        "tool-call",
                        {
                            "type": "tool-call",
                            "id": block.get("id"),
                            "name": block.get("name"),
                            "arguments": "",
                            "state": "input-streaming",
                        },
                    )
                )
                await self.writer.emit(
                    records.event(
                        "TOOL_CALL_START",
                        toolCallId=block.get("id"),
                        toolName=block.get("name"),
                        index=event.get("index"),
                    )
                )
        elif kind == "content_block_stop":
            block = message.block(event.get("index"))
            if block is not None and block.get("type") == "tool_use":
                tool_input = block.get("input", {})
                for done in reversed(self.parts):
                    if done.kind == "tool-call" and done.data["id"] == block.get("id"):
                        done.data["arguments"] = json.dumps(tool_input)
                        done.data["state"] = "input-complete"
                        break
                await self.writer.emit(
                    records.event(
                        "TOOL_CALL_END",
                        toolCallId=block.get("id"),
                        toolName=block.get("name"),
                        input=tool_input,
                    )
                )

    def _on_delta(self, event: dict[str, Any]) -> bool:
        """A `content_block_delta`, queued on the stream: True when it must be written now
        (the answer's first words, or enough pending). Synchronous: tokens are most events."""
        delta = event.get("delta") or {}
        dtype = delta.get("type")
        last = self.parts[-1] if self.parts else None
        write_now = False
        if dtype == "text_delta" and last is not None and last.kind == "text":
            text = delta.get("text", "")
            self._first_token()
            last.data["content"] += text
            self.output_chars += len(text)
            # The first words go out at once (time to first token); the rest are coalesced.
            first_text = not self.text_seen
            self.text_seen = True
            write_now = self.writer.queue(
                records.event("TEXT_MESSAGE_CONTENT", messageId=self.spec.message_id, delta=text),
                flush=first_text,
            )
        elif dtype == "thinking_delta" and last is not None and last.kind == "thinking":
            text = delta.get("thinking", "")
            first = self._first_token()
            part = last.data
            part["content"] += text
            self.output_chars += len(text)
            write_now = self.writer.queue(
                records.event("STEP_FINISHED", stepId=part["step"], delta=text), flush=first
            )
        elif dtype == "input_json_delta" and last is not None and last.kind == "tool-call":
            text = delta.get("partial_json", "")
            part = last.data
            part["arguments"] += text
            self.output_chars += len(text)
            write_now = self.writer.queue(
                records.event("TOOL_CALL_ARGS", toolCallId=part["id"], delta=text)
            )
        # What is queued stays queued if the budget check raises: the end writes it with the
        # error, as when the check ran after an awaited emit.
        self._check_budget()
        return write_now

    def _read_pause(self, resume: Callable[[], None]) -> asyncio.Future[None] | None:
        """Between reads of upstream: write what this read brought, then sleep until this
        message's next timed write (the Flusher wakes the generation instead of writing for
        it). Meanwhile upstream's events wait in the socket and are then read in one go: one
        wake-up, one read and one write per coalescing interval instead of work per upstream
        event, and each delta waits at most about the interval in all. No sleeping until the
        first words are out (time to first token): a delta arriving meanwhile would wait."""
        if not self.text_seen:
            return None
        self.writer.flush_from_timer()
        return self.writer.until_next_write(resume)

    def _first_token(self) -> bool:
        if self.ttft_ms is None:
            self.ttft_ms = int((time.monotonic() - self.started) * 1000)
            return True
        return False

    def _check_budget(self) -> None:
        remaining = self.spec.budget_remaining
        if remaining is None:
            return
        # Output so far is estimated from characters (about 4 per token) until usage arrives.
        # This runs on every delta, so the Decimal arithmetic runs only when the inputs of the
        # allowance change (a new upstream call), not per token.
        key = (self.cost, self.current_input_tokens)
        if key != self._allowance_key:
            self._allowance_key = key
            self._allowance = output_allowance(
                self.spec.model, self.cost, self.current_input_tokens, remaining
            )
        if self.output_chars // 4 > self._allowance:
            raise BudgetExceeded()

    async def _run_tool(
        self, tool_call_id: str, name: str, tool_input: dict[str, Any]
    ) -> dict[str, Any]:
        tool = tool_registry.get_tool(name)
        part = next(
            (
                p
                for p in reversed(self.parts)
                if p.kind == "tool-call" and p.data["id"] == tool_call_id
            ),
            None,
        )
        approved = True
        if tool is not None and tool.requires_approval:
            approved = await self._ask_approval(tool_call_id, name, tool_input, part)
        if tool is None:
            result = tool_registry.ToolResult(f"unknown tool {name!r}", is_error=True)
        elif not approved:
            result = tool_registry.ToolResult("User denied permission", is_error=True)
        else:
            ctx = tool_registry.ToolContext(
                user_id=self.spec.user_id,
                session_id=self.spec.session_id,
                search_history=lambda q, limit: self.m.search_history(self.spec.user_id, q, limit),
            )
            try:
                result = await tool.run(tool_input, ctx)
            except Exception as exc:
                result = tool_registry.ToolResult(
                    f"tool failed: {type(exc).__name__}", is_error=True
                )
        if tool is not None:
            self.m.telemetry.tool_executed(self.spec.session_id, self.spec.user_id, name, approved)
        content = tool_registry.sanitize_tool_output(result.content)
        if part is not None:
            part.data["output"] = content
        self.parts.append(
            _Part(
                "tool-result",
                {
                    "type": "tool-result",
                    "toolCallId": tool_call_id,
                    "content": content,
                    "state": "error" if result.is_error else "complete",
                },
            )
        )
        await self.writer.emit(
            records.event(
                "TOOL_CALL_END",
                toolCallId=tool_call_id,
                toolName=name,
                result=content,
                isError=result.is_error,
            )
        )
        return {
            "type": "tool_result",
            "tool_use_id": tool_call_id,
            "content": content,
            "is_error": result.is_error,
        }

    async def _ask_approval(
        self, tool_call_id: str, name: str, tool_input: dict[str, Any], part: _Part | None
    ) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.h.approvals[tool_call_id] = future
        if part is not None:
            part.data["state"] = "approval-requested"
            part.data["approval"] = {"id": tool_call_id, "needsApproval": True}
        await self.writer.emit(
            records.event(
                "CUSTOM",
                name="approval-requested",
                data={
                    "toolCallId": tool_call_id,
                    "toolName": name,
                    "input": tool_input,
                    "approval": {"id": tool_call_id, "needsApproval": True},
                },
            )
        )
        reason = "answered"
        try:
            async with asyncio.timeout(self.settings.approval_timeout_s):
                approved = await asyncio.shield(future)
        except TimeoutError:
            approved, reason = False, "timeout"
        finally:
            self.h.approvals.pop(tool_call_id, None)
        if self.h.stop_reason is not None:
            raise asyncio.CancelledError()
        if part is not None:
            part.data["state"] = "approval-responded"
            part.data["approval"]["approved"] = approved
        await self.writer.emit(
            records.event(
                "CUSTOM",
                name="approval-responded",
                data={"toolCallId": tool_call_id, "approved": approved, "reason": reason},
            )
        )
        return approved

    # ------------------------------------------------------------------ the end

    async def _finish(self, finish: str, error: BaseException | None) -> None:
        spec = self.spec
        if self.text_open:
            # Written with the terminal event below, in one append (nothing waits in between).
            await self.writer.emit(
                records.event("TEXT_MESSAGE_END", messageId=spec.message_id), defer=True
            )
        code = message = None
        status = (
            "completed" if finish in ("stop", "length", "content_filter", "tool_calls") else finish
        )
        if error is not None:
            code, message = classify_error(error)
            status = "error"
            if code == "internal":
                log.error(
                    "generation_failed",
                    generation_id=spec.generation_id,
                    error=type(error).__name__,
                )
        elif finish == "interrupted":
            code, message = "interrupted", INTERRUPTED_MESSAGE
        if (
            not self.usage_calls
            and error is None
            and finish in ("stopped", "interrupted", "budget")
        ):
            # Ended before upstream reported usage: charge the visible output as an estimate.
            self.cost += cost_usd(
                spec.model,
                Usage(input_tokens=self.current_input_tokens, output_tokens=self.output_chars // 4),
            )
        usage = _sum_usage(self.usage_calls)
        total_input = (
            usage.input_tokens
            + usage.cache_read_tokens
            + usage.cache_write_5m_tokens
            + usage.cache_write_1h_tokens
        )
        usage_event = {
            "promptTokens": total_input,
            "completionTokens": usage.output_tokens,
            "totalTokens": total_input + usage.output_tokens,
        }
        # The stream first, then the database: when a client sees the session idle, the stream
        # already holds the whole answer and its terminal event.
        self.h.finishing = True
        if code is not None:
            terminal = records.event(
                "RUN_ERROR", runId=spec.generation_id, error={"message": message, "code": code}
            )
        else:
            terminal = records.event(
                "RUN_FINISHED", runId=spec.generation_id, finishReason=finish, usage=usage_event
            )
        try:
            await self.writer.emit(terminal)
            await self.writer.flush()
        except Exception as exc:
            log.error(
                "terminal_event_failed", generation_id=spec.generation_id, error=type(exc).__name__
            )
        # Before the session turns idle, so whoever sees it idle sees the metrics moved too.
        self.m.telemetry.generation_finished(
            session_id=spec.session_id,
            generation_id=spec.generation_id,
            user_id=spec.user_id,
            model=spec.model.id,
            status=status,
            error_code=code,
            error=error,
            ttft_ms=self.ttft_ms,
            duration_s=time.monotonic() - self.started,
            usage=usage,
            cost=self.cost,
            answer_length=sum(len(p.data["content"]) for p in self.parts if p.kind == "text"),
        )
        persisted = await self._persist(
            status, finish if error is None else None, code, message, usage, self.writer.last_offset
        )
        hook = self.m.on_first_exchange
        if persisted and status == "completed" and spec.is_first_exchange and hook is not None:
            task: asyncio.Task[None] = asyncio.create_task(
                hook(spec.session_id, spec.first_user_text)
            )
            self.m._background.add(task)
            task.add_done_callback(self.m._background.discard)

    async def _persist(
        self,
        status: str,
        finish: str | None,
        code: str | None,
        message: str | None,
        usage: Usage,
        stream_offset: str | None,
        *,
        retry_until: float | None = None,
        retry_delay: float = 0.1,
    ) -> bool:
        spec = self.spec
        now = datetime.now(UTC)
        if retry_until is None:
            retry_until = time.monotonic() + STORAGE_RETRY_S
        parts = [_public_part(p) for p in self.parts]
        text = "".join(p.data["content"] for p in self.parts if p.kind == "text")
        cost = round_usd(self.cost)
        message_status = {"completed": "complete", "stopped": "stopped", "budget": "stopped"}.get(
            status, status
        )

        async def write(db: AsyncSession | None, pg: pg_direct.Direct | None) -> None:
            """The four writes of a finish (one statement on Postgres, inside `combined`)."""
            await repo.insert_message(
                db,
                pg,
                session_id=spec.session_id,
                id=spec.message_id,
                role="assistant",
                content=text,
                parts=parts,
                status=message_status,
                generation_id=spec.generation_id,
                stream_offset=stream_offset,
                created_at=now,
            )
            if spec.user_message_id is not None and spec.user_offset is not None:
                await repo.set_message_offset(
                    db, spec.session_id, spec.user_message_id, spec.user_offset, pg
                )
            await repo.update_generation(
                db,
                spec.generation_id,
                pg,
                status=status,
                finish_reason=finish,
                error_code=code,
                error_message=message,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cache_read_tokens,
                cache_write_5m_tokens=usage.cache_write_5m_tokens,
                cache_write_1h_tokens=usage.cache_write_1h_tokens,
                cost_usd=cost,
                upstream_calls=len(self.usage_calls),
                ttft_ms=self.ttft_ms,
                duration_ms=int((time.monotonic() - self.started) * 1000),
                ratelimit=self.ratelimit,
                finished_at=now,
            )
            await repo.settle_session(
                db, spec.session_id, cost=cost, reserved=spec.reserved_usd, now=now, pg=pg
            )

        try:
            if code is None and self.m.autocommit is not None:
                # The usual end, on Postgres: all four writes as one statement, which commits
                # by itself (no ORM session, BEGIN or COMMIT: about half the CPU).
                async with pg_direct.autocommit(self.m.autocommit) as direct, direct.combined():
                    await write(None, direct)
            else:
                # SQLAlchemy's own exit, guarded against cancellation: its commit writes.
                async with self.m.sessionmaker.begin() as db:
                    if code is not None:  # it ended with RUN_ERROR: ops see it at /v1/errors
                        db.add(
                            generation_error(
                                at=now,
                                code=code,
                                message=message,
                                session_id=spec.session_id,
                                generation_id=spec.generation_id,
                                user_id=spec.user_id,
                                model=spec.model.id,
                            )
                        )
                    pg = await pg_direct.direct(db)
                    # All four as one statement on Postgres (there, this branch is an end with
                    # an error: the session's commit writes its event with them).
                    async with pg_direct.combined(pg):
                        await write(db, pg)
        except DATABASE_UNAVAILABLE as exc:
            # One transaction: it landed whole or not at all. Retried while the database comes
            # back (a restart, a failover), after checking that a COMMIT whose answer was lost
            # did not land already.
            if time.monotonic() + retry_delay > retry_until:
                log.error(
                    "generation_persist_failed",
                    generation_id=spec.generation_id,
                    error=type(exc).__name__,
                )
                return False
            log.warning("generation_persist_retry", generation_id=spec.generation_id)
            await asyncio.sleep(retry_delay)
            if await self._persisted():
                return True
            return await self._persist(
                status,
                finish,
                code,
                message,
                usage,
                stream_offset,
                retry_until=retry_until,
                retry_delay=min(retry_delay * 2, 2.0),
            )
        except Exception as exc:
            log.error(
                "generation_persist_failed",
                generation_id=spec.generation_id,
                error=type(exc).__name__,
            )
            return False
        left = None if spec.budget_remaining is None else spec.budget_remaining - cost
        # No memo when what is left would not cover this answer's reservation again: the next
        # send could be refused (402) after its early upstream request went out.
        if (
            spec.memo is not None
            and message_status == "complete"
            and (left is None or left > spec.reserved_usd)
        ):
            answer = StoredRow("assistant", text, parts, message_status, -1)
            memo = dataclasses.replace(spec.memo, rows=(*spec.memo.rows, answer))
            self.m.memos.put(spec.session_id, memo)
        return True

    async def _persisted(self) -> bool:
        """Whether this generation's row is already closed (an earlier attempt committed)."""
        try:
            async with self.m.sessionmaker() as db:
                row = await repo.get_generation(db, self.spec.generation_id)
        except DATABASE_UNAVAILABLE:
            return False
        return row is not None and row.status != "running"


def _thinking_param(model: ModelInfo, max_tokens: int) -> dict[str, Any] | None:
    mode = model.capabilities.thinking
    if mode == "adaptive":
        return {"type": "adaptive"}
    if mode == "enabled" and max_tokens > 1024:
        return {"type": "enabled", "budget_tokens": max(1024, min(4096, max_tokens // 2))}
    return None


def output_allowance(model: ModelInfo, cost: Decimal, input_tokens: int, remaining: Decimal) -> int:
    """The most output tokens a call with this input can reach within the budget, -1 if none:
    the largest n with cost + cost_usd(input, n) <= remaining. The input fixes the price band,
    so the cost is linear in n and n comes from one division; the pricing function itself then
    confirms the boundary (an off-by-one from rounding moves it a step)."""

    def over(output_tokens: int) -> bool:
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        return cost + cost_usd(model, usage) > remaining

    if over(0):
        return -1
    per_token = model.price_for(input_tokens).output / PER_MTOK
    if per_token <= 0:
        return 1 << 40  # effectively unbounded (a free model)
    with localcontext(EXACT_CONTEXT):
        spare = remaining - cost - cost_usd(model, Usage(input_tokens=input_tokens))
        allowance = int(spare // per_token)
    while allowance > 0 and over(allowance):
        allowance -= 1
    while not over(allowance + 1):
        allowance += 1
    return allowance


def _without_nones(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if v is not None}


def _total_input(usage: Any) -> int:
    u = Usage.from_anthropic(usage)
    return u.input_tokens + u.cache_read_tokens + u.cache_write_5m_tokens + u.cache_write_1h_tokens


def _sum_usage(calls: list[Usage]) -> Usage:
    return Usage(
        input_tokens=sum(u.input_tokens for u in calls),
        output_tokens=sum(u.output_tokens for u in calls),
        cache_read_tokens=sum(u.cache_read_tokens for u in calls),
        cache_write_5m_tokens=sum(u.cache_write_5m_tokens for u in calls),
        cache_write_1h_tokens=sum(u.cache_write_1h_tokens for u in calls),
    )


def _public_part(part: _Part) -> dict[str, Any]:
    data = dict(part.data)
    data.pop("step", None)
    return data

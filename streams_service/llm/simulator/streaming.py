"""The wire: named SSE events byte-compatible with the API, the paced streaming response
tied to its client connection, and the non-streaming body."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, Final

import anyio
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from streams_service.llm.simulator.cache import InputUsage
from streams_service.llm.simulator.config import DELTAS_BEFORE_FAULT
from streams_service.llm.simulator.pacing import Pacer
from streams_service.llm.simulator.plan import Block, Plan, random_id
from streams_service.llm.simulator.request import ParsedRequest
from streams_service.llm.simulator.state import State


class _AbortConnection(Exception):
    """Raised by a body producer to drop the connection instead of finishing the response."""


def _sse(event: str, data: dict[str, Any]) -> bytes:
    # Every event is named: the SDK drops events without an `event:` line.
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


# A JSON string literal exactly as `json.dumps(..., ensure_ascii=False)` writes one inside `_sse`
# (both end in the same string encoder), without building an encoder per call as dumps does.
_json_string: Final = json.JSONEncoder(ensure_ascii=False).encode
# Stands for the chunk while a delta frame is rendered: JSON spells it "\u0000", which no other
# part of a delta event can contain, so the frame splits around it unambiguously.
_CHUNK_MARK: Final = "\x00"


def _delta_frame(index: int, block: Block) -> Callable[[str], bytes]:
    """Renders the block's `content_block_delta` events, byte for byte as `_sse` would.

    Deltas are most of what a stream sends (tens of thousands a second in the benchmarks), and
    only their chunk varies, so the frame is rendered once, by `_sse` itself so the two can never
    drift apart, and each chunk is spliced in.
    """
    event = {"type": "content_block_delta", "index": index, "delta": block.delta(_CHUNK_MARK)}
    head, tail = _sse("content_block_delta", event).split(_json_string(_CHUNK_MARK).encode())

    def render(chunk: str) -> bytes:
        return b"".join((head, _json_string(chunk).encode(), tail))

    return render


# Where `SimulatorApp` leaves the server's own `send` for `PacedResponse`.
_SERVER_SEND: Final = "chatops.simulator.server_send"


class SimulatorApp(Starlette):
    """Starlette that also hands responses the ASGI server's own `send`, unwrapped.

    Starlette's error and exception middleware wrap `send` only to learn whether the response
    has started. A paced response sends its start through them, so error handling is unchanged,
    and its body chunks (one per delta, tens of thousands a second at benchmark load) straight
    to the server, skipping a stack of wrapper coroutines per chunk. Middleware added to this
    app would be skipped for those chunks as well: there is none, and none may rewrite bodies.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[_SERVER_SEND] = send
        await super().__call__(scope, receive, send)


class PacedResponse(Response):
    """A response whose body is produced over time, tied to the client connection.

    A client disconnect (or the server stopping) cancels the producer at once, so nothing keeps
    generating for nobody. A producer raising `_AbortConnection` ends the ASGI call without the
    final body message; uvicorn then closes the socket mid-body, which is what a dropped
    upstream connection looks like to the client.
    """

    def __init__(
        self,
        state: State,
        status: int,
        headers: dict[str, str],
        body: AsyncGenerator[bytes, None],
        *,
        headers_first: bool,
    ) -> None:
        super().__init__(status_code=status, headers=headers)
        if "content-length" not in headers:
            # Starlette would announce the empty placeholder body as `content-length: 0`.
            self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._state = state
        self._body = body
        self._headers_first = headers_first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._state.active_responses += 1
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
                tg.start_soon(self._watch_closing, tg.cancel_scope)
                # The producer resumes once per delta. In a task of its own, each resumption
                # passes through a short chain of awaits, not the whole ASGI stack above us.
                tg.start_soon(self._produce, send, scope.get(_SERVER_SEND, send), tg.cancel_scope)
        finally:
            self._state.active_responses -= 1
            await self._body.aclose()

    async def _produce(self, send: Send, send_body: Send, done: anyio.CancelScope) -> None:
        # See SimulatorApp: the start goes through `send` so middleware sees it; the body
        # chunks go straight to the server.
        start = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        started = self._headers_first
        if started:
            await send(start)
        try:
            async for chunk in self._body:
                if not started:
                    started = True
                    await send(start)
                await send_body({"type": "http.response.body", "body": chunk, "more_body": True})
        except _AbortConnection:
            # Headers must be out for the close to read as a broken body, not a 500; ending
            # without the final body message is what makes uvicorn drop the connection.
            if not started:
                await send(start)
        else:
            if not started:
                await send(start)
            await send_body({"type": "http.response.body", "body": b"", "more_body": False})
        done.cancel()

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _watch_closing(self, scope: anyio.CancelScope) -> None:
        await self._state.closing.wait()
        scope.cancel()


def message_object(
    msg_id: str, model: str, content: list[dict[str, Any]], stop: Plan | None
) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop.stop_reason if stop else None,
        "stop_sequence": stop.stop_sequence if stop else None,
        "stop_details": stop.stop_details if stop else None,
        "container": None,
    }


def usage_object(usage: InputUsage, output_tokens: int, thinking_tokens: int) -> dict[str, Any]:
    return {
        **usage.as_dict(),
        "output_tokens": output_tokens,
        "output_tokens_details": {"thinking_tokens": thinking_tokens} if thinking_tokens else None,
        "server_tool_use": None,
        "service_tier": "standard",
        "inference_geo": "not_available",
    }


async def event_stream(
    state: State,
    req: ParsedRequest,
    plan: Plan,
    usage: InputUsage,
    fault: str | None,
) -> AsyncGenerator[bytes, None]:
    config = state.config
    msg_id = random_id("msg_")
    await asyncio.sleep(config.slow_ttft_s if fault == "slow" else config.ttft_ms / 1000)
    start = message_object(msg_id, req.model, [], None)
    # The API reports output_tokens 1 at the start; message_delta carries the real total.
    start["usage"] = usage_object(usage, 1, 0)
    yield _sse("message_start", {"type": "message_start", "message": start})
    yield _sse("ping", {"type": "ping"})
    if fault == "stall":
        await asyncio.sleep(config.stall_s)
        raise _AbortConnection

    pacer = Pacer(config.tokens_per_s, state.ticker)
    deltas = 0
    failing = fault in ("midstream_error", "cut", "truncate")
    for index, block in enumerate(plan.blocks):
        yield _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block.start_block()},
        )
        delta = _delta_frame(index, block)
        if block.kind == "tool_use":
            # The API opens tool input with an empty fragment; clients must cope with it.
            yield delta("")
        if block.hidden:
            await pacer.skip(block.tokens)
        stamped = plan.clock and block.kind == "text"
        pieces = block.pieces
        position = 0
        while position < len(pieces):
            if (due := pacer.wait()) is not None:
                await due
            count = pacer.take(len(pieces) - position)
            chunk = pieces[position] if count == 1 else "".join(pieces[position : position + count])
            position += count
            if stamped:
                chunk = f"[t:{time.time() * 1000:.0f}]{chunk}"
            yield delta(chunk)
            deltas += 1
            if failing and deltas >= DELTAS_BEFORE_FAULT:
                break
        if failing and deltas >= DELTAS_BEFORE_FAULT:
            break
        if block.kind == "thinking":
            yield _sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "signature_delta", "signature": block.signature},
                },
            )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})

    if fault == "midstream_error":
        error = {"type": "overloaded_error", "message": "Overloaded"}
        yield _sse("error", {"type": "error", "error": error})
        return
    if fault == "cut":
        raise _AbortConnection
    if fault == "truncate":
        return

    final_usage = usage_object(usage, plan.output_tokens, plan.thinking_tokens)
    del final_usage["service_tier"], final_usage["inference_geo"], final_usage["cache_creation"]
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {
                "stop_reason": plan.stop_reason,
                "stop_sequence": plan.stop_sequence,
                "stop_details": plan.stop_details,
                "container": None,
            },
            "usage": final_usage,
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


async def single_body(
    state: State, body: bytes, generation_s: float, fault: str | None
) -> AsyncGenerator[bytes, None]:
    config = state.config
    if fault == "stall":
        await asyncio.sleep(config.stall_s)
        raise _AbortConnection
    ttft = config.slow_ttft_s if fault == "slow" else config.ttft_ms / 1000
    # A non-streaming reply arrives when the whole generation would have finished.
    await asyncio.sleep(ttft + generation_s)
    if fault in ("cut", "truncate"):
        # Half a JSON document is no use to anyone; both read as a broken connection.
        yield body[: len(body) // 2]
        raise _AbortConnection
    yield body

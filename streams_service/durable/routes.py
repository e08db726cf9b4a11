"""HTTP surface of the Durable Streams protocol at `/v1/stream/{path}` (PROTOCOL.md v1).

A plain Starlette endpoint rather than a FastAPI route: the protocol is all headers and raw bodies,
and this is the hot path (every append and every live read), so it skips model validation and
dependency resolution. Parsing lives here; decisions live in the store.
"""

from __future__ import annotations

import base64
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from streams_service import jsoncodec
from streams_service.durable.http import SECURITY_HEADER_MAP, Reply, error_reply
from streams_service.durable.live import Channel
from streams_service.durable.model import (
    AppendOutcome,
    AppendRequest,
    CreateRequest,
    Producer,
    ReadResult,
    is_json,
    is_text_like,
    now_ms,
)
from streams_service.durable.offsets import (
    InvalidOffset,
    format_offset,
    make_etag,
    parse_offset,
    response_cursor,
)
from streams_service.errors import (
    AppError,
    BadRequest,
    MethodNotAllowed,
    PayloadTooLarge,
)

if TYPE_CHECKING:
    from streams_service.durable.live import LiveHub
    from streams_service.durable.store import StreamStore

log = structlog.get_logger(__name__)

PREFIX = "/v1/stream/"
_TTL_RE = re.compile(r"^(0|[1-9]\d*)$")
_INT_RE = re.compile(r"^\d+$")
_OFFSET_RE = re.compile(r"^\d+_\d+$")
_CONTENT_TYPE_RE = re.compile(r"^[\w.+-]+/[\w.+-]+")
MAX_SAFE_INT = 2**53 - 1

# Header names (responses use these spellings; HTTP treats them case-insensitively).
NEXT_OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CLOSED = "Stream-Closed"
CURSOR = "Stream-Cursor"


class StreamRoutes:
    def __init__(
        self,
        store: StreamStore,
        hub: LiveHub,
        *,
        long_poll_timeout_s: float,
        sse_max_duration_s: float,
        max_append_bytes: int,
        max_read_bytes: int,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.hub = hub
        # True once the process drains for shutdown (streams_service/drain.py): live reads then
        # end at a chunk boundary instead of waiting, and clients resume on another replica.
        self.draining = draining
        self.long_poll_timeout_s = long_poll_timeout_s
        self.sse_max_duration_s = sse_max_duration_s
        self.max_append_bytes = max_append_bytes
        self.max_read_bytes = max_read_bytes

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry for `/v1/stream/...`, served without the framework's routing layers."""
        request = Request(scope, receive)
        # One pass over the raw headers (the server lower-cases names) instead of a scan per get.
        request.state.headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        try:
            response = await self.handle(request, scope["path"][len(PREFIX) :])
        except Exception:
            log.exception("stream_request_failed", method=scope.get("method"))
            response = error_reply(AppError("the server failed to handle the request"))
        await response(scope, receive, send)

    async def handle(self, request: Request, path: str) -> Response:
        try:
            method = request.method
            if method == "GET":
                return await self.read(request, path)
            if method == "POST":
                return await self.append(request, path)
            if method == "PUT":
                return await self.create(request, path)
            if method == "HEAD":
                return await self.head(path)
            if method == "DELETE":
                await self.store.delete(path)
                return Reply(status_code=204)
            if method == "OPTIONS":
                return Reply(status_code=204)
            raise MethodNotAllowed(f"{method} is not a Durable Streams operation")
        except AppError as exc:
            if request.method == "HEAD":
                return Reply(status_code=exc.status, headers=exc.headers)
            return error_reply(exc)

    # ------------------------------------------------------------------ PUT

    async def create(self, request: Request, path: str) -> Response:
        headers: dict[str, str] = request.state.headers
        forked_from = headers.get("stream-forked-from") or None
        content_type = headers.get("content-type")
        if not content_type or not content_type.strip() or not _CONTENT_TYPE_RE.match(content_type):
            # A fork without a Content-Type inherits its source's.
            content_type = None if forked_from else "application/octet-stream"
        ttl_raw = headers.get("stream-ttl")
        expires_raw = headers.get("stream-expires-at")
        if ttl_raw is not None and expires_raw is not None:
            raise BadRequest("send Stream-TTL or Stream-Expires-At, not both")
        ttl: int | None = None
        if ttl_raw is not None:
            if not _TTL_RE.fullmatch(ttl_raw):
                raise BadRequest("Stream-TTL must be a non-negative integer of seconds")
            ttl = int(ttl_raw)
        expires_ms: int | None = None
        if expires_raw is not None:
            expires_ms = _parse_timestamp_ms(expires_raw)
        fork_pos: int | None = None
        fork_offset_raw = headers.get("stream-fork-offset")
        if fork_offset_raw:
            if not _OFFSET_RE.fullmatch(fork_offset_raw):
                raise BadRequest("Stream-Fork-Offset is not an offset")
            fork_pos = parse_offset(fork_offset_raw)
        sub_offset: int | None = None
        sub_raw = headers.get("stream-fork-sub-offset")
        if sub_raw is not None:
            if not forked_from:
                raise BadRequest("Stream-Fork-Sub-Offset requires Stream-Forked-From")
            if not _TTL_RE.fullmatch(sub_raw):
                raise BadRequest("Stream-Fork-Sub-Offset must be a non-negative integer")
            sub_offset = int(sub_raw)
        body = await self._body(request)
        outcome = await self.store.create(
            path,
            CreateRequest(
                content_type=content_type,
                ttl_seconds=ttl,
                expires_at_raw=expires_raw,
                expires_at_ms=expires_ms,
                body=body,
                closed=_truthy(headers.get("stream-closed")),
                forked_from=_stream_path(forked_from) if forked_from else None,
                fork_pos=fork_pos,
                fork_sub_offset=sub_offset,
            ),
        )
        state = outcome.state
        out = {"Content-Type": state.content_type, NEXT_OFFSET: format_offset(state.tail)}
        if outcome.created:
            out["Location"] = str(request.url.replace(query=""))
        if state.closed:
            out[CLOSED] = "true"
        return Reply(status_code=201 if outcome.created else 200, headers=out)

    # ------------------------------------------------------------------ POST

    async def append(self, request: Request, path: str) -> Response:
        headers: dict[str, str] = request.state.headers
        producer = _parse_producer(
            headers.get("producer-id"), headers.get("producer-epoch"), headers.get("producer-seq")
        )
        close = _truthy(headers.get("stream-closed"))
        body = await self._body(request)
        if not body:
            if not close:
                raise BadRequest("an append needs a body (or Stream-Closed: true to close)")
            req = AppendRequest(body=None, producer=producer, close=True)
        else:
            content_type = headers.get("content-type")
            if not content_type:
                raise BadRequest("Content-Type is required on an append with a body")
            req = AppendRequest(
                body=body,
                content_type=content_type,
                stream_seq=headers.get("stream-seq"),
                producer=producer,
                close=close,
            )
        outcome = await self.store.append(path, req)
        return _append_response(outcome)

    # ------------------------------------------------------------------ HEAD

    async def head(self, path: str) -> Response:
        state = await self.store.head(path)
        offset = format_offset(state.tail)
        out = {
            "Content-Type": state.content_type,
            NEXT_OFFSET: offset,
            "Cache-Control": "no-store",
            "ETag": make_etag(path, "-1", offset, state.closed),
        }
        if state.closed:
            out[CLOSED] = "true"
        if state.ttl_seconds is not None:
            out["Stream-TTL"] = str(state.ttl_seconds)
        if state.expires_at_raw is not None:
            out["Stream-Expires-At"] = state.expires_at_raw
        return Reply(status_code=200, headers=out)

    # ------------------------------------------------------------------ GET

    async def read(self, request: Request, path: str) -> Response:
        params = request.query_params
        offsets = params.getlist("offset")
        live = params.get("live")
        cursor = params.get("cursor")
        if len(offsets) > 1:
            raise BadRequest("give one offset parameter")
        raw = offsets[0] if offsets else None
        if raw is not None and raw not in ("-1", "now") and not _OFFSET_RE.fullmatch(raw):
            raise BadRequest("offset must be -1, now, or an offset this server returned")
        if live not in (None, "long-poll", "sse"):
            raise BadRequest("live must be long-poll or sse")
        if live is not None and raw is None:
            raise BadRequest(f"live={live} requires an offset")
        if live == "sse":
            return await self._sse(path, raw or "-1", cursor)
        if live == "long-poll":
            return await self._long_poll(path, raw or "-1", cursor, request)
        return await self._catch_up(path, raw, request)

    async def _catch_up(self, path: str, raw: str | None, request: Request) -> Response:
        if raw == "now":
            state = await self.store.head(path)
            self.store.touch(state)
            out = {
                "Content-Type": state.content_type,
                NEXT_OFFSET: format_offset(state.tail),
                UP_TO_DATE: "true",
                "Cache-Control": "no-store",
            }
            if state.closed:
                out[CLOSED] = "true"
            return Reply(b"[]" if is_json(state.content_type) else b"", headers=out)
        from_pos = _position(raw)
        result = await self.store.read(path, from_pos, self.max_read_bytes)
        self.store.touch(result.state)
        return self._data_response(path, raw or "-1", result, request, cursor=None)

    async def _long_poll(
        self, path: str, raw: str, cursor: str | None, request: Request
    ) -> Response:
        deadline = time.monotonic() + self.long_poll_timeout_s
        stream_id = None
        if raw == "now":
            head = await self.store.head(path)
            from_pos, stream_id = head.tail, head.id
        else:
            from_pos = _position(raw)
        async with self._follow(path, from_pos, stream_id) as follow:
            async for result in follow:
                state = result.state
                if result.chunks or from_pos != state.tail:
                    return self._data_response(path, raw, result, request, cursor=cursor)
                if state.closed:
                    return Reply(
                        status_code=204,
                        headers={
                            NEXT_OFFSET: format_offset(state.tail),
                            UP_TO_DATE: "true",
                            CLOSED: "true",
                        },
                    )
                if self.draining() or not await follow.wait(deadline - time.monotonic()):
                    out = {
                        NEXT_OFFSET: format_offset(from_pos),
                        UP_TO_DATE: "true",
                        CURSOR: response_cursor(cursor),
                    }
                    return Reply(status_code=204, headers=out)
        raise AssertionError("unreachable: a follower yields until told to stop")

    def _follow(self, path: str, position: int, stream_id: int | None = None) -> _Follower:
        return _Follower(self, path, position, stream_id)

    def _data_response(
        self, path: str, start: str, result: ReadResult, request: Request, *, cursor: str | None
    ) -> Response:
        state = result.state
        next_offset = format_offset(result.next_pos)
        at_closed_tail = result.at_closed_tail
        etag = make_etag(path, start, next_offset, at_closed_tail)
        if request.state.headers.get("if-none-match") == etag:
            return Reply(status_code=304, headers={"ETag": etag})
        out = {"Content-Type": state.content_type, NEXT_OFFSET: next_offset, "ETag": etag}
        if result.up_to_date:
            out[UP_TO_DATE] = "true"
        if at_closed_tail:
            out[CLOSED] = "true"
        if cursor is not None or request.query_params.get("live") == "long-poll":
            out[CURSOR] = response_cursor(cursor)
        # Data below an offset never changes, but a response that reaches the tail of an open
        # stream is only the tail as of now.
        out["Cache-Control"] = (
            "private, max-age=60, stale-while-revalidate=300"
            if not result.up_to_date or at_closed_tail
            else "no-cache"
        )
        return Reply(_body_of(state.content_type, result.chunks), headers=out)

    async def _sse(self, path: str, raw: str, cursor: str | None) -> Response:
        # Validate before committing to a 200 event stream.
        state = await self.store.head(path)
        start = state.tail if raw == "now" else _position(raw)
        encode_base64 = not is_text_like(state.content_type)
        out = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **SECURITY_HEADER_MAP,
        }
        if encode_base64:
            out["Stream-SSE-Data-Encoding"] = "base64"
        return StreamingResponse(
            self._sse_events(path, start, cursor, encode_base64, state.id),
            headers=out,
            status_code=200,
        )

    async def _sse_events(
        self, path: str, start: int, cursor: str | None, encode_base64: bool, stream_id: int
    ) -> AsyncIterator[bytes]:
        deadline = time.monotonic() + self.sse_max_duration_s
        announce = True  # the first pass always tells the client where it stands
        try:
            async with self._follow(path, start, stream_id) as follow:
                async for result in follow:
                    state = result.state
                    if result.chunks:
                        # One write per read: each data event with its control event, so a
                        # client never sees data without the offset that resumes after it.
                        last = len(result.chunks) - 1
                        events: list[bytes] = []
                        for i, (end_pos, data) in enumerate(result.chunks):
                            payload = _sse_payload(state.content_type, data, encode_base64)
                            events.append(_sse_event("data", payload))
                            at_tail = i == last and result.up_to_date
                            events.append(
                                _control(end_pos, cursor, at_tail, at_tail and state.closed)
                            )
                        yield b"".join(events)
                        follow.position = result.next_pos
                        if result.at_closed_tail:
                            return
                        if not result.up_to_date:
                            continue
                    elif announce:
                        follow.position = min(follow.position, state.tail)
                        yield _control(follow.position, cursor, True, state.closed)
                        if state.closed:
                            return
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.draining():
                        return  # clients reconnect from the last streamNextOffset
                    # An idle wait ends with a keep-alive control event.
                    announce = not await follow.wait(min(remaining, self.long_poll_timeout_s))
        except AppError:
            return  # deleted or expired under us: end the event stream

    async def _body(self, request: Request) -> bytes:
        declared = request.state.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_append_bytes:
            raise PayloadTooLarge(f"body is larger than {self.max_append_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise BadRequest("the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_append_bytes:
                raise PayloadTooLarge(f"body is larger than {self.max_append_bytes} bytes")
            if chunk:
                chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Follower:
    """Reads a stream from a position, then again each time it changes.

    Subscribes to the stream's wake-ups *before* each database read, so a commit landing
    between a read and the wait is never missed; a wake-up from this process's own writer that
    appended exactly where the reader stands is answered from memory.
    """

    def __init__(
        self, routes: StreamRoutes, path: str, position: int, stream_id: int | None = None
    ) -> None:
        self.routes = routes
        self.path = path
        self.position = position
        self._stack = contextlib.ExitStack()
        self._channel: Channel | None = None
        # The stream whose wake-ups `_channel` carries. Known up front when the caller has just
        # read the stream's head: the first read then comes after the subscription and is the
        # only one (an SSE open: two queries with the head, not three).
        self._stream_id = stream_id
        self._seen = 0
        self._woken = False

    async def __aenter__(self) -> _Follower:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._stack.close()

    def __aiter__(self) -> _Follower:
        return self

    async def __anext__(self) -> ReadResult:
        routes = self.routes
        if self._channel is None and self._stream_id is not None:
            self._subscribe(self._stream_id)
        if self._channel is not None and self._woken:
            cached = self._channel.cached_read(self._seen, self.position, routes.max_read_bytes)
            self._seen = self._channel.version
            if cached is not None:
                routes.store.touch(cached.state)
                return cached
        elif self._channel is not None:
            self._seen = self._channel.version
        result = await routes.store.read(self.path, self.position, routes.max_read_bytes)
        routes.store.touch(result.state)
        if result.state.id != self._stream_id:
            # The first read of a stream not known before (or one created again under this
            # path): subscribe, then read once more so nothing commits unseen in between.
            self._subscribe(result.state.id)
            result = await routes.store.read(self.path, self.position, routes.max_read_bytes)
        return result

    def _subscribe(self, stream_id: int) -> None:
        self._stack.close()  # the previous stream's channel, if any
        self._channel = self._stack.enter_context(self.routes.hub.subscribe(stream_id))
        self._stream_id = stream_id
        self._seen = self._channel.version

    async def wait(self, max_wait_s: float) -> bool:
        """Wait for a change; False when `max_wait_s` passed without one."""
        assert self._channel is not None
        if max_wait_s > 0:
            await self._channel.wait(self._seen, max_wait_s)
        self._woken = self._channel.version != self._seen
        return self._woken


def _append_response(outcome: AppendOutcome) -> Response:
    out: dict[str, str] = {}
    if outcome.next_offset_pos is not None:
        out[NEXT_OFFSET] = format_offset(outcome.next_offset_pos)
    if outcome.closed:
        out[CLOSED] = "true"
    if outcome.producer_epoch is not None:
        out["Producer-Epoch"] = str(outcome.producer_epoch)
    if outcome.producer_seq is not None:
        out["Producer-Seq"] = str(outcome.producer_seq)
    return Reply(status_code=outcome.status, headers=out)


def _body_of(content_type: str, chunks: list[tuple[int, bytes]]) -> bytes:
    if is_json(content_type):
        return b"[" + b",".join(data for _, data in chunks) + b"]"
    return b"".join(data for _, data in chunks)


def _sse_payload(content_type: str, data: bytes, encode_base64: bool) -> str:
    if encode_base64:
        return base64.b64encode(data).decode()
    if is_json(content_type):
        return "[" + data.decode() + "]"
    return data.decode("utf-8", errors="replace")


_LINE_BREAKS = re.compile(r"\r\n|\r|\n")


def _sse_event(kind: str, payload: str) -> bytes:
    # One data: line per payload line, split on every SSE line terminator so a payload cannot
    # inject events; no space after "data:" since clients strip exactly one. Most payloads are
    # one line (JSON we encoded, control events): two substring checks instead of the regex.
    if "\n" not in payload and "\r" not in payload:
        return f"event: {kind}\ndata:{payload}\n\n".encode()
    lines = _LINE_BREAKS.split(payload)
    return (f"event: {kind}\n" + "\n".join(f"data:{line}" for line in lines) + "\n\n").encode()


def _control(position: int, cursor: str | None, up_to_date: bool, closed: bool) -> bytes:
    body: dict[str, object] = {"streamNextOffset": format_offset(position)}
    if closed:
        body["streamClosed"] = True
    else:
        body["streamCursor"] = response_cursor(cursor)
        if up_to_date:
            body["upToDate"] = True
    return _sse_event("control", jsoncodec.dumps_str(body))


def _position(raw: str | None) -> int:
    if raw is None or raw == "-1":
        return 0
    try:
        return parse_offset(raw)
    except InvalidOffset:
        raise BadRequest("offset is malformed") from None


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"


def _stream_path(value: str) -> str:
    """Stream-Forked-From may name the source by its URL path (`/v1/stream/x`) or by `x`."""
    value = value.strip()
    for prefix in ("/v1/stream/",):
        if value.startswith(prefix):
            return value[len(prefix) :]
    return value.lstrip("/")


def _parse_producer(pid: str | None, epoch: str | None, seq: str | None) -> Producer | None:
    given = [v is not None for v in (pid, epoch, seq)]
    if not any(given):
        return None
    if not all(given):
        raise BadRequest("send Producer-Id, Producer-Epoch and Producer-Seq together")
    assert pid is not None and epoch is not None and seq is not None
    if pid == "":
        raise BadRequest("Producer-Id must not be empty")
    for name, value in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        if not _INT_RE.fullmatch(value) or int(value) > MAX_SAFE_INT:
            raise BadRequest(f"{name} must be an integer between 0 and 2^53-1")
    return Producer(pid, int(epoch), int(seq))


def _parse_timestamp_ms(raw: str) -> int:
    try:
        parsed = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise BadRequest("Stream-Expires-At must be an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


__all__ = ["StreamRoutes", "now_ms"]

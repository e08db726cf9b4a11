"""One streaming Messages API call: the official SDK sends it, we read its event stream.

The SDK builds and sends the request (auth, headers, retries while the response is opening, and
`APIStatusError`s for non-2xx answers). Once the `200` event stream is open we decode it here
rather than through `messages.stream()`: the SDK's helper turns every event into pydantic models
twice (the raw event, then a snapshot update and a synthetic `text`/`thinking` event) — about
85 µs of CPU per event, against ~5 µs to split the SSE frames and `json.loads` them. A generation
at 50 tokens/s is 50 events a second, and 500 of them at once would need two cores for event
parsing alone; the service has one event loop.

The accumulation follows the SDK's `accumulate_event` (reference/anthropic-api.md §1.3 to §1.5):
`message_start` seeds the message; blocks and deltas build `content`; `message_delta` sets the
stop reason and overwrites the cumulative usage counts it carries; `ping` and unknown events are
ignored; `event: error` raises `anthropic.APIStatusError`, as the SDK does (status 200). A stream
that ends without `message_stop` is left for the caller to judge (`saw_stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, cast

import aiohttp
import anthropic
import httpx2

from streams_service import jsoncodec

Event = dict[str, Any]


class UpstreamStalled(Exception):
    """Nothing arrived from upstream within the read timeout (the watchdog fired)."""


class SSEFrames:
    """Splits an SSE byte stream into (event name, data) pairs; frames end at a blank line."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[str | None, bytes]]:
        buffer = self._buffer + data
        held = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):
                # Maybe the first half of a CRLF split across reads: decide on the next read.
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *complete, rest = buffer.split(b"\n\n")
        self._buffer = rest + held
        return [_frame(raw) for raw in complete]


def _frame(raw: bytes) -> tuple[str | None, bytes]:
    # The shape every Messages API event has, `event: <name>\ndata: <json>`, without the
    # general loop: one frame per token, so this is on the hot path.
    if raw.startswith(b"event: "):
        newline = raw.find(b"\n")
        if (
            newline > 0
            and raw.startswith(b"data: ", newline + 1)
            and raw.find(b"\n", newline + 1) < 0
        ):
            return raw[7:newline].strip().decode("utf-8", "replace"), raw[newline + 7 :]
    return _frame_lines(raw)


def _frame_lines(raw: bytes) -> tuple[str | None, bytes]:
    """Any frame, line by line: its last event name and its data lines joined."""
    name: str | None = None
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, b"\n".join(data)


class MessageAccumulator:
    """The message a stream describes, built from its events (dicts in the API's own shape)."""

    def __init__(self) -> None:
        self.message: Event | None = None
        self.usage: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.saw_stop = False
        self._json: dict[int, str] = {}  # tool input JSON so far, by block index

    @property
    def content(self) -> list[Event]:
        return list(self.message.get("content", [])) if self.message else []

    def add(self, event: Event) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self.message = dict(event.get("message") or {})
            self.message["content"] = []
            self.usage = dict(self.message.get("usage") or {})
            return
        if self.message is None:
            return  # out of order; the SDK passes such events through unaccumulated
        content: list[Event] = self.message["content"]
        if kind == "content_block_start":
            block = dict(event.get("content_block") or {})
            if block.get("type") in ("tool_use", "server_tool_use"):
                self._json[len(content)] = ""
            content.append(block)
        elif kind == "content_block_delta":
            index = event.get("index", len(content) - 1)
            if not isinstance(index, int) or not 0 <= index < len(content):
                return
            block, delta = content[index], event.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif dtype == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
            elif dtype == "signature_delta":
                block["signature"] = delta.get("signature", "")
            elif dtype == "input_json_delta":
                self._json[index] = self._json.get(index, "") + delta.get("partial_json", "")
            elif dtype == "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))
        elif kind == "content_block_stop":
            index = event.get("index", len(content) - 1)
            if isinstance(index, int) and index in self._json and 0 <= index < len(content):
                raw = self._json.pop(index)
                try:
                    content[index]["input"] = json.loads(raw) if raw.strip() else {}
                except ValueError:
                    raise ValueError(
                        f"Unable to parse tool parameter JSON from model: {raw[:200]!r}"
                    ) from None
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            if "stop_reason" in delta:
                self.stop_reason = delta.get("stop_reason")
            # Cumulative counts: overwrite what they carry, keep message_start's for the rest.
            for key, value in (event.get("usage") or {}).items():
                if value is not None:
                    self.usage[key] = value
        elif kind == "message_stop":
            self.saw_stop = True

    def block(self, index: Any) -> Event | None:
        content = self.message["content"] if self.message else []
        return content[index] if isinstance(index, int) and 0 <= index < len(content) else None


class _Socket(Protocol):
    """What pausing a read needs of a transport (uvloop's are not registered as asyncio's)."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool: ...


def _aiohttp_response_of(response: Any) -> aiohttp.ClientResponse | None:
    """The aiohttp response inside the SDK's aiohttp client, or None when the response travels
    some other way. This reaches through two private attributes of the SDK's vendored
    transport; tests/llm/test_stream.py checks against the installed SDK that it still finds
    it."""
    try:
        found = response.http_response.stream._stream._aiohttp_response
    except AttributeError:
        return None
    return found if isinstance(found, aiohttp.ClientResponse) else None


class _Body:
    """How the events loop reads the body of the response: `read()` waits for the next bytes
    (b"" once the body has ended); `take()` returns at once whatever is already buffered (b""
    when nothing is), or is None where that cannot be done.

    Over the SDK's aiohttp client, for a body that is not content-encoded (aiohttp is told not
    to decompress; httpx2 would), the bytes come straight from aiohttp: under the SDK's
    `iter_bytes` each read climbs five async iterators (the SDK's, httpx2's raw and decoded
    ones, the vendored transport's, aiohttp's chunked one). Otherwise, through the SDK's
    iterator. Either way the SDK still sends the request, answers its status and closes the
    response; only the bytes of a 200 are read here."""

    __slots__ = ("read", "take")

    def __init__(self, response: Any) -> None:
        aiohttp_response = _aiohttp_response_of(response)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        self.take: Callable[[], bytes] | None = None
        if aiohttp_response is not None and encoding == "identity":
            content = aiohttp_response.content
            self.read: Callable[[], Awaitable[bytes]] = content.readany
            if all(hasattr(content, name) for name in _BUFFER_STATE):
                self.take = functools.partial(_take_buffered, content)
            return
        chunks = response.iter_bytes().__aiter__()

        async def next_chunk() -> bytes:
            try:
                chunk: bytes = await chunks.__anext__()
            except StopAsyncIteration:
                return b""
            return chunk

        self.read = next_chunk


# What _take_buffered reads and keeps of aiohttp's StreamReader (its own _read_nowait_chunk
# keeps the same); checked present before it is relied on.
_BUFFER_STATE = (
    "_buffer",
    "_buffer_offset",
    "_size",
    "_cursor",
    "_http_chunk_splits",
    "_low_water",
    "_low_water_chunks",
    "_protocol",
    "_exception",
)


def _take_buffered(content: Any) -> bytes:
    """Everything aiohttp has buffered of the body, in one step, keeping its reader's books as
    its own `readany` does (b"" when nothing is buffered or the reader holds an error, which
    `readany` then raises).

    Why: after a pause the buffer holds one HTTP chunk per upstream event (the API sends each
    event as a chunk), and aiohttp's `readany` takes them one by one, asking the connection to
    resume reading after each (re-running its parser on no data each time): ~10 µs of a ~27 µs
    read of nine events. Here: one join, one resume. tests/llm/test_stream.py checks the books
    against the installed aiohttp."""
    buffer = content._buffer
    if not buffer or content._exception is not None:
        return b""
    offset = content._buffer_offset
    if offset:
        buffer[0] = buffer[0][offset:]
        content._buffer_offset = 0
    data: bytes = buffer[0] if len(buffer) == 1 else b"".join(buffer)
    buffer.clear()
    content._size -= len(data)
    content._cursor += len(data)
    splits = content._http_chunk_splits
    while splits and splits[0] < content._cursor:
        splits.popleft()
    if content._size < content._low_water and (
        splits is None or len(splits) < content._low_water_chunks
    ):
        content._protocol.resume_reading()
    return data


def _socket_of(response: Any) -> Callable[[], _Socket | None]:
    """The socket under the SDK's streaming response, looked up when asked (aiohttp hands the
    connection back when the body ends): the transport of the aiohttp response inside the SDK's
    aiohttp client, or always None when the response travels some other way."""
    aiohttp_response = _aiohttp_response_of(response)
    if aiohttp_response is None:
        return lambda: None

    def transport() -> _Socket | None:
        connection = aiohttp_response.connection
        found = connection.transport if connection is not None else None
        if found is None or not hasattr(found, "pause_reading") or found.is_closing():
            return None
        return cast(_Socket, found)

    return transport


class _PausedSocket:
    """Stops reading a socket, and starts again once, however often `resume` is called."""

    __slots__ = ("_paused", "_socket")

    def __init__(self, socket: _Socket | None) -> None:
        self._socket = socket
        self._paused = False

    def pause(self) -> None:
        if self._socket is not None:
            self._socket.pause_reading()
            self._paused = True

    def resume(self) -> None:
        if self._paused and self._socket is not None:
            self._paused = False
            if not self._socket.is_closing():
                self._socket.resume_reading()


class MessageStream:
    """Iterates the decoded events of an open streaming response."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self.headers: Any = response.headers
        self.accumulated = MessageAccumulator()

    async def events(
        self,
        pause: Callable[[Callable[[], None]], Awaitable[object] | None] | None = None,
        read_timeout: float | None = None,
    ) -> AsyncIterator[Event]:
        """The stream's events, in order. With `pause`, a read that had to wait for data is
        followed by `pause()`: when that gives an awaitable, reading goes on once it is done,
        and every read after it is followed by `pause()` again, for as long as it gives one.
        Meanwhile the socket is not read at all: what upstream sends waits in the kernel and
        is then taken in one read, instead of each event costing the event loop a wake-up, a
        system call and the HTTP client's whole receive and read path. `pause` is given the
        function that starts reading the socket again, for the awaitable's owner to call a
        moment before it is done: what waited is then read by the time the pause ends, and
        the next read returns it at once."""
        loop = asyncio.get_running_loop()
        frames = SSEFrames()
        body = _Body(self._response)
        watchdog = _ReadWatchdog(read_timeout)
        pausing = False
        socket = _socket_of(self._response)
        try:
            while True:
                started = loop.time()
                # What a pause left buffered is taken without waiting; otherwise a read waits.
                chunk = body.take() if body.take is not None else b""
                if not chunk:
                    # Only a read can wait on upstream, so only reads are timed.
                    watchdog.reading(started)
                    try:
                        chunk = await body.read()
                    except aiohttp.ClientError as exc:
                        # What the SDK's vendored transport turns it into, read through its
                        # iterator (a cut body: ClientPayloadError): an httpx2 transport error.
                        raise httpx2.ReadError(str(exc)) from exc
                    except asyncio.CancelledError:
                        if watchdog.stalled():
                            raise UpstreamStalled() from None
                        raise
                    finally:
                        watchdog.reading(None)
                    if not chunk:
                        return
                waited = loop.time() - started > _WAITED_S
                events, error = self._decode(frames.feed(chunk))
                for event in events:
                    self.accumulated.add(event)
                    yield event
                if error is not None:
                    raise error
                if pause is not None and (waited or pausing):
                    paused = _PausedSocket(socket())
                    until = pause(paused.resume)
                    pausing = until is not None
                    if until is not None:
                        paused.pause()
                        try:
                            await until
                        finally:
                            paused.resume()
        finally:
            watchdog.close()

    def _decode(
        self, frames: list[tuple[str | None, bytes]]
    ) -> tuple[list[Event], anthropic.APIStatusError | None]:
        """One read's events, consecutive deltas to the same block merged (`merge_deltas`), and
        the error event that ended them, if one did (what came before it is still delivered)."""
        events: list[Event] = []
        for name, data in frames:
            if name is None or name == "ping" or not data:
                continue  # the SDK's decoder skips these too
            if name == "error":
                return merge_deltas(events), _stream_error(self._response, data)
            event = jsoncodec.loads(data)
            if isinstance(event, dict):
                events.append(event)
        return merge_deltas(events), None


# Delta types whose pieces concatenate, and the field carrying them.
_CONCATENATED = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "input_json_delta": "partial_json",
}


def merge_deltas(events: list[Event]) -> list[Event]:
    """Consecutive `content_block_delta`s of one block and one kind, as one event carrying their
    pieces joined: exactly what accumulating them one by one builds, and what the session
    stream would have merged anyway before writing. Upstream sends a delta every few tokens; a
    read after a pause holds several, and each one would cost the generation's whole event
    path. Other events pass unchanged, in order.

    One pass that remembers the (index, delta type) of the delta others may still join, rather
    than comparing each event with the last one field by field: at 500 generations this runs
    for every upstream event, and the comparison was a third of the decoding."""
    if len(events) < 2:
        return events
    merged: list[Event] = []
    run: tuple[Any, str] | None = None  # (index, delta type) of merged[-1] while it may grow
    field = ""  # the delta field of that run
    pieces: list[str] = []  # its pieces so far
    for event in events:
        if event.get("type") == "content_block_delta":
            delta = event.get("delta")
            kind = delta.get("type") if isinstance(delta, dict) else None
            name = _CONCATENATED.get(kind) if isinstance(kind, str) else None
            piece = delta.get(name) if name is not None else None  # type: ignore[union-attr]
            if isinstance(piece, str):
                key = (event.get("index"), kind)
                if key == run:
                    pieces.append(piece)
                    continue
                _join(merged, field, pieces)
                merged.append(event)
                run, field, pieces = key, name, [piece]  # type: ignore[assignment]
                continue
        _join(merged, field, pieces)
        run, pieces = None, []
        merged.append(event)
    _join(merged, field, pieces)
    return merged


def _join(merged: list[Event], field: str, pieces: list[str]) -> None:
    """The run of deltas ending `merged` as one: its pieces joined into its first event."""
    if len(pieces) > 1:
        merged[-1]["delta"][field] = "".join(pieces)


class _ReadWatchdog:
    """Ends a read that waits longer than `timeout` by cancelling the reading task, with one
    timer per stream re-armed about once per `timeout`, instead of a timeout context (a timer
    made and cancelled) around every read, which at hundreds of streams was ~3% of the loop.
    Like `asyncio.timeout`, it converts only its own cancellation: `stalled()` is true only if
    the timer fired and nobody else cancelled the task meanwhile (a stop stays a stop)."""

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._read_since: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    def reading(self, since: float | None) -> None:
        """A read starts (its start time) or ends (None)."""
        self._read_since = since
        if since is not None and self._handle is None and self._timeout is not None:
            self._handle = self._loop.call_at(since + self._timeout, self._check)

    def _check(self) -> None:
        self._handle = None
        if self._read_since is None or self._timeout is None or self._task is None:
            return  # between reads: the next read arms it again
        due = self._read_since + self._timeout
        if self._loop.time() >= due:
            self._fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)

    def stalled(self) -> bool:
        if not self._fired or self._task is None:
            return False
        self._fired = False
        return self._task.uncancel() == 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


# A read that took longer than this waited for the network (data already buffered is returned
# within microseconds, or a loop turn when the loop is busy).
_WAITED_S = 0.002


def _stream_error(response: Any, data: bytes) -> anthropic.APIStatusError:
    body: object
    try:
        body = json.loads(data)
        message = f"{body}"
    except ValueError:
        body = data.decode("utf-8", "replace")
        message = str(body) or f"Error code: {response.status_code}"
    return anthropic.APIStatusError(message, response=response.http_response, body=body)


@asynccontextmanager
async def stream_message(
    client: anthropic.AsyncAnthropic, params: dict[str, Any], *, stall_s: float | None = None
) -> AsyncIterator[MessageStream]:
    """POST /v1/messages with `stream: true` through the SDK; yields the open event stream.

    With `stall_s` the caller times every read (`MessageStream.events(read_timeout=...)`), so
    the HTTP client's own read timeout is switched off for this call: aiohttp re-arms it on
    every chunk that arrives, a timer cancelled and created per token (~3.5% of the process at
    300 generations). Opening the stream, up to the response headers, is bounded by `stall_s`
    here instead (UpstreamStalled, as a read that waits too long)."""
    options: dict[str, Any] = {}
    if stall_s is not None:
        options["timeout"] = _without_read_timeout(client.timeout)
    async with contextlib.AsyncExitStack() as stack:
        opening = client.messages.with_streaming_response.create(stream=True, **params, **options)
        try:
            async with asyncio.timeout(stall_s):
                response = await stack.enter_async_context(opening)
        except TimeoutError:
            raise UpstreamStalled() from None
        yield MessageStream(response)


def _without_read_timeout(timeout: float | httpx2.Timeout | None) -> httpx2.Timeout:
    if isinstance(timeout, httpx2.Timeout):
        return httpx2.Timeout(
            connect=timeout.connect, read=None, write=timeout.write, pool=timeout.pool
        )
    return httpx2.Timeout(timeout, read=None)

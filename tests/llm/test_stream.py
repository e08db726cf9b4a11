"""The service's own reading of a Messages API event stream (streams_service/llm/stream.py).

The SSE framing and the accumulation are checked here event by event; the whole path (the
official SDK sending the request, our decoder reading the simulator's real stream, faults
included) is covered by tests/sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anthropic
import httpx2
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from streams_service.llm.simulator import SimulatorConfig, run_simulator
from streams_service.llm.stream import (
    MessageAccumulator,
    MessageStream,
    SSEFrames,
    UpstreamStalled,
    _aiohttp_response_of,
    _Body,
    _frame,
    _frame_lines,
    _socket_of,
    _take_buffered,
    merge_deltas,
    stream_message,
)


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-5-5",
        "content": [],
        "stop_reason": None,
        "usage": {
            "input_tokens": 377,
            "cache_creation_input_tokens": 10,
            "cache_read_input_tokens": 5,
            "output_tokens": 1,
        },
    },
}

TOOL_STREAM = [
    ("message_start", START),
    ("ping", {"type": "ping"}),
    (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "Let me "},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "add."},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "sig=="},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "text_delta", "text": "Sure"},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "text_delta", "text": ", adding."},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "calculator",
                "caller": {"type": "direct"},
                "input": {},
            },
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": '{"expression": "2'},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": '+2"}'},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 2}),
    ("future_event", {"type": "future_event", "anything": True}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 65},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
]


def _accumulate(events: list[tuple[str, dict[str, Any]]]) -> MessageAccumulator:
    acc = MessageAccumulator()
    for _name, data in events:
        acc.add(data)
    return acc


def test_a_tool_turn_accumulates_to_the_message_the_api_describes() -> None:
    acc = _accumulate(TOOL_STREAM)
    assert acc.saw_stop and acc.stop_reason == "tool_use"
    assert acc.content == [
        {"type": "thinking", "thinking": "Let me add.", "signature": "sig=="},
        {"type": "text", "text": "Sure, adding."},
        {
            "type": "tool_use",
            "id": "toolu_1",
            "name": "calculator",
            "caller": {"type": "direct"},
            "input": {"expression": "2+2"},
        },
    ]
    # message_delta's cumulative output count overwrites; fields it lacks keep message_start's.
    assert acc.usage["output_tokens"] == 65
    assert acc.usage["input_tokens"] == 377
    assert acc.usage["cache_creation_input_tokens"] == 10
    assert acc.usage["cache_read_input_tokens"] == 5


def test_message_delta_overwrites_input_counts_it_carries() -> None:
    acc = _accumulate(
        [
            ("message_start", START),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {
                        "output_tokens": 9,
                        "input_tokens": 400,
                        "cache_read_input_tokens": None,
                    },
                },
            ),
        ]
    )
    assert acc.usage["input_tokens"] == 400
    assert acc.usage["output_tokens"] == 9
    assert acc.usage["cache_read_input_tokens"] == 5  # None means "not reported": kept
    assert acc.stop_reason == "end_turn"
    assert not acc.saw_stop  # no message_stop: the caller treats the stream as cut


def test_tool_input_that_is_not_json_is_an_error_like_the_sdks() -> None:
    acc = MessageAccumulator()
    acc.add(START)
    acc.add(
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "tool_use", "id": "t", "name": "n", "input": {}},
        }
    )
    acc.add(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": '{"a": '},
        }
    )
    with pytest.raises(ValueError, match="tool parameter JSON"):
        acc.add({"type": "content_block_stop", "index": 0})


def test_events_before_message_start_and_bad_indexes_are_ignored() -> None:
    acc = MessageAccumulator()
    acc.add(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}
    )
    acc.add(START)
    acc.add(
        {"type": "content_block_delta", "index": 7, "delta": {"type": "text_delta", "text": "x"}}
    )
    assert acc.content == []


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 100_000])
def test_sse_frames_survive_any_split_and_crlf(size: int) -> None:
    wire = b"".join(_sse(name, data) for name, data in TOOL_STREAM).replace(b"\n", b"\r\n")
    wire = b": comment\r\n\r\n" + wire
    frames = SSEFrames()
    out: list[tuple[str | None, bytes]] = []
    for i in range(0, len(wire), size):
        out.extend(frames.feed(wire[i : i + size]))
    named = [(n, json.loads(d)) for n, d in out if n is not None]
    assert named == [(name, data) for name, data in TOOL_STREAM]
    assert out[0] == (None, b"")  # the comment frame: no event name, skipped by the reader


_LINE = st.sampled_from(
    [b"event: content_block_delta", b"event:ping", b"event: x  ", b'data: {"a":1}', b"data:1",
     b"data: ", b"data:", b"id: 7", b": comment", b"retry: 10", b"event: ", b"data: a b"]
)  # fmt: skip


@given(st.lists(_LINE, min_size=1, max_size=5))
def test_a_frame_reads_the_same_by_the_fast_path_and_the_general_one(lines: list[bytes]) -> None:
    raw = b"\n".join(lines)
    assert _frame(raw) == _frame_lines(raw)


def test_multi_line_data_is_joined_with_newlines() -> None:
    frames = SSEFrames()
    assert frames.feed(b'event: x\ndata: {"a":\ndata: 1}\n\n') == [("x", b'{"a":\n1}')]


class _FakeResponse:
    """The parts of the SDK's streaming response that MessageStream reads."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.status_code = 200
        self.headers = httpx2.Headers({"anthropic-ratelimit-requests-remaining": "9"})
        self.http_response = httpx2.Response(
            200, request=httpx2.Request("POST", "http://127.0.0.1/v1/messages")
        )

    async def iter_bytes(self) -> Any:
        for i in range(0, len(self._body), 5):
            yield self._body[i : i + 5]


async def test_an_error_event_raises_the_sdks_status_error() -> None:
    body = _sse("message_start", START) + _sse(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    stream = MessageStream(_FakeResponse(body))
    seen = []
    with pytest.raises(anthropic.APIStatusError) as info:
        async for event in stream.events():
            seen.append(event["type"])
    assert seen == ["message_start"]
    assert info.value.status_code == 200
    assert info.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


async def test_the_reader_skips_pings_and_yields_unknown_events() -> None:
    body = b"".join(_sse(name, data) for name, data in TOOL_STREAM)
    stream = MessageStream(_FakeResponse(body))
    kinds = [event["type"] async for event in stream.events()]
    assert "ping" not in kinds
    assert "future_event" in kinds
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert stream.accumulated.saw_stop
    assert stream.headers["anthropic-ratelimit-requests-remaining"] == "9"


def _text_stream(pieces: list[str]) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("message_start", START),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        ),
        *(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": p},
                },
            )
            for p in pieces
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_stop", {"type": "message_stop"}),
    ]


class _Paced(_FakeResponse):
    """One event per read; the reads listed in `waits` wait for the network first."""

    def __init__(self, body: bytes, waits: set[int]) -> None:
        super().__init__(body)
        self.waits = waits
        self.reads = 0

    async def iter_bytes(self) -> Any:
        for i, frame in enumerate(self._body.split(b"\n\n")[:-1]):
            if i in self.waits:
                await asyncio.sleep(0.01)  # longer than a read of buffered data takes
            self.reads += 1
            yield frame + b"\n\n"


async def test_a_pause_follows_a_read_that_waited_and_then_every_read_while_it_lasts() -> None:
    body = b"".join(_sse(name, data) for name, data in _text_stream(list("abcdef")))
    response = _Paced(body, waits={0, 3})
    stream = MessageStream(response)
    answers: list[asyncio.Future[None] | None] = []
    after_reads: list[int] = []

    def pause(_resume: Callable[[], None]) -> asyncio.Future[None] | None:
        after_reads.append(response.reads)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        # Not yet (as before the first words), then a sleep, then no more.
        answer = [None, done, None][len(after_reads) - 1] if len(after_reads) <= 3 else None
        answers.append(answer)
        return answer

    text = ""
    async for event in stream.events(pause):
        if event["type"] == "content_block_delta":
            text += event["delta"]["text"]
    assert text == "abcdef"
    # Read 1 waited: asked, no pause. Reads 2-3 did not wait: not asked. Read 4 waited: asked,
    # a pause; so read 5 is followed by the question too, whose answer ends the pausing.
    assert after_reads == [1, 4, 5]
    assert [a is not None for a in answers] == [False, True, False]


async def test_while_paused_the_socket_is_not_read_and_nothing_is_lost() -> None:
    """Through the real SDK and its aiohttp client, as the service streams: each pause stops
    reading the socket (upstream's events wait in the kernel), reading resumes after it, and
    the text is whole."""
    config = SimulatorConfig(ttft_ms=1, tokens_per_s=400, output_tokens=60)
    async with run_simulator(config) as url:
        client = anthropic.AsyncAnthropic(
            api_key="sk-test", base_url=url, http_client=anthropic.DefaultAioHttpClient()
        )
        params: dict[str, Any] = {
            "model": "claude-sonnet-5-5",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "paced reading [[tokens:60]]"}],
        }
        try:
            whole = await client.messages.create(**params)
            async with stream_message(client, params) as stream:
                socket = _socket_of(stream._response)
                assert socket() is not None  # the installed SDK still streams over aiohttp
                # (reading while asleep, reading once resumed), per pause
                reading: list[tuple[bool, bool]] = []

                async def nap(resume: Callable[[], None]) -> None:
                    await asyncio.sleep(0.02)  # several events' worth at 400 tokens/s
                    transport: Any = socket()
                    if transport is None:
                        return  # the body has ended: aiohttp has the connection back
                    asleep = transport.is_reading()
                    resume()  # as the Flusher does a moment before waking the generation
                    resume()  # (once is what counts)
                    reading.append((asleep, transport.is_reading()))
                    await asyncio.sleep(0.002)

                text = ""
                async for event in stream.events(lambda resume: asyncio.ensure_future(nap(resume))):
                    if event["type"] == "content_block_delta":
                        text += event["delta"]["text"]
        finally:
            await client.close()
    assert len(reading) >= 3
    assert set(reading) == {(False, True)}
    assert text == whole.content[0].text  # type: ignore[union-attr]


class _OneRead(_FakeResponse):
    """The whole body in one read, as after a pause in which upstream sent several events."""

    async def iter_bytes(self) -> Any:
        yield self._body


def _built(events: list[dict[str, Any]]) -> MessageAccumulator:
    acc = MessageAccumulator()
    for event in events:
        acc.add(json.loads(json.dumps(event)))
    return acc


def test_merged_deltas_accumulate_to_the_same_message() -> None:
    events = [data for name, data in TOOL_STREAM if name != "ping"]
    events += [data for _, data in _text_stream(["Hel", "lo, ", "wor", "ld \u00e9 <b>"])][1:]
    merged = merge_deltas(json.loads(json.dumps(events)))
    assert len(merged) < len(events)
    assert _built(merged).message == _built(events).message


def test_only_consecutive_deltas_of_one_block_and_kind_merge() -> None:
    def delta(index: int, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": index, "delta": {"type": kind, **fields}}

    events = [
        delta(0, "thinking_delta", thinking="a"),
        delta(0, "thinking_delta", thinking="b"),
        delta(0, "signature_delta", signature="s1"),
        delta(0, "signature_delta", signature="s2"),
        delta(1, "text_delta", text="c"),
        delta(2, "text_delta", text="d"),
        {"type": "ping"},
        delta(2, "text_delta", text="e"),
        delta(2, "text_delta", text="f"),
        delta(3, "input_json_delta", partial_json='{"x"'),
        delta(3, "input_json_delta", partial_json=": 1}"),
    ]
    assert merge_deltas(events) == [
        delta(0, "thinking_delta", thinking="ab"),
        delta(0, "signature_delta", signature="s1"),
        delta(0, "signature_delta", signature="s2"),
        delta(1, "text_delta", text="c"),
        delta(2, "text_delta", text="d"),
        {"type": "ping"},
        delta(2, "text_delta", text="ef"),
        delta(3, "input_json_delta", partial_json='{"x": 1}'),
    ]


async def test_deltas_read_together_come_out_as_one_event() -> None:
    pieces = [f"word{i} " for i in range(20)]
    body = b"".join(_sse(name, data) for name, data in _text_stream(pieces))
    stream = MessageStream(_OneRead(body))
    events = [event async for event in stream.events()]
    deltas = [e for e in events if e["type"] == "content_block_delta"]
    assert [d["delta"]["text"] for d in deltas] == ["".join(pieces)]
    assert stream.accumulated.content == [{"type": "text", "text": "".join(pieces)}]


async def test_deltas_before_an_error_in_the_same_read_are_still_delivered() -> None:
    body = b"".join(_sse(name, data) for name, data in _text_stream(["a", "b"])[:4])
    body += _sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}})
    stream = MessageStream(_OneRead(body))
    seen: list[dict[str, Any]] = []
    with pytest.raises(anthropic.APIStatusError):
        async for event in stream.events():
            seen.append(event)
    assert [e["type"] for e in seen] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
    ]
    assert stream.accumulated.content == [{"type": "text", "text": "ab"}]


class _PacedResponse(_FakeResponse):
    """Hands over one SSE event per read, waiting `gaps[i]` seconds before read i."""

    def __init__(self, events: list[bytes], gaps: list[float]) -> None:
        super().__init__(b"")
        self._events, self._gaps = events, gaps

    async def iter_bytes(self) -> Any:
        for event, gap in zip(self._events, self._gaps, strict=True):
            await asyncio.sleep(gap)
            yield event


def _pings(n: int) -> list[bytes]:
    return [_sse("message_start", START)] + [_sse("ping", {"type": "ping"})] * (n - 1)


async def test_a_read_waiting_past_the_read_timeout_is_a_stall() -> None:
    stream = MessageStream(_PacedResponse(_pings(3), [0, 0.01, 5.0]))
    with pytest.raises(UpstreamStalled):
        async for _event in stream.events(read_timeout=0.2):
            pass
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_only_reads_are_timed_not_the_time_between_them() -> None:
    # Each read answers at once; the consumer is slow (0.15 s per event, 0.45 s in all).
    stream = MessageStream(_PacedResponse(_pings(3), [0, 0, 0]))
    seen = 0
    async for _event in stream.events(read_timeout=0.1):
        seen += 1
        await asyncio.sleep(0.15)
    assert seen == 1  # message_start; the pings are skipped


async def test_a_cancel_during_a_read_stays_a_cancel() -> None:
    """A stop cancels the reading task; even when the watchdog's timer fires in the same loop
    turn, the generation sees the stop, not a stall."""
    import time

    for watchdog_fires_too in (False, True):
        stream = MessageStream(_PacedResponse(_pings(2), [0, 5.0]))

        async def read_all(
            s: MessageStream = stream, timeout: float = 0.05 if watchdog_fires_too else 30
        ) -> None:
            async for _event in s.events(read_timeout=timeout):
                pass

        task = asyncio.create_task(read_all())
        await asyncio.sleep(0.01)  # the task is waiting on its second read
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + 0.045, task.cancel)  # due just after the watchdog
        # Block the loop past both: they then run in one turn, before the task resumes.
        time.sleep(0.1)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()


_PARAMS: dict[str, Any] = {
    "model": "claude-sonnet-5-5",
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "read me [[tokens:40]]"}],
}


def _aiohttp_client(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="sk-test", base_url=url, http_client=anthropic.DefaultAioHttpClient(), max_retries=0
    )


@contextlib.asynccontextmanager
async def _simulated(tokens_per_s: float) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The SDK over aiohttp, as the service makes it, against a running simulator."""
    async with run_simulator(SimulatorConfig(ttft_ms=1, tokens_per_s=tokens_per_s)) as url:
        client = _aiohttp_client(url)
        try:
            yield client
        finally:
            await client.close()


async def _text_of(stream: MessageStream) -> str:
    text = ""
    async for event in stream.events():
        if event["type"] == "content_block_delta" and event["delta"]["type"] == "text_delta":
            text += event["delta"]["text"]
    return text


async def test_over_aiohttp_the_body_is_read_from_aiohttps_own_buffer() -> None:
    """The service's client: the bytes come straight from aiohttp's buffer (not through the
    SDK's iterators), and the answer is the one the API gives whole."""
    async with _simulated(2000) as client:
        whole = await client.messages.create(**_PARAMS)
        async with stream_message(client, _PARAMS) as stream:
            found = _aiohttp_response_of(stream._response)
            assert found is not None  # the installed SDK still streams over aiohttp
            body = _Body(stream._response)
            read: Any = body.read
            assert read.__self__ is found.content
            assert body.take is not None  # the installed aiohttp keeps the books we keep
            text = await _text_of(stream)
            assert stream.accumulated.saw_stop
    assert text == whole.content[0].text  # type: ignore[union-attr]


async def test_over_httpx2_the_body_is_read_through_the_sdk() -> None:
    async with run_simulator(SimulatorConfig(ttft_ms=1, tokens_per_s=2000)) as url:
        client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=url, max_retries=0)
        try:
            whole = await client.messages.create(**_PARAMS)
            async with stream_message(client, _PARAMS) as stream:
                assert _aiohttp_response_of(stream._response) is None
                text = await _text_of(stream)
        finally:
            await client.close()
    assert text and text == whole.content[0].text  # type: ignore[union-attr]


@contextlib.asynccontextmanager
async def _gzip_upstream(body: bytes) -> Any:
    """A Messages endpoint answering with a gzip-encoded event stream, in two writes."""

    async def messages(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "content-encoding": "gzip"}
        )
        await response.prepare(request)
        gzip = zlib.compressobj(wbits=31)
        half = len(body) // 2
        await response.write(gzip.compress(body[:half]) + gzip.flush(zlib.Z_SYNC_FLUSH))
        await response.write(gzip.compress(body[half:]) + gzip.flush())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_an_encoded_body_over_aiohttp_is_read_decoded_through_the_sdk() -> None:
    """aiohttp is told not to decompress (httpx2 does), so a content-encoded body must not be
    taken from aiohttp's buffer as it is."""
    body = b"".join(_sse(name, data) for name, data in _text_stream(["zipped ", "words"]))
    async with _gzip_upstream(body) as url:
        client = _aiohttp_client(url)
        try:
            async with stream_message(client, _PARAMS) as stream:
                assert _aiohttp_response_of(stream._response) is not None
                text = await _text_of(stream)
        finally:
            await client.close()
    assert text == "zipped words"
    assert stream.accumulated.saw_stop


async def test_a_body_cut_short_over_aiohttp_is_an_httpx2_transport_error() -> None:
    """As the SDK's vendored transport would map it: the generation calls that upstream_cut."""
    params = {**_PARAMS, "messages": [{"role": "user", "content": "x [[fault:cut]]"}]}
    async with _simulated(2000) as client, stream_message(client, params) as stream:
        with pytest.raises(httpx2.TransportError) as info:
            await _text_of(stream)
    assert isinstance(info.value.__cause__, aiohttp.ClientError)


async def test_taking_aiohttps_buffer_at_once_reads_what_it_would_and_keeps_its_books() -> None:
    """Several events buffered during a pause are taken in one step, alternating with
    aiohttp's own reads: the bytes are the whole stream, aiohttp's reader agrees on where it
    stands, and the connection goes back to the pool for the next request."""
    params = {**_PARAMS, "messages": [{"role": "user", "content": "take it [[tokens:80]]"}]}
    async with _simulated(500) as client:
        whole = await client.messages.create(**params)
        async with stream_message(client, params) as stream:
            found = _aiohttp_response_of(stream._response)
            assert found is not None
            content = found.content
            received, taken_frames = b"", []
            for turn in range(1000):
                await asyncio.sleep(0.02)  # ~10 events at 500 tokens/s
                if turn % 2 == 0:
                    data = _take_buffered(content)
                    taken_frames.append(data.count(b"\n\n"))
                else:
                    data = await content.readany()
                    if not data:
                        break
                received += data
                assert content._size == sum(len(b) for b in content._buffer)
            assert content.is_eof() and content._cursor == len(received)
        frames = SSEFrames().feed(received)
        text = "".join(
            json.loads(data)["delta"]["text"]
            for name, data in frames
            if name == "content_block_delta"
        )
        assert max(taken_frames) > 1  # one step took several of upstream's events
        assert found.connection is None  # released to the pool: the whole body was read
        again = await client.messages.create(**params)
    assert text == whole.content[0].text  # type: ignore[union-attr]
    assert again.content[0].text == text  # type: ignore[union-attr]

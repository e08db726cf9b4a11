"""The Anthropic API simulator, driven through the real `anthropic` SDK over real HTTP.

The SDK is the judge of wire-format fidelity: if it parses our streams, errors and headers the
way it parses the API's, the service can trust the simulator in its own tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
import pytest_asyncio
from anthropic.types import ThinkingConfigParam, ToolParam
from hypothesis import example, given
from hypothesis import strategies as st

from streams_service.llm.simulator import SimulatorConfig, run_simulator
from streams_service.llm.simulator.pacing import Pacer, Ticker
from streams_service.llm.simulator.plan import Block
from streams_service.llm.simulator.streaming import _delta_frame, _sse
from tests.support import REPO_ROOT, chatops_bin, free_port

# One simulator for the module keeps the suite fast; tests use unique prompts so the shared
# prompt cache and fault counters never couple them.
pytestmark = pytest.mark.asyncio(loop_scope="module")

OUTPUT_TOKENS = 12
MODEL = "claude-sonnet-5-5"
CALCULATOR: ToolParam = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression",
    "input_schema": {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
}
CLOCK: ToolParam = {
    "name": "clock",
    "description": "Current time",
    "input_schema": {"type": "object", "properties": {}},
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def base_url() -> AsyncIterator[str]:
    config = SimulatorConfig(ttft_ms=2, tokens_per_s=2000, output_tokens=OUTPUT_TOKENS)
    async with run_simulator(config) as url:
        yield url


@pytest_asyncio.fixture(loop_scope="module")
async def client(base_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="test", max_retries=0) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def raw(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": "Bearer test", "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as c:
        yield c


def prompt(text: str = "") -> str:
    """A prompt no other test sends, so cache and fault bookkeeping stay per test."""
    return f"{text} (test {uuid.uuid4().hex[:8]})".strip()


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def stream_final(
    client: anthropic.AsyncAnthropic, **kwargs: Any
) -> tuple[list[str], anthropic.types.ParsedMessage[None]]:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("max_tokens", 1024)
    async with client.messages.stream(**kwargs) as stream:
        texts = [t async for t in stream.text_stream]
        return texts, await stream.get_final_message()


async def active_responses(raw: httpx.AsyncClient) -> int:
    stats = (await raw.get("/_simulator/stats")).json()
    count: int = stats["active_responses"]
    return count


async def wait_idle(raw: httpx.AsyncClient, within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while await active_responses(raw):
        assert time.monotonic() < deadline, "simulator still producing for a gone client"
        await asyncio.sleep(0.02)


# --- text -------------------------------------------------------------------------------------


async def test_text_stream(client: anthropic.AsyncAnthropic) -> None:
    texts, final = await stream_final(client, messages=user(prompt("Hello")))

    assert final.content[0].type == "text"
    assert "".join(texts) == final.content[0].text
    assert len(final.content[0].text.split()) == OUTPUT_TOKENS
    assert final.stop_reason == "end_turn"
    assert final.stop_sequence is None
    assert final.usage.output_tokens == OUTPUT_TOKENS
    assert final.usage.input_tokens >= 1
    assert final.model == MODEL
    assert final.id.startswith("msg_")


async def test_output_is_deterministic(client: anthropic.AsyncAnthropic) -> None:
    text = prompt("Same question")
    _, first = await stream_final(client, messages=user(text))
    _, second = await stream_final(client, messages=user(text))
    _, other_prompt = await stream_final(client, messages=user(prompt("Another")))
    _, other_model = await stream_final(client, messages=user(text), model="claude-haiku-5-5")
    single = await client.messages.create(model=MODEL, max_tokens=1024, messages=user(text))

    assert first.content == second.content
    assert first.id != second.id  # ids are per response, like the API's
    assert other_prompt.content != first.content
    assert other_model.content != first.content
    # Streaming or not, the same reply.
    assert [b.to_dict() for b in single.content] == [
        {k: v for k, v in b.to_dict().items() if k != "parsed_output"} for b in first.content
    ]


async def test_tokens_directive(client: anthropic.AsyncAnthropic) -> None:
    texts, final = await stream_final(client, messages=user(prompt("Short [[tokens:5]]")))

    assert len("".join(texts).split()) == 5
    assert final.usage.output_tokens == 5


async def test_clock_directive_stamps_each_text_delta_with_its_send_time(
    client: anthropic.AsyncAnthropic,
) -> None:
    before = time.time() * 1000
    texts, final = await stream_final(
        client, messages=user(prompt("Stamped [[tokens:6]] [[clock]]"))
    )
    after = time.time() * 1000

    stamps = []
    for text in texts:
        head, _, rest = text.partition("]")
        assert head.startswith("[t:") and rest  # every delta: one stamp, then its words
        stamps.append(int(head[3:]))
    assert stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after
    words = "".join(t.partition("]")[2] for t in texts)
    assert len(words.split()) == 6
    assert final.usage.output_tokens == 6


async def test_non_streaming(client: anthropic.AsyncAnthropic) -> None:
    raw_response = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=1024, messages=user(prompt("Hi"))
    )
    message = await raw_response.parse()

    assert raw_response.headers["content-type"] == "application/json"
    assert raw_response.headers["request-id"].startswith("req_")
    assert message.type == "message"
    assert message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == OUTPUT_TOKENS
    assert message.usage.service_tier == "standard"


async def test_sse_framing(raw: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": user(prompt())}
    async with raw.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payload = (await response.aread()).decode()

    assert payload.endswith("\n\n")
    names: list[str] = []
    for frame in payload.removesuffix("\n\n").split("\n\n"):
        event_line, data_line = frame.split("\n")
        name = event_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name  # every event is named and repeats its type
        names.append(name)
    assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]

    start = json.loads(payload.split("\n")[1].removeprefix("data: "))["message"]
    assert start["content"] == []
    assert start["usage"]["output_tokens"] == 1
    assert {"cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation"} <= set(
        start["usage"]
    )


async def test_pacing() -> None:
    config = SimulatorConfig(ttft_ms=150, tokens_per_s=100, output_tokens=11)
    async with (
        run_simulator(config) as url,
        anthropic.AsyncAnthropic(base_url=url, api_key="test", max_retries=0) as paced,
    ):
        started = time.monotonic()
        async with paced.messages.stream(
            model=MODEL, max_tokens=100, messages=user("pace")
        ) as stream:
            arrivals = [time.monotonic() - started async for _ in stream.text_stream]

    # First token after the TTFT, then 10 more at 100/s: ~0.25 s in all. The simulator paces
    # from its own first token, so a loaded machine can only make the answer later: the gap
    # between the first and last arrivals may shrink (a late first token), the end may not
    # come sooner.
    assert arrivals[0] >= 0.15
    assert arrivals[-1] >= 0.15 + 10 / 100 - 0.005
    assert arrivals[-1] < 1.5
    assert len(arrivals) > 1  # paced output arrives in several deltas


# --- thinking, tools ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "thinking",
    [{"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"}],
    ids=["enabled", "adaptive"],
)
async def test_thinking(client: anthropic.AsyncAnthropic, thinking: ThinkingConfigParam) -> None:
    kinds: list[str] = []
    async with client.messages.stream(
        model=MODEL, max_tokens=2048, thinking=thinking, messages=user(prompt("Think"))
    ) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_message()

    assert [b.type for b in final.content] == ["thinking", "text"]
    thinking_block, text_block = final.content
    assert thinking_block.type == "thinking" and text_block.type == "text"
    assert thinking_block.thinking
    assert thinking_block.signature
    assert "thinking" in kinds and "signature" in kinds
    assert kinds.index("signature") < kinds.index("text")
    assert final.usage.output_tokens_details is not None
    thinking_tokens = final.usage.output_tokens_details.thinking_tokens
    assert thinking_tokens == len(thinking_block.thinking.split())
    assert final.usage.output_tokens == thinking_tokens + OUTPUT_TOKENS
    assert final.stop_reason == "end_turn"


async def test_thinking_non_streaming(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model=MODEL,
        max_tokens=2048,
        thinking={"type": "adaptive"},
        messages=user(prompt("Think")),
    )

    assert [b.type for b in message.content] == ["thinking", "text"]


async def test_tool_use_then_result(client: anthropic.AsyncAnthropic) -> None:
    question = prompt('What is 2+3*4? [[tool:calculator {"expression": "2+3*4"}]]')
    input_events: list[str] = []
    async with client.messages.stream(
        model=MODEL, max_tokens=1024, tools=[CALCULATOR, CLOCK], messages=user(question)
    ) as stream:
        async for event in stream:
            if event.type == "input_json":
                input_events.append(event.partial_json)
        first = await stream.get_final_message()

    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    call = first.content[1]
    assert call.type == "tool_use"
    assert call.name == "calculator"
    assert call.input == {"expression": "2+3*4"}
    assert call.id.startswith("toolu_")
    assert json.loads("".join(input_events)) == call.input
    assert len(input_events) > 1  # the input arrives in fragments

    history: list[Any] = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "14"}],
        },
    ]
    texts, second = await stream_final(client, tools=[CALCULATOR, CLOCK], messages=history)

    assert second.stop_reason == "end_turn"
    assert "The tool returned: 14" in "".join(texts)


async def test_tool_use_is_deterministic_and_non_streaming(
    client: anthropic.AsyncAnthropic,
) -> None:
    question = user(prompt('[[tool:calculator {"expression": "1+1"}]]'))
    a = await client.messages.create(
        model=MODEL, max_tokens=1024, tools=[CALCULATOR], messages=question
    )
    b = await client.messages.create(
        model=MODEL, max_tokens=1024, tools=[CALCULATOR], messages=question
    )

    assert a.stop_reason == "tool_use"
    assert a.content == b.content  # same tool id too: a retry sees the same call


async def test_tool_loop_takes_one_turn_per_directive(client: anthropic.AsyncAnthropic) -> None:
    question = prompt('[[tool:clock]] then [[tool:calculator {"expression": "6*7"}]]')
    history: list[Any] = [{"role": "user", "content": question}]
    calls: list[str] = []
    for turn in range(3):
        _, reply = await stream_final(client, tools=[CALCULATOR, CLOCK], messages=history)
        if reply.stop_reason != "tool_use":
            break
        call = reply.content[-1]
        assert call.type == "tool_use"
        calls.append(call.name)
        history.append(
            {
                "role": "assistant",
                "content": [b.model_dump(exclude_none=True) for b in reply.content],
            }
        )
        history.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": f"result-{turn}"}
                ],
            }
        )

    assert calls == ["clock", "calculator"]
    assert reply.stop_reason == "end_turn"
    final_text = reply.content[0].text if reply.content[0].type == "text" else ""
    assert "The tool returned: result-0" in final_text
    assert "The tool returned: result-1" in final_text


async def test_tool_directive_needs_the_tool(client: anthropic.AsyncAnthropic) -> None:
    # Not offered in `tools` (or no tools at all): the directive is just text.
    text = prompt('[[tool:calculator {"expression": "1"}]]')
    _, without_tools = await stream_final(client, messages=user(text))
    _, other_tools = await stream_final(client, tools=[CLOCK], messages=user(text))

    assert without_tools.stop_reason == "end_turn"
    assert other_tools.stop_reason == "end_turn"


# --- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "error_class", "error_type"),
    [
        ("rate_limit", 429, anthropic.RateLimitError, "rate_limit_error"),
        ("overloaded", 529, anthropic.OverloadedError, "overloaded_error"),
        ("server_error", 500, anthropic.InternalServerError, "api_error"),
        ("invalid_request", 400, anthropic.BadRequestError, "invalid_request_error"),
        ("auth", 401, anthropic.AuthenticationError, "authentication_error"),
    ],
)
@pytest.mark.parametrize("via", ["directive", "header"])
async def test_http_faults(
    client: anthropic.AsyncAnthropic,
    fault: str,
    status: int,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
    via: str,
) -> None:
    if via == "directive":
        text, headers = prompt(f"[[fault:{fault}]]"), {}
    else:
        text, headers = prompt(), {"x-sim-fault": fault}

    with pytest.raises(error_class) as caught:
        await stream_final(client, messages=user(text), extra_headers=headers)
    with pytest.raises(error_class):
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=user(text), extra_headers=headers
        )

    error = caught.value
    assert error.status_code == status
    assert error.type == error_type
    assert error.request_id is not None and error.request_id.startswith("req_")
    if status in (429, 529):
        assert error.response.headers["retry-after-ms"] == "10"
    if status == 429:
        assert error.response.headers["retry-after"] == "0"
        assert error.response.headers["anthropic-ratelimit-requests-remaining"] == "0"


@pytest.mark.parametrize(
    ("fault", "failures"), [("overloaded", 1), ("rate_limit", 2), ("server_error", 1)]
)
async def test_counted_fault_succeeds_on_sdk_retry(
    base_url: str, fault: str, failures: int
) -> None:
    text = prompt(f"[[fault:{fault}*{failures}]]")
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="test", max_retries=2) as c:
        started = time.monotonic()
        _, streamed = await stream_final(c, messages=user(text))
        elapsed = time.monotonic() - started
        # Identical body again: its failures are used up, so it succeeds at once.
        again = await c.messages.create(model=MODEL, max_tokens=1024, messages=user(text))

    assert streamed.stop_reason == "end_turn"
    assert again.stop_reason == "end_turn"
    if fault != "server_error":  # 500 has no retry-after, so the SDK backs off ~0.5 s
        assert elapsed < 1.0


async def test_counted_fault_fails_without_retries(client: anthropic.AsyncAnthropic) -> None:
    text = prompt("[[fault:overloaded*1]]")
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.create(model=MODEL, max_tokens=50, messages=user(text))
    message = await client.messages.create(model=MODEL, max_tokens=50, messages=user(text))

    assert message.stop_reason == "end_turn"


async def test_midstream_error(client: anthropic.AsyncAnthropic) -> None:
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=user(prompt("[[fault:midstream_error]]"))
        ) as stream:
            async for text in stream.text_stream:
                seen.append(text)

    assert caught.value.status_code == 200
    assert caught.value.type == "overloaded_error"
    assert not isinstance(caught.value, anthropic.OverloadedError)
    assert seen  # partial output arrived before the error


async def test_cut_drops_the_connection(client: anthropic.AsyncAnthropic) -> None:
    seen: list[str] = []
    # A dropped connection is a transport error from httpx2, not an anthropic.APIError.
    with pytest.raises(httpx2.RemoteProtocolError):
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=user(prompt("[[fault:cut]]"))
        ) as stream:
            async for text in stream.text_stream:
                seen.append(text)

    assert seen


async def test_cut_non_streaming_is_a_connection_error(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.APIConnectionError):
        await client.messages.create(
            model=MODEL, max_tokens=100, messages=user(prompt("[[fault:cut]]"))
        )


async def test_truncate_leaves_a_partial_message(client: anthropic.AsyncAnthropic) -> None:
    texts, final = await stream_final(client, messages=user(prompt("[[fault:truncate]]")))

    assert texts
    assert final.stop_reason is None  # no message_delta / message_stop ever came
    assert final.content[0].type == "text"
    assert final.content[0].text == "".join(texts)


async def test_slow_first_token_trips_a_read_timeout(base_url: str) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=base_url, api_key="test", max_retries=0, timeout=0.3
    ) as c:
        started = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout):
            await stream_final(c, messages=user(prompt("[[fault:slow]]")))

    assert time.monotonic() - started < 2.0


async def test_nothing_left_running_after_faults(
    client: anthropic.AsyncAnthropic, raw: httpx.AsyncClient
) -> None:
    for fault in ("cut", "truncate", "midstream_error"):
        with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIStatusError, RuntimeError)):
            async with client.messages.stream(
                model=MODEL, max_tokens=100, messages=user(prompt(f"[[fault:{fault}]]"))
            ) as stream:
                await stream.get_final_message()
                raise RuntimeError("truncate ends without an error of its own")
    async with anthropic.AsyncAnthropic(
        base_url=str(raw.base_url), api_key="test", max_retries=0, timeout=0.2
    ) as impatient:
        with pytest.raises(anthropic.APITimeoutError):
            await impatient.messages.create(
                model=MODEL, max_tokens=10, messages=user(prompt("[[fault:slow]]"))
            )

    await wait_idle(raw)


async def test_stall_then_client_leaves(
    client: anthropic.AsyncAnthropic, raw: httpx.AsyncClient
) -> None:
    async with client.messages.stream(
        model=MODEL, max_tokens=100, messages=user(prompt("[[fault:stall]]"))
    ) as stream:
        first = await stream.__aiter__().__anext__()
        assert first.type == "message_start"
        await asyncio.sleep(0.3)
        assert stream.current_message_snapshot.content == []  # nothing after message_start
        assert await active_responses(raw) == 1

    # The client closed the stream: the simulator must stop producing promptly.
    await wait_idle(raw)


async def test_stop_ends_open_streams_promptly() -> None:
    config = SimulatorConfig(ttft_ms=0, tokens_per_s=0)
    async with run_simulator(config) as url:
        c = anthropic.AsyncAnthropic(base_url=url, api_key="test", max_retries=0)
        manager = c.messages.stream(model=MODEL, max_tokens=100, messages=user("[[fault:stall]]"))
        stream = await manager.__aenter__()
        await stream.__aiter__().__anext__()
        started = time.monotonic()
    # A stalled stream must not hold shutdown for the 60 s stall.
    assert time.monotonic() - started < 1.5
    with pytest.raises(httpx2.TransportError):
        await stream.get_final_message()
    await manager.__aexit__(None, None, None)
    await c.close()


async def test_unknown_fault_is_a_bad_request(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="unknown simulator fault"):
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=user(prompt("[[fault:nope]]"))
        )


# --- limits, stops, usage -------------------------------------------------------------------------


async def test_rate_limit_headers(client: anthropic.AsyncAnthropic) -> None:
    remaining: list[int] = []
    for _ in range(2):
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=user(prompt())
        ) as stream:
            headers = stream.response.headers
            await stream.get_final_message()
        for kind in ("requests", "input-tokens", "output-tokens", "tokens"):
            limit = int(headers[f"anthropic-ratelimit-{kind}-limit"])
            assert 0 <= int(headers[f"anthropic-ratelimit-{kind}-remaining"]) <= limit
            reset = datetime.fromisoformat(headers[f"anthropic-ratelimit-{kind}-reset"])
            assert reset.tzinfo is not None
        assert headers["request-id"].startswith("req_")
        assert stream.request_id == headers["request-id"]
        remaining.append(int(headers["anthropic-ratelimit-requests-remaining"]))

    assert remaining[1] < remaining[0]


async def test_max_tokens_truncates(client: anthropic.AsyncAnthropic) -> None:
    texts, final = await stream_final(client, max_tokens=5, messages=user(prompt()))

    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 5
    assert len("".join(texts).split()) == 5


async def test_max_tokens_counts_thinking(client: anthropic.AsyncAnthropic) -> None:
    _, final = await stream_final(
        client, max_tokens=30, thinking={"type": "adaptive"}, messages=user(prompt())
    )

    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 30


async def test_max_tokens_drops_a_tool_call_that_does_not_fit(
    client: anthropic.AsyncAnthropic,
) -> None:
    long_input = {"expression": "+".join(["1"] * 100)}
    text = prompt(f"[[tool:calculator {json.dumps(long_input)}]]")
    _, final = await stream_final(client, max_tokens=20, tools=[CALCULATOR], messages=user(text))

    assert final.stop_reason == "max_tokens"
    assert [b.type for b in final.content] == ["text"]


async def test_forced_stop_reasons(client: anthropic.AsyncAnthropic) -> None:
    _, forced = await stream_final(client, messages=user(prompt("[[stop:max_tokens]]")))
    _, refusal = await stream_final(client, messages=user(prompt("[[stop:refusal]]")))

    assert forced.stop_reason == "max_tokens"
    assert forced.usage.output_tokens == OUTPUT_TOKENS
    assert refusal.stop_reason == "refusal"
    assert refusal.stop_details is not None and refusal.stop_details.type == "refusal"


async def test_stop_sequence(client: anthropic.AsyncAnthropic) -> None:
    text = prompt("Stop early [[tokens:40]]")
    _, full = await stream_final(client, messages=user(text))
    full_text = full.content[0].text if full.content[0].type == "text" else ""
    words = full_text.split()
    stop = " " + words[20]  # the leading space keeps it a whole word
    cut_at = full_text.find(stop)

    _, stopped = await stream_final(client, messages=user(text), stop_sequences=[stop])

    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == stop
    assert stopped.content[0].type == "text"
    assert stopped.content[0].text == full_text[:cut_at]
    assert stopped.usage.output_tokens == len(full_text[:cut_at].split()) + 1


async def test_prompt_cache(client: anthropic.AsyncAnthropic) -> None:
    system: Any = [
        {
            "type": "text",
            "text": prompt("You are terse. " * 50),
            "cache_control": {"type": "ephemeral"},
        }
    ]
    long_lived: Any = [
        {
            "type": "text",
            "text": prompt("Reference. " * 80),
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ]
    _, first = await stream_final(client, system=system, messages=user("one"))
    _, second = await stream_final(client, system=system, messages=user("two"))
    _, hour = await stream_final(client, system=long_lived, messages=user("three"))
    uncached = await client.messages.count_tokens(model=MODEL, system=system, messages=user("one"))

    u1, u2, u3 = first.usage, second.usage, hour.usage
    assert u1.cache_creation_input_tokens and u1.cache_creation_input_tokens > 100
    assert u1.cache_read_input_tokens == 0
    assert u1.cache_creation is not None
    assert u1.cache_creation.ephemeral_5m_input_tokens == u1.cache_creation_input_tokens
    assert u1.cache_creation.ephemeral_1h_input_tokens == 0
    # Same prefix again: read from the cache, nothing created.
    assert u2.cache_read_input_tokens == u1.cache_creation_input_tokens
    assert u2.cache_creation_input_tokens == 0
    assert u3.cache_creation is not None
    assert u3.cache_creation.ephemeral_1h_input_tokens == u3.cache_creation_input_tokens
    # Billing splits the prompt; the total is what count_tokens reports.
    assert u1.input_tokens + u1.cache_creation_input_tokens == uncached.input_tokens
    assert u1.input_tokens >= 1


async def test_prompt_cache_follows_a_moving_breakpoint(client: anthropic.AsyncAnthropic) -> None:
    # The usual chat pattern: the breakpoint sits on the newest user message, so each turn
    # must read what the previous turn wrote (the API looks back for earlier entries).
    def marked(text: str) -> Any:
        return {
            "role": "user",
            "content": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}],
        }

    opening = prompt("Tell me a story. " * 60)
    _, first = await stream_final(client, messages=[marked(opening)])
    history: Any = [
        {"role": "user", "content": [{"type": "text", "text": opening}]},
        {"role": "assistant", "content": first.content[0].to_dict()["text"]},
        marked("Go on."),
    ]
    _, second = await stream_final(client, messages=history)

    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation_input_tokens
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens  # the new turn is written for the next


async def test_hidden_thinking_is_billed_not_shown(client: anthropic.AsyncAnthropic) -> None:
    _, final = await stream_final(
        client,
        thinking={"type": "adaptive", "display": "omitted"},
        messages=user(prompt("Think quietly")),
    )

    thinking = final.content[0]
    assert thinking.type == "thinking"
    assert thinking.thinking == ""
    assert thinking.signature
    assert final.usage.output_tokens > OUTPUT_TOKENS


async def test_no_cache_control_no_cache(client: anthropic.AsyncAnthropic) -> None:
    text = prompt("plain")
    _, final = await stream_final(client, messages=user(text))
    counted = await client.messages.count_tokens(model=MODEL, messages=user(text))

    assert final.usage.cache_creation_input_tokens == 0
    assert final.usage.cache_read_input_tokens == 0
    assert final.usage.input_tokens == counted.input_tokens


# --- requests the API refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 10}, "messages"),
        ({"model": MODEL, "max_tokens": 10, "messages": []}, "messages"),
        ({"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max"),
        ({"model": MODEL, "max_tokens": 9, "messages": [{"role": "bot", "content": "x"}]}, "role"),
    ],
)
async def test_invalid_body(raw: httpx.AsyncClient, body: dict[str, Any], needle: str) -> None:
    response = await raw.post("/v1/messages", json=body)

    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert needle in error["error"]["message"]
    assert response.headers["request-id"] == error["request_id"]


async def test_invalid_json(raw: httpx.AsyncClient) -> None:
    response = await raw.post(
        "/v1/messages", content=b"{not json", headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_empty_messages_through_sdk(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model=MODEL, max_tokens=10, messages=[])


async def test_auth(base_url: str) -> None:
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=base_url) as c:
        missing = await c.post("/v1/messages", json=body)
        legacy = await c.post("/v1/messages", json=body, headers={"x-api-key": "k"})
        no_token = await c.post("/v1/messages", json=body, headers={"authorization": "Bearer"})
        basic = await c.post("/v1/messages", json=body, headers={"authorization": "Basic eDp5"})

    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert legacy.status_code == 200  # SDK 1.x style auth
    assert no_token.status_code == 401
    assert basic.status_code == 401


async def test_unknown_path_is_json_404(raw: httpx.AsyncClient) -> None:
    response = await raw.get("/v1/nothing")

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


# --- other endpoints ---------------------------------------------------------------------------


async def test_count_tokens(client: anthropic.AsyncAnthropic) -> None:
    short = await client.messages.count_tokens(model=MODEL, messages=user("hi"))
    longer = await client.messages.count_tokens(
        model=MODEL, system="be brief " * 40, tools=[CALCULATOR], messages=user("hi " * 100)
    )

    assert short.input_tokens >= 1
    assert longer.input_tokens > short.input_tokens + 100


async def test_models(client: anthropic.AsyncAnthropic) -> None:
    page = await client.models.list(limit=3)
    everything = [m.id async for m in client.models.list(limit=2)]
    one = await client.models.retrieve(page.data[0].id)

    assert len(page.data) == 3
    assert page.has_more is True
    assert page.data[0].type == "model"
    assert page.data[0].display_name
    assert page.data[0].created_at.tzinfo is not None
    assert MODEL in everything and len(everything) == len(set(everything))
    assert one.id == page.data[0].id
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("claude-nonexistent")


# --- the streaming hot path ---------------------------------------------------------------------

BLOCKS = [
    Block("text"),
    Block("thinking", signature="sig"),
    Block("tool_use", tool_id="toolu_01x", tool_name="calculator"),
]


def sse_delta(index: int, block: Block, chunk: str) -> bytes:
    event = {"type": "content_block_delta", "index": index, "delta": block.delta(chunk)}
    return _sse("content_block_delta", event)


# Async only because this module's tests all run on its event loop; the checks are plain calls.
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.kind)
async def test_delta_frame_is_byte_identical_to_sse(block: Block) -> None:
    @given(chunk=st.text(), index=st.integers(min_value=0, max_value=10_000))
    @example(chunk="", index=0)
    @example(chunk='say "hi"', index=1)
    @example(chunk="back\\slash \\u0000 \\n", index=2)
    @example(chunk="line\nbreak\r\ttab\x08\x0c", index=3)
    @example(chunk="".join(map(chr, range(32))) + "\x7f", index=4)
    @example(chunk="\x00", index=5)  # the marker the frame is split around
    @example(chunk="\u2028\u2029 ünïcødé 日本語 \u211d", index=6)
    @example(chunk="emoji 🙂👩\u200d👩\u200d👧 flags 🇳🇱", index=7)
    @example(chunk='{"partial": [1, "two"', index=8)
    @example(chunk="</script><!-- ]]> &amp;", index=9)
    def check(chunk: str, index: int) -> None:
        assert _delta_frame(index, block)(chunk) == sse_delta(index, block, chunk)

    check()


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.kind)
async def test_delta_frame_rejects_what_sse_rejects(block: Block) -> None:
    lone_surrogate = "half \ud83d of an emoji"
    with pytest.raises(UnicodeEncodeError):
        sse_delta(0, block, lone_surrogate)
    with pytest.raises(UnicodeEncodeError):
        _delta_frame(0, block)(lone_surrogate)


async def test_pacer_is_never_early_and_at_most_a_tick_late() -> None:
    tick_s = 0.002
    interval = 0.005
    pacer = Pacer(1 / interval, Ticker(tick_s))
    loop = asyncio.get_running_loop()
    releases: list[tuple[float, int]] = []
    left = 40
    while left:
        if (due := pacer.wait()) is not None:
            await due
        count = pacer.take(left)
        releases.append((loop.time(), count))
        left -= count

    start = releases[0][0]
    assert releases[0][1] == 1  # the first token goes at once, alone
    released = 0
    for now, count in releases:
        # The oldest token in the delta fell due no later than now, the newest too.
        assert now >= start + (released + count - 1) * interval - 1e-9
        # Lateness is the tick plus event loop jitter; generous, so a busy machine passes.
        assert now <= start + released * interval + tick_s + 0.25
        released += count
    assert released == 40


async def test_pacer_groups_tokens_that_fall_due_within_one_tick() -> None:
    pacer = Pacer(4000, Ticker(0.002))  # 4 tokens a tick
    deltas = 0
    left = 100
    while left:
        if (due := pacer.wait()) is not None:
            await due
        left -= pacer.take(left)
        deltas += 1
    assert deltas < 100  # they shared deltas instead of going one by one


async def test_a_cancelled_waiter_does_not_cancel_its_tick() -> None:
    ticker = Ticker(0.002)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.01
    leaving = asyncio.ensure_future(ticker.wake_at(loop, deadline))
    staying = asyncio.ensure_future(ticker.wake_at(loop, deadline))
    await asyncio.sleep(0)
    leaving.cancel()

    await asyncio.wait_for(staying, 2)
    assert loop.time() >= deadline
    assert leaving.cancelled()


async def test_a_stream_cancelled_mid_way_leaves_its_neighbours_on_pace() -> None:
    # Streams started together wait on the same ticks; one leaving must not disturb the rest.
    config = SimulatorConfig(ttft_ms=0, tokens_per_s=200, output_tokens=40)
    async with (
        run_simulator(config) as url,
        anthropic.AsyncAnthropic(base_url=url, api_key="test", max_retries=0) as c,
    ):

        async def leave_early() -> int:
            async with c.messages.stream(
                model=MODEL, max_tokens=100, messages=user(prompt("leaving"))
            ) as stream:
                seen = 0
                async for _ in stream.text_stream:
                    seen += 1
                    if seen == 3:
                        break
                return seen

        leaving = asyncio.create_task(leave_early())
        staying = await asyncio.gather(
            *(stream_final(c, messages=user(prompt(f"staying {i}"))) for i in range(5))
        )
        assert await leaving == 3

    for texts, final in staying:
        assert len("".join(texts).split()) == 40
        assert final.stop_reason == "end_turn"


# --- standalone ---------------------------------------------------------------------------------


async def test_cli_serves_standalone() -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            str(chatops_bin()),
            "simulator",
            "--port",
            str(port),
            "--ttft-ms",
            "0",
            "--tokens-per-s",
            "0",
            "--output-tokens",
            "7",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(base_url=base_url) as probe:
            while True:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                try:
                    stats = (await probe.get("/_simulator/stats")).json()
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "chatops simulator did not start"
                    await asyncio.sleep(0.05)
        async with anthropic.AsyncAnthropic(base_url=base_url, api_key="k", max_retries=0) as c:
            _, final = await stream_final(c, messages=user("hello"))

        assert final.usage.output_tokens == 7
        assert final.stop_reason == "end_turn"
        # Its own process: the start-up heap is frozen as the service's is (streams_service/
        # heap.py), so full collections do not stall every stream it serves.
        assert stats["gc_frozen_objects"] > 10_000
    finally:
        process.terminate()
        try:
            returncode = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it captured.
    assert returncode in (0, -signal.SIGTERM)
    assert process.stderr is not None
    assert b"Finished server process" in process.stderr.read()

"""A local stand-in for the Anthropic Messages API, byte-compatible with what the SDK expects.

The service talks to it when no ANTHROPIC_API_KEY is set (same code path, only `base_url`
differs), and tests and benchmarks use it to get real HTTP, real SSE framing and every failure
mode on demand. Wire-format truth: reference/anthropic-api.md beside the design doc.

Output is a deterministic function of the request, so a test can assert on exact text, and the
request itself chooses behaviour through directives in the last user message text:

    [[tool:NAME {"json": "input"}]]  call tool NAME (must be in `tools`); several directives in
                                     one message are issued one per turn, in order
    [[fault:NAME]] / [[fault:NAME*N]]  inject a fault (always / only the first N attempts of
                                     this exact request body); also header `x-sim-fault: NAME[*N]`
    [[tokens:N]]                     length of the generated text, in tokens
    [[stop:REASON]]                  force the stop reason (end_turn, max_tokens, stop_sequence,
                                     pause_turn, refusal, model_context_window_exceeded)
    [[clock]]                        streamed text deltas begin with `[t:MS]`, the Unix time in
                                     milliseconds at which the simulator sent them, so a reader
                                     downstream can measure its lag from the source (benchmarks)

Faults: rate_limit (429), overloaded (529), server_error (500), invalid_request (400),
auth (401), midstream_error (`event: error` after a few deltas), cut (TCP connection dropped
after a few deltas: the SDK raises `httpx2.RemoteProtocolError` while iterating), truncate (body
ends cleanly after a few deltas with no message_delta/message_stop: the SDK returns a partial
message with `stop_reason=None`), slow (10 s before the first event), stall (message_start,
then silence for 60 s or until the client goes away). Without `"stream": true`, midstream_error
answers 529 and cut/truncate/stall drop the connection before the body is complete.

A final turn whose last user message carries tool_result blocks answers "The tool returned: ..."
with every result of the current tool loop quoted verbatim.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import math
import random
import re
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import anyio
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from streams_service.heap import freeze_startup_heap

__all__ = [
    "FAULTS",
    "SimulatorConfig",
    "create_simulator_app",
    "run_simulator",
    "serve_simulator",
]

log = structlog.get_logger(__name__)

FAULTS: Final = frozenset(
    {
        "rate_limit",
        "overloaded",
        "server_error",
        "invalid_request",
        "auth",
        "midstream_error",
        "cut",
        "truncate",
        "slow",
        "stall",
    }
)
_STOP_REASONS: Final = frozenset(
    {
        "end_turn",
        "max_tokens",
        "stop_sequence",
        "pause_turn",
        "refusal",
        "model_context_window_exceeded",
    }
)
# The API's own request size limit; over it Cloudflare answers 413 before the API sees it.
_MAX_BODY_BYTES: Final = 32 * 1024 * 1024
# Content deltas sent before a midstream_error, cut or truncate fault fires: enough for a
# client to have shown partial output, which is the case those faults exist to test.
_DELTAS_BEFORE_FAULT: Final = 3
# Tool input JSON is streamed in fragments of this many characters, each billed as one token.
_JSON_CHARS_PER_TOKEN: Final = 4
# Rough size of an image or document block in the input estimate.
_MEDIA_BLOCK_CHARS: Final = 6000
# Bounds on the in-memory bookkeeping so a long benchmark cannot grow it without limit.
_MAX_TRACKED: Final = 100_000
_ORGANIZATION_ID: Final = "00000000-0000-4000-8000-00000000c0de"


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Pace and limits of the simulated API. Defaults feel like a real model in a UI."""

    ttft_ms: float = 300.0
    """Delay between the request and the first event (`message_start`)."""
    tokens_per_s: float = 80.0
    """Output pace; 0 or less streams as fast as the connection allows.

    Streams share one pacing clock that ticks every 2 ms: a token goes out up to 2 ms after it
    falls due, so above ~500 tokens/s deltas routinely carry several tokens each.
    """
    output_tokens: int = 60
    """Length of generated text unless the request says `[[tokens:N]]`."""
    thinking_tokens: int = 24
    """Length of the thinking block when thinking is requested (capped by `budget_tokens`)."""
    slow_ttft_s: float = 10.0
    """TTFT under the `slow` fault."""
    stall_s: float = 60.0
    """How long the `stall` fault keeps the connection open before dropping it."""
    retry_after_ms: int = 10
    """`retry-after-ms` on 429/529, small so SDK retries in tests are fast."""
    requests_per_minute: int = 4_000
    input_tokens_per_minute: int = 2_000_000
    output_tokens_per_minute: int = 400_000

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "slow_ttft_s", "stall_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("output_tokens", "thinking_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("requests_per_minute", "input_tokens_per_minute", "output_tokens_per_minute"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.retry_after_ms < 0:
            raise ValueError("retry_after_ms must be >= 0")


# --------------------------------------------------------------------------------------------
# Request parsing


class _APIError(Exception):
    """An error the API would answer with: rendered as its JSON error body and status."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}


def _invalid(message: str) -> _APIError:
    return _APIError(400, "invalid_request_error", message)


@dataclass(frozen=True, slots=True)
class _Thinking:
    budget_tokens: int | None
    display: str | None


@dataclass(frozen=True, slots=True)
class _FaultSpec:
    name: str
    count: int | None  # None: every attempt


@dataclass(frozen=True, slots=True)
class _ToolDirective:
    name: str
    input: dict[str, Any]


@dataclass(slots=True)
class _Request:
    model: str
    max_tokens: int
    messages: list[dict[str, Any]]
    system: Any
    tools: list[dict[str, Any]]
    tool_choice: str
    thinking: _Thinking | None
    stop_sequences: list[str]
    cache_control: dict[str, Any] | None
    stream: bool
    digest: str  # hash of the raw body: identifies "the same request" across SDK retries


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(f"Request body is not valid JSON: {exc}") from None


def _parse_messages_field(data: dict[str, Any]) -> list[dict[str, Any]]:
    messages = data.get("messages")
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list):
        raise _invalid("messages: Input should be a valid list")
    if not messages:
        raise _invalid("messages: at least one message is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages.{i}: Input should be a valid dictionary")
        if message.get("role") not in ("user", "assistant"):
            raise _invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if not isinstance(content, str | list):
            raise _invalid(f"messages.{i}.content: Input should be a valid string or list")
        if isinstance(content, list):
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise _invalid(f"messages.{i}.content.{j}: a content block needs a type")
    return messages


def _parse_model_field(data: dict[str, Any]) -> str:
    model = data.get("model")
    if model is None:
        raise _invalid("model: Field required")
    if not isinstance(model, str) or not model:
        raise _invalid("model: Input should be a non-empty string")
    return model


def _parse_request(data: Any, digest: str, *, max_tokens_required: bool = True) -> _Request:
    if not isinstance(data, dict):
        raise _invalid("Request body must be a JSON object")
    model = _parse_model_field(data)
    # count_tokens takes the same body minus max_tokens.
    max_tokens = data.get("max_tokens") if max_tokens_required else 1
    if max_tokens is None:
        raise _invalid("max_tokens: Field required")
    # bool is an int subclass; the API's validator rejects it, so do we.
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _invalid("max_tokens: Input should be an integer greater than or equal to 1")
    messages = _parse_messages_field(data)

    tools = data.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _invalid("tools: Input should be a valid list of tool definitions")
    tool_choice = data.get("tool_choice") or {"type": "auto"}
    if not isinstance(tool_choice, dict) or not isinstance(tool_choice.get("type"), str):
        raise _invalid("tool_choice: Input should be a valid dictionary with a type")

    thinking: _Thinking | None = None
    raw_thinking = data.get("thinking")
    if raw_thinking is not None:
        if not isinstance(raw_thinking, dict):
            raise _invalid("thinking: Input should be a valid dictionary")
        if raw_thinking.get("type") in ("enabled", "adaptive"):
            budget = raw_thinking.get("budget_tokens")
            thinking = _Thinking(
                budget_tokens=budget if isinstance(budget, int) and budget > 0 else None,
                display=raw_thinking.get("display"),
            )

    stop_sequences = data.get("stop_sequences") or []
    if not isinstance(stop_sequences, list) or not all(isinstance(s, str) for s in stop_sequences):
        raise _invalid("stop_sequences: Input should be a valid list of strings")

    cache_control = data.get("cache_control")
    return _Request(
        model=model,
        max_tokens=max_tokens,
        messages=messages,
        system=data.get("system"),
        tools=tools,
        tool_choice=tool_choice["type"],
        thinking=thinking,
        stop_sequences=[s for s in stop_sequences if s],
        cache_control=cache_control if isinstance(cache_control, dict) else None,
        stream=data.get("stream") is True,
        digest=digest,
    )


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    return []


def _text_of(content: Any) -> str:
    """The plain text of a message or tool_result content: its text blocks, concatenated."""
    return "".join(str(b.get("text", "")) for b in _blocks(content) if b.get("type") == "text")


def _last_user_index(messages: list[dict[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    return None


def _tool_results(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in _blocks(message["content"]) if b.get("type") == "tool_result"]


# --------------------------------------------------------------------------------------------
# Directives

_FAULT_RE: Final = re.compile(r"\[\[fault:([a-z_]+)(?:\*(\d+))?\]\]")
_TOKENS_RE: Final = re.compile(r"\[\[tokens:(\d+)\]\]")
_STOP_RE: Final = re.compile(r"\[\[stop:([a-z_]+)\]\]")
_TOOL_RE: Final = re.compile(r"\[\[tool:([A-Za-z0-9_.\-]+)")
_CLOCK: Final = "[[clock]]"
_FAULT_HEADER_RE: Final = re.compile(r"^\s*([a-z_]+)(?:\*(\d+))?\s*$")


def _fault_spec(name: str, count: str | None) -> _FaultSpec:
    if name not in FAULTS:
        # Loud, so a typo in a test does not silently become a passing happy path.
        raise _invalid(f"unknown simulator fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    return _FaultSpec(name, int(count) if count is not None else None)


def _find_fault(text: str, header: str | None) -> _FaultSpec | None:
    if header:
        match = _FAULT_HEADER_RE.match(header)
        if match is None:
            raise _invalid("x-sim-fault: expected NAME or NAME*N")
        return _fault_spec(match.group(1), match.group(2))
    found = _FAULT_RE.search(text)
    return _fault_spec(found.group(1), found.group(2)) if found else None


def _tool_directives(text: str) -> list[_ToolDirective]:
    """`[[tool:NAME {json}]]` directives in order; malformed ones are ignored like plain text."""
    decoder = json.JSONDecoder()
    found: list[_ToolDirective] = []
    for match in _TOOL_RE.finditer(text):
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
        tool_input: Any = {}
        if text.startswith("{", pos):
            try:
                tool_input, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                continue
            while pos < len(text) and text[pos].isspace():
                pos += 1
        if text.startswith("]]", pos) and isinstance(tool_input, dict):
            found.append(_ToolDirective(match.group(1), tool_input))
    return found


# --------------------------------------------------------------------------------------------
# Input token accounting and the prompt cache


def _chars_of_block(block: dict[str, Any]) -> int:
    kind = block.get("type")
    if kind == "text":
        return len(str(block.get("text", "")))
    if kind == "tool_result":
        return len(_text_of(block.get("content"))) + 8
    if kind == "tool_use":
        return len(str(block.get("name", ""))) + len(json.dumps(block.get("input", {})))
    if kind == "thinking":
        return len(str(block.get("thinking", "")))
    if kind in ("image", "document"):
        return _MEDIA_BLOCK_CHARS
    return len(json.dumps(block, sort_keys=True, default=str))


@dataclass(frozen=True, slots=True)
class _Segment:
    """One cacheable unit of the prompt, in the API's cache order (tools, system, messages)."""

    identity: str  # canonical text the cache key is built from
    chars: int
    cache_control: dict[str, Any] | None


def _without_cache_control(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "cache_control"}


def _segments(req: _Request) -> list[_Segment]:
    segments: list[_Segment] = []

    def add(prefix: str, block: dict[str, Any], chars: int) -> None:
        control = block.get("cache_control")
        identity = prefix + json.dumps(_without_cache_control(block), sort_keys=True, default=str)
        segments.append(_Segment(identity, chars, control if isinstance(control, dict) else None))

    for tool in req.tools:
        definition = _without_cache_control(tool)
        add("tool:", tool, len(json.dumps(definition, sort_keys=True, default=str)))
    for block in _blocks(req.system):
        add("system:", block, _chars_of_block(block))
    for message in req.messages:
        for block in _blocks(message["content"]):
            add(f"{message['role']}:", block, _chars_of_block(block))
    if req.cache_control is not None and segments and segments[-1].cache_control is None:
        # Top-level cache_control ("automatic caching") marks the last cacheable block.
        last = segments[-1]
        segments[-1] = _Segment(last.identity, last.chars, req.cache_control)
    return segments


def _tokens_for_chars(chars: int) -> int:
    # ~4 characters a token, plus one for the assistant-turn marker that follows the prompt;
    # the marker is never cacheable, so a fully cached prompt still bills >= 1 input token.
    return math.ceil(chars / 4) + 1


def _count_input_tokens(req: _Request) -> int:
    return _tokens_for_chars(sum(s.chars for s in _segments(req)))


@dataclass(frozen=True, slots=True)
class _InputUsage:
    input_tokens: int
    cache_creation_5m: int = 0
    cache_creation_1h: int = 0
    cache_read: int = 0

    @property
    def cache_creation(self) -> int:
        return self.cache_creation_5m + self.cache_creation_1h

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_creation_5m,
                "ephemeral_1h_input_tokens": self.cache_creation_1h,
            },
        }


# How far before a breakpoint the API looks for an earlier cache entry. This is what makes the
# usual "breakpoint on the newest message" pattern read the previous turn's entry.
_CACHE_LOOKBACK_BLOCKS: Final = 20
_TTL_5M: Final = 300.0
_TTL_1H: Final = 3600.0


class _PromptCache:
    """Prefixes written at cache breakpoints, with the API's TTL semantics (a hit refreshes)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key: expiry, ttl

    def usage_for(self, req: _Request) -> _InputUsage:
        segments = _segments(req)
        total = _tokens_for_chars(sum(s.chars for s in segments))
        # Prefix key and size after each segment; the model is part of every key.
        prefixes: list[tuple[str, int]] = []
        running = hashlib.sha256(req.model.encode())
        chars = 0
        for segment in segments:
            running.update(segment.identity.encode())
            chars += segment.chars
            prefixes.append((running.hexdigest(), math.ceil(chars / 4)))
        breakpoints = [
            (i, _TTL_1H if s.cache_control.get("ttl") == "1h" else _TTL_5M)
            for i, s in enumerate(segments)
            if s.cache_control is not None
        ]
        if not breakpoints:
            return _InputUsage(input_tokens=total)

        now = time.monotonic()
        hit = self._longest_hit(prefixes, [i for i, _ in breakpoints], now)
        read = prefixes[hit][1] if hit >= 0 else 0
        created = {_TTL_5M: 0, _TTL_1H: 0}
        covered = read
        for index, ttl in breakpoints:
            if index > hit:
                created[ttl] += prefixes[index][1] - covered
                covered = prefixes[index][1]
        if hit >= 0:
            key = prefixes[hit][0]
            self._store(key, self._entries[key][1], now)
        for index, ttl in breakpoints:
            self._store(prefixes[index][0], ttl, now)
        return _InputUsage(
            input_tokens=total - covered,
            cache_creation_5m=created[_TTL_5M],
            cache_creation_1h=created[_TTL_1H],
            cache_read=read,
        )

    def _longest_hit(
        self, prefixes: list[tuple[str, int]], breakpoints: list[int], now: float
    ) -> int:
        """Index of the longest live cached prefix a breakpoint can see, or -1."""
        for index in range(breakpoints[-1], -1, -1):
            if not any(0 <= b - index < _CACHE_LOOKBACK_BLOCKS for b in breakpoints):
                continue
            entry = self._entries.get(prefixes[index][0])
            if entry is not None and entry[0] > now:
                return index
        return -1

    def _store(self, key: str, ttl: float, now: float) -> None:
        self._entries[key] = (now + ttl, ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > _MAX_TRACKED:
            self._entries.popitem(last=False)


# --------------------------------------------------------------------------------------------
# Deterministic output

_VOCABULARY: Final = (
    "the a stream session durable offset reply token model answer question context window "
    "message event server client network latency budget cost usage cache prompt system tool "
    "result value signal record state change update request response header body chunk "
    "delta replay resume order exactly once every reader writer commit batch group queue "
    "worker task thread loop clock time second minute hour today later before after while "
    "because therefore however also still only just really quite rather simply clearly "
    "first next then finally here there this that these those which where when how why "
    "is are was were be been being has have had do does did can could should would will "
    "may might must shall good better best small large quick slow steady calm clear bright "
    "simple careful useful honest plain quiet open closed ready safe sound whole partial "
    "and or but so yet for with without into onto from over under between across through "
    "data table index query row column schema field key map list set graph tree node edge"
)
_WORDS: Final = tuple(_VOCABULARY.split())


def _seed(*parts: str) -> random.Random:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def _generate_words(rng: random.Random, count: int) -> list[str]:
    """`count` word tokens forming sentences; each piece carries its leading space."""
    pieces: list[str] = []
    left_in_sentence = 0
    for i in range(count):
        word = rng.choice(_WORDS)
        if left_in_sentence == 0:
            word = word.capitalize()
            left_in_sentence = rng.randint(6, 14)
        left_in_sentence -= 1
        if left_in_sentence == 0 or i == count - 1:
            word += "."
        pieces.append(word if i == 0 else " " + word)
    return pieces


def _split_text(text: str) -> list[str]:
    """Whitespace-delimited tokens whose concatenation is exactly `text`."""
    return re.findall(r"\s*\S+|\s+", text) or [text]


def _opaque_id(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return f"{prefix}01{digest[:24]}"


def _random_id(prefix: str) -> str:
    return f"{prefix}01{secrets.token_hex(12)}"


@dataclass(slots=True)
class _Block:
    kind: Literal["thinking", "text", "tool_use"]
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0
    hidden: bool = False  # thinking with display "omitted": billed, not shown
    signature: str = ""
    tool_id: str = ""
    tool_name: str = ""
    tool_input: dict[str, Any] = field(default_factory=dict)

    def truncated(self, tokens: int) -> _Block:
        pieces = self.pieces if self.hidden else self.pieces[:tokens]
        return _Block(
            self.kind,
            pieces,
            tokens,
            self.hidden,
            self.signature,
            self.tool_id,
            self.tool_name,
            self.tool_input,
        )

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def content_block(self) -> dict[str, Any]:
        """The finished block as it appears in a non-streaming `Message`."""
        if self.kind == "thinking":
            return {"type": "thinking", "thinking": self.text, "signature": self.signature}
        if self.kind == "tool_use":
            return {
                "type": "tool_use",
                "id": self.tool_id,
                "name": self.tool_name,
                "input": self.tool_input,
                "caller": {"type": "direct"},
            }
        return {"type": "text", "text": self.text}

    def start_block(self) -> dict[str, Any]:
        """The empty shell sent in `content_block_start`."""
        if self.kind == "thinking":
            return {"type": "thinking", "thinking": "", "signature": ""}
        if self.kind == "tool_use":
            return {
                "type": "tool_use",
                "id": self.tool_id,
                "name": self.tool_name,
                "input": {},
                "caller": {"type": "direct"},
            }
        return {"type": "text", "text": ""}

    def delta(self, chunk: str) -> dict[str, Any]:
        if self.kind == "thinking":
            return {"type": "thinking_delta", "thinking": chunk}
        if self.kind == "tool_use":
            return {"type": "input_json_delta", "partial_json": chunk}
        return {"type": "text_delta", "text": chunk}


@dataclass(slots=True)
class _Plan:
    blocks: list[_Block]
    stop_reason: str
    stop_sequence: str | None
    stop_details: dict[str, Any] | None
    clock: bool = False  # [[clock]]: stamp each streamed text delta with its send time

    @property
    def output_tokens(self) -> int:
        return sum(b.tokens for b in self.blocks)

    @property
    def thinking_tokens(self) -> int:
        return sum(b.tokens for b in self.blocks if b.kind == "thinking")


def _text_block(pieces: list[str]) -> _Block:
    return _Block("text", pieces, len(pieces))


def _apply_stop_sequences(block: _Block, stop_sequences: list[str]) -> str | None:
    """Cut generated text where the earliest stop sequence begins, as the API does.

    The text before the sequence is kept; the token in which the sequence began was still
    generated, so it is still billed.
    """
    text = block.text
    hits = [(text.find(s), s) for s in stop_sequences if s in text]
    if not hits:
        return None
    cut, sequence = min(hits)
    kept: list[str] = []
    start = 0
    for index, piece in enumerate(block.pieces):
        if start + len(piece) > cut:
            if start < cut:
                kept.append(piece[: cut - start])
            block.tokens = index + 1
            break
        kept.append(piece)
        start += len(piece)
    block.pieces = kept
    return sequence


def _plan_response(req: _Request, config: SimulatorConfig) -> _Plan:
    last_user = _last_user_index(req.messages)
    last_text = _text_of(req.messages[last_user]["content"]) if last_user is not None else ""
    blocks: list[_Block] = []

    if req.thinking is not None:
        count = config.thinking_tokens
        if req.thinking.budget_tokens is not None:
            count = min(count, req.thinking.budget_tokens)
        words = _generate_words(_seed("thinking", req.model, last_text), count)
        hidden = req.thinking.display == "omitted"
        signature = hashlib.sha512(("".join(words) + req.model).encode()).hexdigest()
        blocks.append(_Block("thinking", [] if hidden else words, count, hidden, signature))

    stop_sequence: str | None = None
    tool_call = _next_tool_call(req, last_user)
    answering = last_user is not None and bool(_tool_results(req.messages[last_user]))
    if tool_call is not None:
        directive, tool_id = tool_call
        intro = f"I'll use the {directive.name} tool."
        blocks.append(_text_block(_split_text(intro)))
        payload = json.dumps(directive.input, ensure_ascii=False)
        fragments = [
            payload[i : i + _JSON_CHARS_PER_TOKEN]
            for i in range(0, len(payload), _JSON_CHARS_PER_TOKEN)
        ]
        blocks.append(
            _Block(
                "tool_use",
                fragments,
                len(fragments),
                tool_id=tool_id,
                tool_name=directive.name,
                tool_input=directive.input,
            )
        )
    elif answering and last_user is not None:
        # The final turn of a tool loop quotes every result verbatim, so a test can follow
        # the data from tool to answer.
        lines = []
        for result in _answered_results(req.messages, last_user):
            verb = "reported an error" if result.get("is_error") else "returned"
            lines.append(f"The tool {verb}: {_text_of(result.get('content'))}")
        blocks.append(_text_block(_split_text("\n".join(lines))))
    else:
        tokens_match = _TOKENS_RE.search(last_text)
        count = int(tokens_match.group(1)) if tokens_match else config.output_tokens
        # Words past max_tokens + 1 could never be sent; the +1 is what marks truncation.
        count = max(1, min(count, req.max_tokens + 1))
        text = _text_block(_generate_words(_seed("text", req.model, last_text), count))
        stop_sequence = _apply_stop_sequences(text, req.stop_sequences)
        blocks.append(text)

    # max_tokens bounds everything billed as output, thinking included. A tool call is atomic:
    # half a tool input is useless, so one that does not fit is dropped rather than cut.
    budget = req.max_tokens
    kept: list[_Block] = []
    truncated = False
    for block in blocks:
        if budget <= 0 or (block.kind == "tool_use" and block.tokens > budget):
            truncated = True
            break
        if block.tokens > budget:
            kept.append(block.truncated(budget))
            truncated = True
            break
        kept.append(block)
        budget -= block.tokens

    if truncated:
        stop_reason = "max_tokens"
        stop_sequence = None
    elif stop_sequence is not None:
        stop_reason = "stop_sequence"
    elif any(b.kind == "tool_use" for b in kept):
        stop_reason = "tool_use"
    else:
        stop_reason = "end_turn"
    forced = _STOP_RE.search(last_text)
    if forced and forced.group(1) in _STOP_REASONS and not truncated:
        stop_reason = forced.group(1)
        if stop_reason == "stop_sequence" and stop_sequence is None:
            stop_sequence = req.stop_sequences[0] if req.stop_sequences else None
        elif stop_reason != "stop_sequence":
            stop_sequence = None
    details = None
    if stop_reason == "refusal":
        details = {"type": "refusal", "category": None, "explanation": "Simulated refusal."}
    return _Plan(kept, stop_reason, stop_sequence, details, _CLOCK in last_text)


def _prompt_index(messages: list[dict[str, Any]]) -> int | None:
    """The latest user message with text of its own: the turn that started this tool loop."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message["role"] == "user" and _text_of(message["content"]).strip():
            return i
    return None


def _answered_results(messages: list[dict[str, Any]], last_user: int) -> list[dict[str, Any]]:
    start = _prompt_index(messages)
    first = start + 1 if start is not None and start < last_user else last_user
    return [r for m in messages[first : last_user + 1] for r in _tool_results(m)]


def _next_tool_call(req: _Request, last_user: int | None) -> tuple[_ToolDirective, str] | None:
    """The first directive of the current tool loop that has not been answered yet."""
    if last_user is None or req.tool_choice == "none" or not req.tools:
        return None
    prompt = _prompt_index(req.messages)
    if prompt is None:
        return None
    names = {t.get("name") for t in req.tools}
    directives = [
        d for d in _tool_directives(_text_of(req.messages[prompt]["content"])) if d.name in names
    ]
    answered = sum(len(_tool_results(m)) for m in req.messages[prompt + 1 :] if m["role"] == "user")
    if answered >= len(directives):
        return None
    conversation = json.dumps(req.messages, sort_keys=True, default=str)
    return directives[answered], _opaque_id("toolu_", conversation, str(answered))


# --------------------------------------------------------------------------------------------
# Shared state: rate-limit windows, fault attempt counters, the prompt cache


class _RateLimits:
    """Per-minute windows like the API's headers describe; reported, never enforced."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        self._window_start = time.monotonic()
        self._requests = 0
        self._input = 0
        self._output = 0

    def charge(
        self, input_tokens: int, output_tokens: int, *, exhausted: bool = False
    ) -> dict[str, str]:
        now = time.monotonic()
        if now - self._window_start >= 60.0:
            self._window_start, self._requests, self._input, self._output = now, 0, 0, 0
        self._requests += 1
        self._input += input_tokens
        self._output += output_tokens
        reset = datetime.now(UTC) + timedelta(seconds=60.0 - (now - self._window_start))
        stamp = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
        c = self._config
        requests_left = 0 if exhausted else max(0, c.requests_per_minute - self._requests)
        input_left = max(0, c.input_tokens_per_minute - self._input)
        output_left = max(0, c.output_tokens_per_minute - self._output)
        tokens_limit = c.input_tokens_per_minute + c.output_tokens_per_minute
        headers: dict[str, str] = {}
        for name, limit, left in (
            ("requests", c.requests_per_minute, requests_left),
            ("input-tokens", c.input_tokens_per_minute, input_left),
            ("output-tokens", c.output_tokens_per_minute, output_left),
            ("tokens", tokens_limit, input_left + output_left),
        ):
            headers[f"anthropic-ratelimit-{name}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(left)
            headers[f"anthropic-ratelimit-{name}-reset"] = stamp
        return headers


@dataclass(slots=True)
class _State:
    config: SimulatorConfig
    rate_limits: _RateLimits
    cache: _PromptCache = field(default_factory=_PromptCache)
    attempts: OrderedDict[str, int] = field(default_factory=OrderedDict)
    # Set when the server stops, so open streams end instead of holding shutdown hostage.
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    ticker: _Ticker = field(default_factory=lambda: _Ticker(_TICK_S))
    requests_total: int = 0
    active_responses: int = 0

    def attempt(self, key: str) -> int:
        """1 for the first time this exact request is seen, then 2, 3, ..."""
        count = self.attempts.get(key, 0) + 1
        self.attempts[key] = count
        self.attempts.move_to_end(key)
        while len(self.attempts) > _MAX_TRACKED:
            self.attempts.popitem(last=False)
        return count


# --------------------------------------------------------------------------------------------
# HTTP layer


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


def _delta_frame(index: int, block: _Block) -> Callable[[str], bytes]:
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


# Where `_SimulatorApp` leaves the server's own `send` for `_PacedResponse`.
_SERVER_SEND: Final = "chatops.simulator.server_send"


class _SimulatorApp(Starlette):
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


class _PacedResponse(Response):
    """A response whose body is produced over time, tied to the client connection.

    A client disconnect (or the server stopping) cancels the producer at once, so nothing keeps
    generating for nobody. A producer raising `_AbortConnection` ends the ASGI call without the
    final body message; uvicorn then closes the socket mid-body, which is what a dropped
    upstream connection looks like to the client.
    """

    def __init__(
        self,
        state: _State,
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
        # See _SimulatorApp: the start goes through `send` so middleware sees it; the body
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


# Granularity of the shared pacing clock: a token goes out at most this much after it falls due.
# uvloop's timers have 1 ms resolution anyway; coarser ticks let more streams share each wakeup.
_TICK_S: Final = 0.002


class _Ticker:
    """One timer per clock tick for every waiting stream, instead of one per token per stream.

    At benchmark load (hundreds of streams at tens of tokens a second) a timer and a future per
    token per stream were a large share of the simulator's CPU. Here a waiter joins the first
    tick at or after its deadline, and the tick wakes all of its waiters at once.
    """

    def __init__(self, tick_s: float) -> None:
        self._tick_s = tick_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    def wake_at(self, loop: asyncio.AbstractEventLoop, deadline: float) -> asyncio.Future[None]:
        """Done when `loop`'s clock reads `deadline`, or up to one tick later."""
        if loop is not self._loop:
            # The app is being served by a new event loop: ticks left scheduled on an old one
            # would never fire, and a waiter joining one would wait forever.
            self._loop, self._waiters = loop, {}
        tick = math.ceil(deadline / self._tick_s)
        waiters = self._waiters.get(tick)
        if waiters is None:
            waiters = self._waiters[tick] = []
            loop.call_at(tick * self._tick_s, self._wake, tick)
        # A future per waiter, not one per tick: cancelling a waiting stream cancels the future
        # it waits on, and that must not cancel the other streams.
        waiter: asyncio.Future[None] = loop.create_future()
        waiters.append(waiter)
        return waiter

    def _wake(self, tick: int) -> None:
        for waiter in self._waiters.pop(tick, ()):
            if not waiter.done():
                waiter.set_result(None)


class _Pacer:
    """Releases output tokens at `tokens_per_s`; tokens that fell due together share a delta."""

    def __init__(self, tokens_per_s: float, ticker: _Ticker) -> None:
        self._interval = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self._ticker = ticker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start = 0.0
        self._released = 0

    def duration(self, tokens: int) -> float:
        return max(0, tokens - 1) * self._interval

    def wait(self) -> asyncio.Future[None] | None:
        """What to await until the next token falls due; None if it already has.

        Not a coroutine itself: this runs once per delta per stream, and a coroutine frame
        more on that path is measurable at benchmark load.
        """
        if self._interval == 0.0:
            return None
        # Time is the loop's clock, the one the ticker's timers run on. The loop is looked up
        # once: asyncio.get_running_loop() costs a getpid() system call every time.
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._start = loop.time()
        due_at = self._start + self._released * self._interval
        return self._ticker.wake_at(loop, due_at) if due_at > loop.time() else None

    def take(self, wanted: int) -> int:
        """Release the tokens due by now (once `wait()` is done): at least one, at most `wanted`."""
        if self._interval == 0.0:
            self._released += 1
            return 1
        assert self._loop is not None, "take() before wait()"
        due = int((self._loop.time() - self._start) / self._interval) + 1 - self._released
        count = max(1, min(wanted, due))
        self._released += count
        return count

    async def skip(self, tokens: int) -> None:
        """Spend the time of `tokens` tokens without emitting them (hidden thinking)."""
        while tokens > 0:
            if (due := self.wait()) is not None:
                await due
            tokens -= self.take(tokens)


def _message(
    msg_id: str, model: str, content: list[dict[str, Any]], stop: _Plan | None
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


def _usage(usage: _InputUsage, output_tokens: int, thinking_tokens: int) -> dict[str, Any]:
    return {
        **usage.as_dict(),
        "output_tokens": output_tokens,
        "output_tokens_details": {"thinking_tokens": thinking_tokens} if thinking_tokens else None,
        "server_tool_use": None,
        "service_tier": "standard",
        "inference_geo": "not_available",
    }


async def _event_stream(
    state: _State,
    req: _Request,
    plan: _Plan,
    usage: _InputUsage,
    fault: str | None,
) -> AsyncGenerator[bytes, None]:
    config = state.config
    msg_id = _random_id("msg_")
    await asyncio.sleep(config.slow_ttft_s if fault == "slow" else config.ttft_ms / 1000)
    start = _message(msg_id, req.model, [], None)
    # The API reports output_tokens 1 at the start; message_delta carries the real total.
    start["usage"] = _usage(usage, 1, 0)
    yield _sse("message_start", {"type": "message_start", "message": start})
    yield _sse("ping", {"type": "ping"})
    if fault == "stall":
        await asyncio.sleep(config.stall_s)
        raise _AbortConnection

    pacer = _Pacer(config.tokens_per_s, state.ticker)
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
            if failing and deltas >= _DELTAS_BEFORE_FAULT:
                break
        if failing and deltas >= _DELTAS_BEFORE_FAULT:
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

    final_usage = _usage(usage, plan.output_tokens, plan.thinking_tokens)
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


async def _single_body(
    state: _State, body: bytes, generation_s: float, fault: str | None
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


def _error_response(
    exc: _APIError, request_id: str, extra: dict[str, str] | None = None
) -> Response:
    body = {
        "type": "error",
        "error": {"type": exc.error_type, "message": exc.message},
        "request_id": request_id,
    }
    headers = {"request-id": request_id, **(extra or {}), **exc.headers}
    return JSONResponse(body, status_code=exc.status, headers=headers)


_HTTP_FAULTS: Final[dict[str, tuple[int, str, str]]] = {
    "rate_limit": (
        429,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization (simulated).",
    ),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "server_error": (500, "api_error", "Internal server error"),
    "invalid_request": (400, "invalid_request_error", "Simulated invalid request."),
    "auth": (401, "authentication_error", "invalid x-api-key"),
}


def _check_auth(request: Request) -> None:
    authorization = request.headers.get("authorization", "")
    bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    if not bearer and not request.headers.get("x-api-key", "").strip():
        raise _APIError(401, "authentication_error", "x-api-key header is required")


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _MAX_BODY_BYTES:
        raise _APIError(413, "request_too_large", "Request exceeds the maximum allowed size.")
    body = await request.body()
    if len(body) > _MAX_BODY_BYTES:
        raise _APIError(413, "request_too_large", "Request exceeds the maximum allowed size.")
    return body


def _state(request: Request) -> _State:
    state: _State = request.app.state.simulator
    return state


async def _messages(request: Request) -> Response:
    state = _state(request)
    state.requests_total += 1
    request_id = _random_id("req_")
    headers = {"request-id": request_id, "anthropic-organization-id": _ORGANIZATION_ID}
    try:
        _check_auth(request)
        body = await _read_body(request)
        req = _parse_request(_load_json(body), hashlib.sha256(body).hexdigest())
        last_user = _last_user_index(req.messages)
        last_text = _text_of(req.messages[last_user]["content"]) if last_user is not None else ""
        spec = _find_fault(last_text, request.headers.get("x-sim-fault"))
    except _APIError as exc:
        return _error_response(exc, request_id, {**headers, **state.rate_limits.charge(0, 0)})

    fault: str | None = None
    if spec is not None:
        attempt = state.attempt(f"{spec.name}:{req.digest}")
        if spec.count is None or attempt <= spec.count:
            fault = spec.name
            # Only the fault name: request text never reaches the logs.
            log.info("simulator.fault", fault=fault, attempt=attempt, request_id=request_id)

    if fault in _HTTP_FAULTS:
        status, error_type, message = _HTTP_FAULTS[fault]
        retry: dict[str, str] = {}
        if status in (429, 529):
            retry = {"retry-after-ms": str(state.config.retry_after_ms)}
            if status == 429:
                # Whole seconds, rounded down: the SDK prefers retry-after-ms when present.
                retry["retry-after"] = str(state.config.retry_after_ms // 1000)
        limits = state.rate_limits.charge(0, 0, exhausted=status == 429)
        return _error_response(
            _APIError(status, error_type, message, retry), request_id, {**headers, **limits}
        )

    plan = _plan_response(req, state.config)
    usage = state.cache.usage_for(req)
    headers.update(
        state.rate_limits.charge(
            usage.input_tokens + usage.cache_creation + usage.cache_read, plan.output_tokens
        )
    )
    if req.stream:
        headers["content-type"] = "text/event-stream; charset=utf-8"
        headers["cache-control"] = "no-cache"
        events = _event_stream(state, req, plan, usage, fault)
        return _PacedResponse(state, 200, headers, events, headers_first=True)
    if fault == "midstream_error":
        # Without a stream to break, the same upstream failure surfaces as a plain 529.
        status, error_type, message = _HTTP_FAULTS["overloaded"]
        retry = {"retry-after-ms": str(state.config.retry_after_ms)}
        return _error_response(_APIError(status, error_type, message, retry), request_id, headers)
    reply = _message(_random_id("msg_"), req.model, [b.content_block() for b in plan.blocks], plan)
    reply["usage"] = _usage(usage, plan.output_tokens, plan.thinking_tokens)
    payload = json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()
    headers["content-type"] = "application/json"
    headers["content-length"] = str(len(payload))
    generation_s = _Pacer(state.config.tokens_per_s, state.ticker).duration(plan.output_tokens)
    single = _single_body(state, payload, generation_s, fault)
    return _PacedResponse(state, 200, headers, single, headers_first=False)


async def _count_tokens(request: Request) -> Response:
    request_id = _random_id("req_")
    try:
        _check_auth(request)
        data = _load_json(await _read_body(request))
        count = _count_input_tokens(_parse_request(data, "", max_tokens_required=False))
    except _APIError as exc:
        return _error_response(exc, request_id)
    return JSONResponse({"input_tokens": count}, headers={"request-id": request_id})


_MODELS: Final = (
    # (id, display name, released, line)
    ("claude-opus-5-5", "Claude Opus 5.5", "2026-11-18T00:00:00Z", "opus"),
    ("claude-sonnet-5-5", "Claude Sonnet 5.5", "2026-10-07T00:00:00Z", "sonnet"),
    ("claude-haiku-5-5", "Claude Haiku 5.5", "2026-10-07T00:00:00Z", "haiku"),
    ("claude-sonnet-5", "Claude Sonnet 5", "2026-06-24T00:00:00Z", "sonnet"),
    ("claude-opus-4-7", "Claude Opus 4.7", "2026-04-16T00:00:00Z", "opus"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z", "sonnet"),
    ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-01T00:00:00Z", "haiku"),
)


def _model_info(entry: tuple[str, str, str, str]) -> dict[str, Any]:
    model_id, display_name, created_at, line = entry
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name,
        "created_at": created_at,
        "lifecycle": "active",
        "line": line,
        "max_input_tokens": 1_000_000,
        "max_tokens": 128_000,
    }


async def _list_models(request: Request) -> Response:
    request_id = _random_id("req_")
    try:
        _check_auth(request)
        raw_limit = request.query_params.get("limit", "20")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise _invalid("limit: Input should be an integer between 1 and 1000")
    except _APIError as exc:
        return _error_response(exc, request_id)
    ids = [m[0] for m in _MODELS]
    start, end = 0, len(_MODELS)
    if (after := request.query_params.get("after_id")) in ids:
        start = ids.index(after) + 1
    if (before := request.query_params.get("before_id")) in ids:
        end = ids.index(before)
    page = list(_MODELS[start:end])
    limit = int(raw_limit)
    chosen = page[-limit:] if before and not after else page[:limit]
    data = [_model_info(m) for m in chosen]
    return JSONResponse(
        {
            "data": data,
            "has_more": len(chosen) < len(page),
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        },
        headers={"request-id": request_id},
    )


async def _get_model(request: Request) -> Response:
    request_id = _random_id("req_")
    try:
        _check_auth(request)
        model_id = request.path_params["model_id"]
        entry = next((m for m in _MODELS if m[0] == model_id), None)
        if entry is None:
            raise _APIError(404, "not_found_error", f"model: {model_id}")
    except _APIError as exc:
        return _error_response(exc, request_id)
    return JSONResponse(_model_info(entry), headers={"request-id": request_id})


async def _stats(request: Request) -> Response:
    """Not part of the API: lets tests and benchmarks see load and leaked responses."""
    state = _state(request)
    return JSONResponse(
        {
            "requests_total": state.requests_total,
            "active_responses": state.active_responses,
            "gc_frozen_objects": gc.get_freeze_count(),
        }
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    error_type = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "api_error")
    message = exc.detail if isinstance(exc, HTTPException) else "Internal server error"
    return _error_response(_APIError(status, error_type, str(message)), _random_id("req_"))


def create_simulator_app(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator as an ASGI app; state (cache, fault counters) lives with the app."""
    config = config or SimulatorConfig()
    app = _SimulatorApp(
        routes=[
            Route("/v1/messages", _messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", _count_tokens, methods=["POST"]),
            Route("/v1/models", _list_models, methods=["GET"]),
            Route("/v1/models/{model_id}", _get_model, methods=["GET"]),
            Route("/_simulator/stats", _stats, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
    )
    app.state.simulator = _State(config=config, rate_limits=_RateLimits(config))
    return app


# --------------------------------------------------------------------------------------------
# Serving


class _Server(uvicorn.Server):
    """uvicorn that ends open simulator streams first, and leaves signals alone when embedded."""

    def __init__(self, config: uvicorn.Config, state: _State, *, own_signals: bool) -> None:
        super().__init__(config)
        self._sim_state = state
        self._own_signals = own_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Embedded in the service, SIGTERM belongs to the service's own server.
        if self._own_signals:
            with super().capture_signals():
                yield
        else:
            yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # A stalled stream would otherwise hold shutdown for the whole graceful timeout.
        self._sim_state.closing.set()
        await super().shutdown(sockets)


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def run_simulator(
    config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the simulator in the current event loop; yields its base URL (for `base_url=`).

    Port 0 picks a free port. Leaving the block drops any open streams and stops the server.
    """
    app = create_simulator_app(config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets that say
    # so, and without it Nagle + delayed ACK adds ~40 ms to every keep-alive request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound_port: int = sock.getsockname()[1]
    server_config = uvicorn.Config(
        app,
        lifespan="off",
        # Never reconfigure the host process's logging.
        log_config=None,
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = _Server(server_config, app.state.simulator, own_signals=False)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="chatops-simulator")
    try:
        while not server.started:
            if task.done():
                task.result()  # surfaces the startup error
                raise RuntimeError("simulator stopped during startup")
            await asyncio.sleep(0.005)
        yield _base_url(host, bound_port)
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()


def serve_simulator(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8090,
    log_level: str = "info",
) -> None:
    """Run the simulator standalone until SIGINT/SIGTERM (`chatops simulator`)."""
    app = create_simulator_app(config)
    # Its own process, serving load as the service does: the same collector tuning. Without
    # it a full collection stopped every stream it served for ~65 ms every ~20 s at 50 streams
    # of 100 tokens/s, and each showed up in the time to first token of whoever was waiting
    # (docs/BENCHMARKS.md, session 12): a stall the real API does not have.
    freeze_startup_heap()
    server_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_level=log_level,
        ws="none",
        timeout_graceful_shutdown=2,
    )
    _Server(server_config, app.state.simulator, own_signals=True).run()

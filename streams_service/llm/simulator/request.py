"""Parsing and validating a Messages API request as the API does, and the directives
(`[[fault:...]]`, `[[tool:...]]`, `[[tokens:N]]`, ...) a request uses to choose behaviour."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from streams_service.llm.simulator.config import FAULTS


class APIError(Exception):
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


def invalid(message: str) -> APIError:
    return APIError(400, "invalid_request_error", message)


@dataclass(frozen=True, slots=True)
class _Thinking:
    budget_tokens: int | None
    display: str | None


@dataclass(frozen=True, slots=True)
class _FaultSpec:
    name: str
    count: int | None  # None: every attempt


@dataclass(frozen=True, slots=True)
class ToolDirective:
    name: str
    input: dict[str, Any]


@dataclass(slots=True)
class ParsedRequest:
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


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"Request body is not valid JSON: {exc}") from None


def _parse_messages_field(data: dict[str, Any]) -> list[dict[str, Any]]:
    messages = data.get("messages")
    if messages is None:
        raise invalid("messages: Field required")
    if not isinstance(messages, list):
        raise invalid("messages: Input should be a valid list")
    if not messages:
        raise invalid("messages: at least one message is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages.{i}: Input should be a valid dictionary")
        if message.get("role") not in ("user", "assistant"):
            raise invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if not isinstance(content, str | list):
            raise invalid(f"messages.{i}.content: Input should be a valid string or list")
        if isinstance(content, list):
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise invalid(f"messages.{i}.content.{j}: a content block needs a type")
    return messages


def _parse_model_field(data: dict[str, Any]) -> str:
    model = data.get("model")
    if model is None:
        raise invalid("model: Field required")
    if not isinstance(model, str) or not model:
        raise invalid("model: Input should be a non-empty string")
    return model


def parse_request(data: Any, digest: str, *, max_tokens_required: bool = True) -> ParsedRequest:
    if not isinstance(data, dict):
        raise invalid("Request body must be a JSON object")
    model = _parse_model_field(data)
    # count_tokens takes the same body minus max_tokens.
    max_tokens = data.get("max_tokens") if max_tokens_required else 1
    if max_tokens is None:
        raise invalid("max_tokens: Field required")
    # bool is an int subclass; the API's validator rejects it, so do we.
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid("max_tokens: Input should be an integer greater than or equal to 1")
    messages = _parse_messages_field(data)

    tools = data.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise invalid("tools: Input should be a valid list of tool definitions")
    tool_choice = data.get("tool_choice") or {"type": "auto"}
    if not isinstance(tool_choice, dict) or not isinstance(tool_choice.get("type"), str):
        raise invalid("tool_choice: Input should be a valid dictionary with a type")

    thinking: _Thinking | None = None
    raw_thinking = data.get("thinking")
    if raw_thinking is not None:
        if not isinstance(raw_thinking, dict):
            raise invalid("thinking: Input should be a valid dictionary")
        if raw_thinking.get("type") in ("enabled", "adaptive"):
            budget = raw_thinking.get("budget_tokens")
            thinking = _Thinking(
                budget_tokens=budget if isinstance(budget, int) and budget > 0 else None,
                display=raw_thinking.get("display"),
            )

    stop_sequences = data.get("stop_sequences") or []
    if not isinstance(stop_sequences, list) or not all(isinstance(s, str) for s in stop_sequences):
        raise invalid("stop_sequences: Input should be a valid list of strings")

    cache_control = data.get("cache_control")
    return ParsedRequest(
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


def content_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    return []


def text_of(content: Any) -> str:
    """The plain text of a message or tool_result content: its text blocks, concatenated."""
    return "".join(
        str(b.get("text", "")) for b in content_blocks(content) if b.get("type") == "text"
    )


def last_user_index(messages: list[dict[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    return None


def tool_results(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in content_blocks(message["content"]) if b.get("type") == "tool_result"]


# --------------------------------------------------------------------------------------------
# Directives

_FAULT_RE: Final = re.compile(r"\[\[fault:([a-z_]+)(?:\*(\d+))?\]\]")
TOKENS_RE: Final = re.compile(r"\[\[tokens:(\d+)\]\]")
STOP_RE: Final = re.compile(r"\[\[stop:([a-z_]+)\]\]")
_TOOL_RE: Final = re.compile(r"\[\[tool:([A-Za-z0-9_.\-]+)")
CLOCK: Final = "[[clock]]"
_FAULT_HEADER_RE: Final = re.compile(r"^\s*([a-z_]+)(?:\*(\d+))?\s*$")


def _fault_spec(name: str, count: str | None) -> _FaultSpec:
    if name not in FAULTS:
        # Loud, so a typo in a test does not silently become a passing happy path.
        raise invalid(f"unknown simulator fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    return _FaultSpec(name, int(count) if count is not None else None)


def find_fault(text: str, header: str | None) -> _FaultSpec | None:
    if header:
        match = _FAULT_HEADER_RE.match(header)
        if match is None:
            raise invalid("x-sim-fault: expected NAME or NAME*N")
        return _fault_spec(match.group(1), match.group(2))
    found = _FAULT_RE.search(text)
    return _fault_spec(found.group(1), found.group(2)) if found else None


def tool_directives(text: str) -> list[ToolDirective]:
    """`[[tool:NAME {json}]]` directives in order; malformed ones are ignored like plain text."""
    decoder = json.JSONDecoder()
    found: list[ToolDirective] = []
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
            found.append(ToolDirective(match.group(1), tool_input))
    return found

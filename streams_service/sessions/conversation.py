"""A session's conversation as the Messages API wants it: the stored messages (text, tool calls
and their results, attachments) rebuilt into alternating user and assistant turns.

Separate from sessions/service.py: a pure function of the stored rows, used by a send, a
regenerate and the early start, and tested on its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from streams_service.sessions import attachments


class StoredMessage(Protocol):
    """What rebuilding the conversation reads of a message: an ORM object or a plain row."""

    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def parts(self) -> list[dict[str, Any]]: ...
    @property
    def status(self) -> str: ...


def conversation(
    messages: Sequence[StoredMessage], content: str, images: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A send's upstream `messages`: the conversation so far, then its user turn."""
    history = build_history(messages)
    history.append({"role": "user", "content": attachments.user_blocks(content, images)})
    return history


def build_history(messages: Sequence[StoredMessage]) -> list[dict[str, Any]]:
    """The conversation as Anthropic `messages`: tool calls and results are rebuilt from the
    stored parts; consecutive turns of one role are merged (the API wants them alternating)."""
    out: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        if m.status == "superseded":
            continue
        if m.role == "user":
            push("user", attachments.user_blocks(m.content, m.parts))
            continue
        assistant: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for part in m.parts:
            kind = part.get("type")
            if kind == "text" and part.get("content"):
                if results:
                    push("assistant", assistant)
                    push("user", results)
                    assistant, results = [], []
                assistant.append({"type": "text", "text": part["content"]})
            elif kind == "tool-call":
                if results:
                    push("assistant", assistant)
                    push("user", results)
                    assistant, results = [], []
                try:
                    arguments = records_json(part.get("arguments") or "{}")
                except ValueError:
                    arguments = {}
                assistant.append(
                    {"type": "tool_use", "id": part["id"], "name": part["name"], "input": arguments}
                )
            elif kind == "tool-result":
                results.append(
                    {
                        "type": "tool_result",
                        "tool_use_id": part["toolCallId"],
                        "content": part.get("content", ""),
                        "is_error": part.get("state") == "error",
                    }
                )
        # A tool call without a result (stopped mid-loop) cannot be sent back: drop it.
        answered = {r["tool_use_id"] for r in results}
        assistant = [b for b in assistant if b["type"] != "tool_use" or b["id"] in answered]
        push("assistant", assistant)
        push("user", results)
    return out


def records_json(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("tool input is not an object")
    return value

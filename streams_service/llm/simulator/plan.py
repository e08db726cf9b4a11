"""Deterministic output: the content blocks (thinking, text, tool use) a request is answered
with, and its stop reason, as a pure function of the request."""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from streams_service.llm.simulator.config import JSON_CHARS_PER_TOKEN, STOP_REASONS, SimulatorConfig
from streams_service.llm.simulator.request import (
    CLOCK,
    STOP_RE,
    TOKENS_RE,
    ParsedRequest,
    ToolDirective,
    last_user_index,
    text_of,
    tool_directives,
    tool_results,
)

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


def random_id(prefix: str) -> str:
    return f"{prefix}01{secrets.token_hex(12)}"


@dataclass(slots=True)
class Block:
    kind: Literal["thinking", "text", "tool_use"]
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0
    hidden: bool = False  # thinking with display "omitted": billed, not shown
    signature: str = ""
    tool_id: str = ""
    tool_name: str = ""
    tool_input: dict[str, Any] = field(default_factory=dict)

    def truncated(self, tokens: int) -> Block:
        pieces = self.pieces if self.hidden else self.pieces[:tokens]
        return Block(
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
class Plan:
    blocks: list[Block]
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


def _text_block(pieces: list[str]) -> Block:
    return Block("text", pieces, len(pieces))


def _apply_stop_sequences(block: Block, stop_sequences: list[str]) -> str | None:
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


def plan_response(req: ParsedRequest, config: SimulatorConfig) -> Plan:
    last_user = last_user_index(req.messages)
    last_text = text_of(req.messages[last_user]["content"]) if last_user is not None else ""
    blocks: list[Block] = []

    if req.thinking is not None:
        count = config.thinking_tokens
        if req.thinking.budget_tokens is not None:
            count = min(count, req.thinking.budget_tokens)
        words = _generate_words(_seed("thinking", req.model, last_text), count)
        hidden = req.thinking.display == "omitted"
        signature = hashlib.sha512(("".join(words) + req.model).encode()).hexdigest()
        blocks.append(Block("thinking", [] if hidden else words, count, hidden, signature))

    stop_sequence: str | None = None
    tool_call = _next_tool_call(req, last_user)
    answering = last_user is not None and bool(tool_results(req.messages[last_user]))
    if tool_call is not None:
        directive, tool_id = tool_call
        intro = f"I'll use the {directive.name} tool."
        blocks.append(_text_block(_split_text(intro)))
        payload = json.dumps(directive.input, ensure_ascii=False)
        fragments = [
            payload[i : i + JSON_CHARS_PER_TOKEN]
            for i in range(0, len(payload), JSON_CHARS_PER_TOKEN)
        ]
        blocks.append(
            Block(
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
            lines.append(f"The tool {verb}: {text_of(result.get('content'))}")
        blocks.append(_text_block(_split_text("\n".join(lines))))
    else:
        tokens_match = TOKENS_RE.search(last_text)
        count = int(tokens_match.group(1)) if tokens_match else config.output_tokens
        # Words past max_tokens + 1 could never be sent; the +1 is what marks truncation.
        count = max(1, min(count, req.max_tokens + 1))
        text = _text_block(_generate_words(_seed("text", req.model, last_text), count))
        stop_sequence = _apply_stop_sequences(text, req.stop_sequences)
        blocks.append(text)

    # max_tokens bounds everything billed as output, thinking included. A tool call is atomic:
    # half a tool input is useless, so one that does not fit is dropped rather than cut.
    budget = req.max_tokens
    kept: list[Block] = []
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
    forced = STOP_RE.search(last_text)
    if forced and forced.group(1) in STOP_REASONS and not truncated:
        stop_reason = forced.group(1)
        if stop_reason == "stop_sequence" and stop_sequence is None:
            stop_sequence = req.stop_sequences[0] if req.stop_sequences else None
        elif stop_reason != "stop_sequence":
            stop_sequence = None
    details = None
    if stop_reason == "refusal":
        details = {"type": "refusal", "category": None, "explanation": "Simulated refusal."}
    return Plan(kept, stop_reason, stop_sequence, details, CLOCK in last_text)


def _prompt_index(messages: list[dict[str, Any]]) -> int | None:
    """The latest user message with text of its own: the turn that started this tool loop."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message["role"] == "user" and text_of(message["content"]).strip():
            return i
    return None


def _answered_results(messages: list[dict[str, Any]], last_user: int) -> list[dict[str, Any]]:
    start = _prompt_index(messages)
    first = start + 1 if start is not None and start < last_user else last_user
    return [r for m in messages[first : last_user + 1] for r in tool_results(m)]


def _next_tool_call(req: ParsedRequest, last_user: int | None) -> tuple[ToolDirective, str] | None:
    """The first directive of the current tool loop that has not been answered yet."""
    if last_user is None or req.tool_choice == "none" or not req.tools:
        return None
    prompt = _prompt_index(req.messages)
    if prompt is None:
        return None
    names = {t.get("name") for t in req.tools}
    directives = [
        d for d in tool_directives(text_of(req.messages[prompt]["content"])) if d.name in names
    ]
    answered = sum(len(tool_results(m)) for m in req.messages[prompt + 1 :] if m["role"] == "user")
    if answered >= len(directives):
        return None
    conversation = json.dumps(req.messages, sort_keys=True, default=str)
    return directives[answered], _opaque_id("toolu_", conversation, str(answered))

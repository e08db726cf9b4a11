"""Input token accounting and the prompt cache: what a request costs in input, cache-write and
cache-read tokens, as the API reports them in `usage`."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from streams_service.llm.simulator.config import MAX_TRACKED, MEDIA_BLOCK_CHARS
from streams_service.llm.simulator.request import ParsedRequest, content_blocks, text_of


def _chars_of_block(block: dict[str, Any]) -> int:
    kind = block.get("type")
    if kind == "text":
        return len(str(block.get("text", "")))
    if kind == "tool_result":
        return len(text_of(block.get("content"))) + 8
    if kind == "tool_use":
        return len(str(block.get("name", ""))) + len(json.dumps(block.get("input", {})))
    if kind == "thinking":
        return len(str(block.get("thinking", "")))
    if kind in ("image", "document"):
        return MEDIA_BLOCK_CHARS
    return len(json.dumps(block, sort_keys=True, default=str))


@dataclass(frozen=True, slots=True)
class _Segment:
    """One cacheable unit of the prompt, in the API's cache order (tools, system, messages)."""

    identity: str  # canonical text the cache key is built from
    chars: int
    cache_control: dict[str, Any] | None


def _without_cache_control(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "cache_control"}


def _segments(req: ParsedRequest) -> list[_Segment]:
    segments: list[_Segment] = []

    def add(prefix: str, block: dict[str, Any], chars: int) -> None:
        control = block.get("cache_control")
        identity = prefix + json.dumps(_without_cache_control(block), sort_keys=True, default=str)
        segments.append(_Segment(identity, chars, control if isinstance(control, dict) else None))

    for tool in req.tools:
        definition = _without_cache_control(tool)
        add("tool:", tool, len(json.dumps(definition, sort_keys=True, default=str)))
    for block in content_blocks(req.system):
        add("system:", block, _chars_of_block(block))
    for message in req.messages:
        for block in content_blocks(message["content"]):
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


def count_input_tokens(req: ParsedRequest) -> int:
    return _tokens_for_chars(sum(s.chars for s in _segments(req)))


@dataclass(frozen=True, slots=True)
class InputUsage:
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


class PromptCache:
    """Prefixes written at cache breakpoints, with the API's TTL semantics (a hit refreshes)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key: expiry, ttl

    def usage_for(self, req: ParsedRequest) -> InputUsage:
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
            return InputUsage(input_tokens=total)

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
        return InputUsage(
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
        while len(self._entries) > MAX_TRACKED:
            self._entries.popitem(last=False)

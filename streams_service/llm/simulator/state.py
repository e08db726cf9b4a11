"""What the simulator keeps between requests: rate-limit windows (and their
`anthropic-ratelimit-*` headers), fault attempt counters, the prompt cache, the pacing clock."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from streams_service.llm.simulator.cache import PromptCache
from streams_service.llm.simulator.config import MAX_TRACKED, SimulatorConfig
from streams_service.llm.simulator.pacing import TICK_S, Ticker


class RateLimits:
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
class State:
    config: SimulatorConfig
    rate_limits: RateLimits
    cache: PromptCache = field(default_factory=PromptCache)
    attempts: OrderedDict[str, int] = field(default_factory=OrderedDict)
    # Set when the server stops, so open streams end instead of holding shutdown hostage.
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    ticker: Ticker = field(default_factory=lambda: Ticker(TICK_S))
    requests_total: int = 0
    active_responses: int = 0

    def attempt(self, key: str) -> int:
        """1 for the first time this exact request is seen, then 2, 3, ..."""
        count = self.attempts.get(key, 0) + 1
        self.attempts[key] = count
        self.attempts.move_to_end(key)
        while len(self.attempts) > MAX_TRACKED:
            self.attempts.popitem(last=False)
        return count

"""The simulator's settings (`SimulatorConfig`), the faults it knows and its fixed limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

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
STOP_REASONS: Final = frozenset(
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
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
# Content deltas sent before a midstream_error, cut or truncate fault fires: enough for a
# client to have shown partial output, which is the case those faults exist to test.
DELTAS_BEFORE_FAULT: Final = 3
# Tool input JSON is streamed in fragments of this many characters, each billed as one token.
JSON_CHARS_PER_TOKEN: Final = 4
# Rough size of an image or document block in the input estimate.
MEDIA_BLOCK_CHARS: Final = 6000
# Bounds on the in-memory bookkeeping so a long benchmark cannot grow it without limit.
MAX_TRACKED: Final = 100_000
ORGANIZATION_ID: Final = "00000000-0000-4000-8000-00000000c0de"


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

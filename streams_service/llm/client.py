"""The official SDK's client, as the service makes it: one per process, shared by every call."""

from __future__ import annotations

from typing import Literal

import anthropic
from opentelemetry import trace


def make_client(base_url: str, api_key: str, max_retries: int) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=base_url,
        api_key=api_key,
        max_retries=max_retries,
        # The SDK's aiohttp transport (the `aiohttp` extra): its C HTTP parser hands over
        # whatever the socket holds in one read, where httpx2's default stack (httpcore2, h11,
        # an anyio cancel scope per read) climbs a tower of Python generators per chunk, and
        # the upstream stream is a chunk per token. 50 sessions' TTFT overhead p50 61-69 ->
        # 40-43 ms; 200 generations' delivery lag p99 274 -> 166 ms (docs/BENCHMARKS.md). Its
        # ~7 MB of memory is paid for by importing Sentry only when it is configured.
        http_client=anthropic.DefaultAioHttpClient(),
        open_telemetry=sdk_open_telemetry(),
    )


def sdk_open_telemetry() -> Literal[False] | None:
    """The SDK's `open_telemetry` option: off (False) when no OpenTelemetry tracer provider is
    configured as the service starts, else None (the SDK's defaults and its
    ANTHROPIC_OPEN_TELEMETRY* variables).

    Why: the SDK starts a span for every call and builds its attributes (the request's model,
    parameters, headers) even when no provider is there to record it — about 1% of the event
    loop's CPU at 50 chatting sessions, for spans that go nowhere and, without instrumentation,
    no trace context to propagate. A deployment run under OpenTelemetry's instrumentation
    (`opentelemetry-instrument`) has a provider before the app starts, and keeps the spans."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False
    return None

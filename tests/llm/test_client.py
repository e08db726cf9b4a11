"""The SDK client the service makes (streams_service/llm/client.py): its call spans are built
only when an OpenTelemetry tracer provider is configured, checked through real calls to the
simulator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.util.types import Attributes

from streams_service.llm.client import make_client, sdk_open_telemetry
from streams_service.llm.simulator import SimulatorConfig, run_simulator


class _Tracer(trace.Tracer):
    """Records the names of the spans started; every span is a non-recording one."""

    def __init__(self, started: list[str]) -> None:
        self.started = started

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        self.started.append(name)
        return trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[trace.Span]:
        raise NotImplementedError  # the SDK starts its spans with start_span


class _Provider(trace.TracerProvider):
    def __init__(self) -> None:
        self.started: list[str] = []

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes | None = None,
    ) -> trace.Tracer:
        return _Tracer(self.started)


async def _ask(client: Any) -> str:
    reply = await client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=16,
        messages=[{"role": "user", "content": "hello [[tokens:3]]"}],
    )
    return "".join(b.text for b in reply.content if b.type == "text")


async def test_without_a_tracer_provider_the_sdk_builds_no_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = _Provider()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # none configured
    assert sdk_open_telemetry() is False
    async with run_simulator(SimulatorConfig(ttft_ms=0)) as url:
        client = make_client(url, "sk-test", max_retries=0)
        try:
            # A provider configured after the client was made: the client built no tracer.
            monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
            assert await _ask(client)
        finally:
            await client.close()
    assert provider.started == []


async def test_with_a_tracer_provider_the_sdk_keeps_its_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = _Provider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    assert sdk_open_telemetry() is None
    async with run_simulator(SimulatorConfig(ttft_ms=0)) as url:
        client = make_client(url, "sk-test", max_retries=0)
        try:
            assert await _ask(client)
        finally:
            await client.close()
    assert provider.started == ["anthropic.messages.create"]

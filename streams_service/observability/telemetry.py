"""The hooks the session and generation code calls, fanned out to metrics, PostHog and Sentry.

One object so the callers stay one line each and know nothing of the backends; with PostHog and
Sentry unconfigured the hooks only move metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from streams_service.config import Settings
from streams_service.llm.models import Usage
from streams_service.observability import sentry
from streams_service.observability.analytics import Analytics
from streams_service.observability.logging import configure_logging
from streams_service.observability.metrics import Metrics


@dataclass
class Telemetry:
    metrics: Metrics = field(default_factory=Metrics)
    analytics: Analytics = field(default_factory=Analytics)

    # ------------------------------------------------------------------ sessions

    def session_started(self, session_id: str, model: str, user_id: str | None) -> None:
        self.analytics.session_started(session_id, model, user_id)

    def message_sent(self, session_id: str, user_id: str | None, content: str) -> None:
        """A user message was accepted (its length is all that leaves the service)."""
        self.analytics.message_sent(session_id, user_id, "user", len(content))

    def early_start(self, confirmed: bool) -> None:
        """A send called Claude before reading the session; the read confirmed it or not."""
        self.metrics.observe_early_start(confirmed)

    def session_ended(
        self,
        session_id: str,
        user_id: str | None,
        message_count: int,
        created_at: datetime,
        ended_at: datetime,
    ) -> None:
        duration_ms = max(0, int((ended_at - created_at).total_seconds() * 1000))
        self.analytics.session_ended(session_id, user_id, message_count, duration_ms)

    # ------------------------------------------------------------------ generations

    def tool_executed(
        self, session_id: str, user_id: str | None, tool_name: str, approved: bool
    ) -> None:
        self.analytics.tool_executed(session_id, user_id, tool_name, approved)

    def generation_finished(
        self,
        *,
        session_id: str,
        generation_id: str,
        user_id: str | None,
        model: str,
        status: str,
        error_code: str | None,
        error: BaseException | None,
        ttft_ms: int | None,
        duration_s: float,
        usage: Usage,
        cost: Decimal,
        answer_length: int,
    ) -> None:
        self.metrics.observe_generation(
            model=model,
            status=status,
            ttft_ms=ttft_ms,
            duration_s=duration_s,
            usage=usage,
            cost=cost,
        )
        if status == "completed":
            self.analytics.message_sent(session_id, user_id, "assistant", answer_length)
        if error_code is not None:
            self.analytics.error(session_id, user_id, error_code)
        if error_code == "internal" and error is not None:
            sentry.report_generation_failure(
                error, session_id=session_id, generation_id=generation_id, model=model
            )

    def usage(self, model: str, usage: Usage, cost: Decimal) -> None:
        """Upstream use outside a generation (titles)."""
        self.metrics.observe_usage(model, usage, cost)


@contextlib.asynccontextmanager
async def running_telemetry(settings: Settings, metrics: Metrics) -> AsyncIterator[Telemetry]:
    """For the lifespan: logging configured, Sentry and PostHog started; at exit, PostHog's
    queue and Sentry's are flushed and both stopped."""
    configure_logging(settings)
    sentry_on = sentry.init_sentry(settings)
    telemetry = Telemetry(metrics, Analytics.from_settings(settings))
    try:
        yield telemetry
    finally:
        metrics.unwatch()
        await telemetry.analytics.close()
        if sentry_on:
            await sentry.close_sentry()

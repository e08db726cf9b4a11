"""Product analytics in PostHog, when POSTHOG_API_KEY is set.

Events carry ids, counts and our own explanations, never what anyone wrote: a message is
described by its length. `capture` only queues; the SDK's background thread sends batches, so
a request never waits on PostHog, and the lifespan flushes what is left at shutdown.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from streams_service.config import Settings

if TYPE_CHECKING:
    from posthog.client import Client

log = structlog.get_logger(__name__)

# chat_error's errorMessage: our explanation of each error code. Never the upstream error's own
# message (it may quote the request) nor anything the user wrote.
ERROR_EXPLANATIONS = {
    "rate_limited": "Claude's rate limit was reached.",
    "auth": "The service's Anthropic credentials were rejected.",
    "invalid_request": "Claude rejected the request.",
    "overloaded": "Claude was overloaded or failed.",
    "upstream_cut": "The connection to Claude was cut or stalled.",
    "interrupted": "The service restarted during the answer.",
    "internal": "The generation failed unexpectedly.",
}
# Who a system-token action is attributed to (the system principal has no user id).
SYSTEM_DISTINCT_ID = "system"


class Analytics:
    """The chat_* events. Without a client (no POSTHOG_API_KEY) every method does nothing."""

    def __init__(self, client: Client | None = None) -> None:
        self.client = client

    @classmethod
    def from_settings(cls, settings: Settings) -> Analytics:
        if not settings.posthog_api_key:
            return cls()
        # Imported only when configured: the SDK costs ~8 MB of every process's memory.
        from posthog.client import Client

        client = Client(
            settings.posthog_api_key,
            host=settings.posthog_host,
            gzip=True,
            # Never ask PostHog for anything at capture time (no flag or GeoIP lookups).
            disable_geoip=True,
            # Drop rather than grow without bound if PostHog is unreachable for long.
            max_queue_size=10_000,
        )
        return cls(client)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def session_started(self, session_id: str, model: str, user_id: str | None) -> None:
        self._capture(
            "chat_session_started",
            user_id,
            {"sessionId": session_id, "model": model, "userId": user_id},
        )

    def message_sent(self, session_id: str, user_id: str | None, role: str, length: int) -> None:
        self._capture(
            "chat_message_sent",
            user_id,
            {"sessionId": session_id, "role": role, "messageLength": length},
        )

    def tool_executed(
        self, session_id: str, user_id: str | None, tool_name: str, approved: bool
    ) -> None:
        self._capture(
            "chat_tool_executed",
            user_id,
            {"sessionId": session_id, "toolName": tool_name, "approved": approved},
        )

    def session_ended(
        self, session_id: str, user_id: str | None, message_count: int, duration_ms: int
    ) -> None:
        self._capture(
            "chat_session_ended",
            user_id,
            {"sessionId": session_id, "messageCount": message_count, "durationMs": duration_ms},
        )

    def error(self, session_id: str, user_id: str | None, error_type: str) -> None:
        self._capture(
            "chat_error",
            user_id,
            {
                "sessionId": session_id,
                "errorType": error_type,
                "errorMessage": ERROR_EXPLANATIONS.get(error_type, "The generation failed."),
            },
        )

    def _capture(self, event: str, user_id: str | None, properties: dict[str, Any]) -> None:
        if self.client is None:
            return
        try:
            self.client.capture(
                event, distinct_id=user_id or SYSTEM_DISTINCT_ID, properties=properties
            )
        except Exception as exc:
            # Analytics must never fail a chat.
            log.warning("analytics_capture_failed", analytics_event=event, error=type(exc).__name__)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop the SDK's thread (bounded: shutdown must not hang on
        an unreachable PostHog)."""
        client = self.client
        if client is None:
            return
        self.client = None
        try:
            await asyncio.wait_for(asyncio.to_thread(client.flush), timeout_s)
            await asyncio.wait_for(asyncio.to_thread(client.shutdown), 5)
        except Exception as exc:
            log.warning("analytics_flush_failed", error=type(exc).__name__)

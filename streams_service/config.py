"""The service's one Settings object, validated at boot (DESIGN §9)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from limits import parse as parse_limit
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from db.engine import normalize_database_url


class Settings(BaseSettings):
    """Every setting comes from the environment (or `.env`) under its upper-case field name."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    env: Literal["development", "test", "production"] = "development"
    database_url: str = Field(
        default="sqlite:///./.data/chatops.db",
        description="sqlite:////absolute/path.db or postgresql://user:pass@host:port/db",
    )
    # Long-poll and SSE idle wait before a 204 / keep-alive control event.
    streams_long_poll_timeout_ms: int = Field(default=30_000, ge=10, le=300_000)
    # SSE connections are closed after this long so CDNs can collapse requests (protocol §5.7).
    streams_sse_max_duration_s: float = Field(default=60.0, gt=0)
    # Largest body one append (or create) may carry; larger ones get 413.
    streams_max_append_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Upper bound on the body of one catch-up read; the client continues from Stream-Next-Offset.
    streams_max_read_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # How often the sweeper removes expired streams.
    streams_sweep_interval_s: float = Field(default=30.0, gt=0)
    # Retention (DESIGN §2): the streams of ended and deleted sessions are removed this many
    # days after the end or delete (the materialized messages stay); 0 keeps them forever.
    stream_retention_days: int = Field(default=30, ge=0)
    # Sessions in the trash longer than this are purged for good (usage rows stay); 0: never.
    trash_retention_days: int = Field(default=30, ge=0)
    # How often the retention sweeper runs; retention is counted in days, so hourly is plenty.
    retention_sweep_interval_s: float = Field(default=3600.0, gt=0)
    # Comma-separated origins allowed by CORS; "*" allows any (dev default).
    cors_origins: str = "*"
    # Claude. With no key the service runs its built-in simulator (model shown as "simulated").
    anthropic_api_key: str | None = None
    anthropic_base_url: str = "https://api.anthropic.com"
    anthropic_max_retries: int = Field(default=2, ge=0, le=10)
    # Largest user message, in bytes of UTF-8 (413 beyond).
    message_max_bytes: int = Field(default=100 * 1024, ge=1)
    # max_tokens of each upstream call.
    generation_max_output_tokens: int = Field(default=4096, ge=1)
    # A generation that receives nothing from upstream for this long is ended (watchdog).
    generation_stall_timeout_s: float = Field(default=60.0, gt=0)
    # A running generation beats every quarter of this; one silent this long was left behind
    # by a crashed process and is closed as interrupted when a process starts.
    generation_stale_after_s: float = Field(default=60.0, ge=1)
    # A tool call nobody approves or denies within this long is denied.
    approval_timeout_s: float = Field(default=300.0, gt=0)
    # Upstream calls one generation may make in a tool loop.
    max_tool_turns: int = Field(default=8, ge=1, le=50)
    # Per-session spending cap in USD (overridable per session at create); 0 disables it.
    session_budget_usd: float = Field(default=5.0, ge=0)
    # Delta coalescing: a generation writes at most every this many ms, or sooner past this
    # many characters, so a busy stream costs a few writes per second, not one per token. One
    # timer serves all of a process's generations (sessions/chunks.py Flusher).
    stream_flush_interval_ms: int = Field(default=40, ge=1)
    stream_flush_chars: int = Field(default=300, ge=1)
    # Under load the interval stretches: it holds up to 100 concurrent generations in one
    # process, then grows with their number (200 → 2x) up to this ceiling, so the process's
    # total write rate stays bounded instead of queueing every reader behind the writes. At 500
    # generations 150 ms put the delivery lag p99 at 237-305 ms, 120 ms at 184-222 ms for the
    # same CPU (docs/BENCHMARKS.md, session 15): the ceiling is most of a delta's wait.
    stream_flush_max_interval_ms: int = Field(default=120, ge=1)
    # On shutdown, running generations get this long to finish; the rest end as interrupted.
    drain_timeout_s: float = Field(default=25.0, ge=0)
    # How long an idle keep-alive connection stays open. Longer than clients keep theirs
    # (httpx: 5 s, uvicorn's own default): a client must give up on a connection before the
    # server does, or a request sent as the server closes it fails with a read error.
    http_keep_alive_s: int = Field(default=75, ge=1)
    # Sessions untouched for this many seconds end by themselves, as POST /end ends them
    # (stream closed, read-only, continue by fork), so abandoned chats do not stay open
    # forever; one replica ends each. 0 disables it.
    session_idle_timeout: float = Field(default=86400.0, ge=0)
    # Pace of the built-in simulator when no API key is set.
    simulator_ttft_ms: int = Field(default=300, ge=0)
    simulator_tokens_per_s: float = Field(default=80.0, ge=0)  # 0: unpaced
    # Worker processes of `chatops serve` (Postgres only): each runs its own writer and live
    # readers; Postgres row locks and LISTEN/NOTIFY keep them consistent, and stops and
    # approvals reach the worker running the generation through NOTIFY too.
    workers: int = Field(default=1, ge=1, le=32)
    # Per pool (the process has two): connections kept open, and how many more a burst may open.
    # Overflow connections are closed as they come back, so a load that keeps more than the
    # pool's size busy opens and closes connections all the time (at 50 chatting sessions ~3 a
    # second, each a new Postgres backend, on the event loop); a burst of 1,000 reconnecting SSE
    # readers opened in 3.3-4.6 s at 20 + 10 against 6.9-7.5 s at 10 + 20. The ceiling is 30
    # either way, so Postgres' connection budget is the same.
    db_pool_size: int = Field(default=20, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    log_level: str = "INFO"
    # Log lines as JSON (for log collectors) or console (for people); auto: JSON when
    # ENV=production, console otherwise.
    log_format: Literal["auto", "json", "console"] = "auto"
    # Error reporting: unhandled errors and failed generations go to this Sentry DSN (unset:
    # they are only logged). Traces are sampled at this rate; errors are always sent.
    sentry_dsn_streams: str | None = None
    sentry_traces_sample_rate: float = Field(default=0.1, ge=0, le=1)
    # Product analytics: chat_* events go to PostHog when a project key is set.
    posthog_api_key: str | None = None
    posthog_host: str = "https://us.i.posthog.com"
    # Identity (DESIGN §4). With a secret every /v1 route needs a bearer token: an API token,
    # a console JWT signed with it, or the secret itself (the system principal). Without one
    # the service is in dev mode: loopback only, everyone the local admin.
    streams_secret: str | None = None
    # Comma-separated emails that are admins when first seen (the first admins of a deploy).
    admin_emails: str = ""
    # Rate limits ("N/second|minute|hour|day", moving window). Redis holds the windows when
    # REDIS_URL is set, so every replica shares one limit; memory otherwise.
    redis_url: str | None = None
    rate_limit_session_create: str = "10/minute"
    rate_limit_messages: str = "30/minute"
    rate_limit_auth_failures: str = "20/minute"
    # Per-user daily spending cap in USD (admins set it per user); 0 disables it.
    user_daily_budget_usd: float = Field(default=20.0, ge=0)
    # How long a verified token is trusted without asking the database again: revoking or
    # disabling reaches other replicas within this many seconds (this process: at once).
    auth_cache_s: float = Field(default=10.0, ge=0, le=300)

    @field_validator("rate_limit_session_create", "rate_limit_messages", "rate_limit_auth_failures")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        try:
            parse_limit(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate limit like '10/minute'") from None
        return value

    @model_validator(mode="after")
    def _production_needs_a_secret(self) -> Settings:
        if self.env == "production" and not self.streams_secret:
            raise ValueError("ENV=production requires STREAMS_SECRET (authentication)")
        return self

    @field_validator("database_url")
    @classmethod
    def _normalize_db(cls, value: str) -> str:
        return normalize_database_url(value)

    @property
    def simulated(self) -> bool:
        return not self.anthropic_api_key

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

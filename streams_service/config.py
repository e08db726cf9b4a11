"""The service's one Settings object, validated at boot (DESIGN §9)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
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
    streams_max_read_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # How often the sweeper removes expired streams.
    streams_sweep_interval_s: float = Field(default=30.0, gt=0)
    # Comma-separated origins allowed by CORS; "*" allows any (dev default).
    cors_origins: str = "*"
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    log_level: str = "INFO"

    @field_validator("database_url")
    @classmethod
    def _normalize_db(cls, value: str) -> str:
        return normalize_database_url(value)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

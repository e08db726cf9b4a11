"""Response bodies of the ops routes (kept apart from the ORM models). Money is a decimal
string, as in SessionOut; times are ISO 8601 UTC."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer


def money(value: Decimal) -> str:
    return format(value.normalize(), "f")


class UsageRow(BaseModel):
    """One group. Only the keys named in `group_by` are present (`user` and `session` are ids;
    `day` and `hour` the UTC start of the bucket)."""

    model_config = ConfigDict(extra="forbid")

    day: datetime | None = None
    hour: datetime | None = None
    model: str | None = None
    user: str | None = None
    session: str | None = None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    # 5-minute and 1-hour cache writes together.
    cache_write_tokens: int
    cost_usd: Decimal
    generations: int
    # Generations that ended with an error (RUN_ERROR), interrupted ones included.
    errors: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None

    @field_serializer("cost_usd")
    def _money(self, value: Decimal) -> str:
        return money(value)


class UsageOut(BaseModel):
    rows: list[UsageRow]
    from_: datetime = Field(alias="from")
    to: datetime
    group_by: list[str]
    # More groups than one answer carries; narrow the range or the grouping.
    truncated: bool = False

    model_config = ConfigDict(populate_by_name=True)


class ErrorEventOut(BaseModel):
    id: int
    at: datetime
    type: str
    session_id: str | None
    generation_id: str | None
    user_id: str | None
    model: str | None
    message: str | None


class ErrorsOut(BaseModel):
    items: list[ErrorEventOut]
    next_cursor: str | None
    # Events per type over the whole range (the `type` filter does not apply).
    counts: dict[str, int]
    from_: datetime = Field(alias="from")
    to: datetime

    model_config = ConfigDict(populate_by_name=True)


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor_id: str | None
    actor_email: str | None
    action: str
    target_type: str
    target_id: str | None
    detail: dict[str, Any] | None


class AuditOut(BaseModel):
    items: list[AuditEntryOut]
    next_cursor: str | None
    from_: datetime = Field(alias="from")
    to: datetime

    model_config = ConfigDict(populate_by_name=True)


class LimitOut(BaseModel):
    name: str
    # As configured, e.g. "10/minute" (moving window).
    limit: str
    # What one window counts: per user, per session, per client address.
    scope: str


class RejectionBucket(BaseModel):
    bucket: datetime
    limit_name: str
    count: int


class RejectionOut(BaseModel):
    at: datetime
    limit_name: str
    key: str
    user_id: str | None
    session_id: str | None


class UpstreamHeadroom(BaseModel):
    at: datetime
    generation_id: str
    model: str
    headers: dict[str, str]


class WindowUse(BaseModel):
    limit_name: str
    key: str
    user_id: str | None
    used: int
    limit: int
    resets_at: datetime


class RateLimitsOut(BaseModel):
    limits: list[LimitOut]
    rejections: list[RejectionBucket]
    recent: list[RejectionOut]
    upstream: UpstreamHeadroom | None
    # Live use of each window, from the rate limiter.
    current: list[WindowUse]
    bucket: str
    from_: datetime = Field(alias="from")
    to: datetime

    model_config = ConfigDict(populate_by_name=True)

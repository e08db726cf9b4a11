"""Typed SQLAlchemy models. One schema for Postgres and SQLite, created by Alembic."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY; Postgres gets a real BIGINT identity.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on both databases (SQLite stores no zone; read back as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


USD = Numeric(14, 6)


class Base(DeclarativeBase):
    pass


class DsStream(Base):
    """One Durable Streams stream. Times are epoch milliseconds: the protocol works in sub-second
    TTLs, and integers compare and index the same way on both databases."""

    __tablename__ = "ds_streams"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    content_type: Mapped[str] = mapped_column(String(255))
    # Byte position of the tail; the Stream-Next-Offset is derived from it.
    tail: Mapped[int] = mapped_column(BigInteger, default=0)
    closed: Mapped[bool] = mapped_column(Boolean, default=False)
    closed_by_producer: Mapped[str | None] = mapped_column(Text)
    closed_by_epoch: Mapped[int | None] = mapped_column(BigInteger)
    closed_by_seq: Mapped[int | None] = mapped_column(BigInteger)
    last_stream_seq: Mapped[str | None] = mapped_column(Text)
    ttl_seconds: Mapped[int | None] = mapped_column(BigInteger)
    # The Stream-Expires-At value exactly as the client sent it (echoed on HEAD), and parsed.
    expires_at_raw: Mapped[str | None] = mapped_column(Text)
    expires_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    accessed_ms: Mapped[int] = mapped_column(BigInteger)
    # When the stream stops being readable (Expires-At or last access + TTL): the sweeper's key.
    expiry_ms: Mapped[int | None] = mapped_column(BigInteger, index=True)
    forked_from_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("ds_streams.id", ondelete="RESTRICT")
    )
    forked_from_path: Mapped[str | None] = mapped_column(Text)
    fork_pos: Mapped[int | None] = mapped_column(BigInteger)
    fork_sub_offset: Mapped[int | None] = mapped_column(BigInteger)
    ref_count: Mapped[int] = mapped_column(Integer, default=0)
    soft_deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class DsMessage(Base):
    """One append (one POST). `end_pos` is the byte position after it: its offset."""

    __tablename__ = "ds_messages"

    stream_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("ds_streams.id", ondelete="CASCADE"), primary_key=True
    )
    end_pos: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class DsProducer(Base):
    """Idempotent-producer state, committed in the same transaction as the append it admits."""

    __tablename__ = "ds_producers"

    stream_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("ds_streams.id", ondelete="CASCADE"), primary_key=True
    )
    producer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)


Index("ix_ds_streams_forked_from_id", DsStream.forked_from_id)


class ChatSession(Base):
    __tablename__ = "chat_sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(64), index=True)
    workspace_id: Mapped[str | None] = mapped_column(String(64))
    title: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(64))
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0))
    # Cost reserved by running generations, so concurrent spend cannot pass the budget.
    reserved_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0))
    budget_usd: Mapped[Decimal | None] = mapped_column(USD)
    # At most one generation runs per session; set and cleared atomically.
    active_generation_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ChatMessage(Base):
    __tablename__ = "chat_messages"
    __table_args__ = (
        UniqueConstraint("session_id", "client_message_id", name="uq_chat_messages_client_id"),
    )

    # A fork shares its source's stream records, message ids included: ids are per session.
    session_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("chat_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Order within the session (created_at can tie).
    ordinal: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    # Plain text of the message, for search and for building the next request.
    content: Mapped[str] = mapped_column(Text, default="")
    parts: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="complete")
    client_message_id: Mapped[str | None] = mapped_column(String(128))
    generation_id: Mapped[str | None] = mapped_column(String(36))
    # Stream offset after this message's record, returned again on an idempotent retry.
    stream_offset: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# The columns GET /v1/usage sums, carried in its index so it never reads the table.
USAGE_SUMMED = [
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cost_usd",
    "error_code",
]


class Generation(Base):
    """One assistant turn (possibly several upstream calls in a tool loop): usage and cost.

    Never deleted with its session: usage and cost rows outlive the chat."""

    __tablename__ = "generations"
    __table_args__ = (
        # A member's usage: one user's rows over a time range.
        Index("ix_generations_user_started", "user_id", "started_at"),
        # Usage over a time range, read from the index alone: model and TTFT in the key (also
        # on SQLite), the summed columns carried along on Postgres. Migration 0005 also adds
        # planner statistics for the time buckets.
        Index(
            "ix_generations_started_model_ttft",
            "started_at",
            "model",
            "ttft_ms",
            postgresql_include=USAGE_SUMMED,
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(36), index=True)
    user_id: Mapped[str | None] = mapped_column(String(64))
    user_message_id: Mapped[str | None] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_5m_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_1h_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0))
    reserved_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0))
    upstream_calls: Mapped[int] = mapped_column(Integer, default=0)
    ttft_ms: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    ratelimit: Mapped[dict[str, str] | None] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# The generation columns the usage rollup aggregates. Migration 0006's triggers mark an hour
# stale when one of them changes; a column added to the rollup must be added to them too.
USAGE_ROLLED_UP = ["started_at", "model", *USAGE_SUMMED, "ttft_ms"]


class UsageRollup(Base):
    """One closed UTC hour of one model's generations, summed (streams_service/ops/rollup.py).

    Exact: `ttfts` holds every TTFT of the hour (sorted, 32-bit little-endian), so percentiles
    over any set of hours are the same numbers the generation rows give. An hour is only read
    from here while no `usage_rollup_dirty` row names it."""

    __tablename__ = "usage_rollup"

    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    generations: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger)
    # 5-minute and 1-hour cache writes together, as GET /v1/usage reports them.
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger)
    # Whole micro-dollars: exact on SQLite too, where NUMERIC is a float.
    cost_micro_usd: Mapped[int] = mapped_column(BigInteger)
    ttfts: Mapped[bytes] = mapped_column(LargeBinary)


class UsageRollupDirty(Base):
    """An hour whose generation rows changed since it was rolled up (or never was). Written by
    triggers on `generations` in the same transaction as the change; removed by the sweeper
    once it has rebuilt the hour. One row per writing statement: never updated in place, so
    writers never wait on each other for it."""

    __tablename__ = "usage_rollup_dirty"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class User(Base):
    """A member of staff. Provisioned on first sight from the console's JWT or by the CLI."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Stored lower-cased: one person, one row, whatever the identity provider's casing.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16), default="member")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Daily spending cap in USD; NULL falls back to USER_DAILY_BUDGET_USD.
    daily_budget_usd: Mapped[Decimal | None] = mapped_column(USD)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiToken(Base):
    """A personal API token. Only its SHA-256 is stored; the token is shown once at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str | None] = mapped_column(Text)
    # The first characters of the token, shown in lists so people can tell tokens apart.
    prefix: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEntry(Base):
    """Who did what to whom: renames, deletes, restores, purges, role and token changes."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor_id: Mapped[str | None] = mapped_column(String(64))
    actor_email: Mapped[str | None] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(64))
    # Before/after values (titles, roles); never message text or secrets.
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ErrorEvent(Base):
    """A failure worth showing ops: generation errors, upstream faults, unhandled exceptions."""

    __tablename__ = "error_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The code the UI explains: rate_limited, overloaded, upstream_cut, internal, ...
    type: Mapped[str] = mapped_column(String(32))
    session_id: Mapped[str | None] = mapped_column(String(36), index=True)
    generation_id: Mapped[str | None] = mapped_column(String(36))
    user_id: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(64))
    # Our own explanation or the upstream's error message; never the user's text.
    message: Mapped[str | None] = mapped_column(Text)


class RateLimitEvent(Base):
    """One request rejected by a rate limit (the dashboard's rejections over time)."""

    __tablename__ = "rate_limit_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # session_create, message_send, auth_failure, ...
    limit_name: Mapped[str] = mapped_column(String(32))
    # What the window is keyed on: a user id, session id or client address.
    key: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str | None] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(36))

"""Typed SQLAlchemy models. One schema for Postgres and SQLite, created by Alembic."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY; Postgres gets a real BIGINT identity.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


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

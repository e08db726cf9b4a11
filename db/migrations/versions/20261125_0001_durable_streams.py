"""Durable Streams storage: streams, their appends, idempotent-producer state.

Revision ID: 20261125_0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261125_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ds_streams",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("tail", sa.BigInteger(), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False),
        sa.Column("closed_by_producer", sa.Text(), nullable=True),
        sa.Column("closed_by_epoch", sa.BigInteger(), nullable=True),
        sa.Column("closed_by_seq", sa.BigInteger(), nullable=True),
        sa.Column("last_stream_seq", sa.Text(), nullable=True),
        sa.Column("ttl_seconds", sa.BigInteger(), nullable=True),
        sa.Column("expires_at_raw", sa.Text(), nullable=True),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("accessed_ms", sa.BigInteger(), nullable=False),
        sa.Column("expiry_ms", sa.BigInteger(), nullable=True),
        sa.Column(
            "forked_from_id",
            sa.BigInteger(),
            sa.ForeignKey("ds_streams.id", ondelete="RESTRICT"),
            nullable=True,
        ),
        sa.Column("forked_from_path", sa.Text(), nullable=True),
        sa.Column("fork_pos", sa.BigInteger(), nullable=True),
        sa.Column("fork_sub_offset", sa.BigInteger(), nullable=True),
        sa.Column("ref_count", sa.Integer(), nullable=False),
        sa.Column("soft_deleted", sa.Boolean(), nullable=False),
        sa.UniqueConstraint("path", name="uq_ds_streams_path"),
    )
    op.create_index("ix_ds_streams_expiry_ms", "ds_streams", ["expiry_ms"])
    op.create_index("ix_ds_streams_forked_from_id", "ds_streams", ["forked_from_id"])
    op.create_table(
        "ds_messages",
        sa.Column(
            "stream_id",
            sa.BigInteger(),
            sa.ForeignKey("ds_streams.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("end_pos", sa.BigInteger(), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "ds_producers",
        sa.Column(
            "stream_id",
            sa.BigInteger(),
            sa.ForeignKey("ds_streams.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("producer_id", sa.Text(), primary_key=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ds_producers")
    op.drop_table("ds_messages")
    op.drop_index("ix_ds_streams_forked_from_id", table_name="ds_streams")
    op.drop_index("ix_ds_streams_expiry_ms", table_name="ds_streams")
    op.drop_table("ds_streams")

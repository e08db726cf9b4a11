"""Users, API tokens, the audit log, error events and rate-limit rejections.

Revision ID: 20261126_0003
Revises: 20261125_0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261126_0003"
down_revision: str | None = "20261125_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
USD = sa.Numeric(14, 6)
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("email", sa.String(320), nullable=False, unique=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("role", sa.String(16), nullable=False, server_default="member"),
        sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("daily_budget_usd", USD, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=True),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "user_id",
            sa.String(64),
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor_id", sa.String(64), nullable=True),
        sa.Column("actor_email", sa.String(320), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=False),
        sa.Column("target_id", sa.String(64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_table(
        "error_events",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("session_id", sa.String(36), nullable=True),
        sa.Column("generation_id", sa.String(36), nullable=True),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
    )
    op.create_index("ix_error_events_at", "error_events", ["at"])
    op.create_index("ix_error_events_session_id", "error_events", ["session_id"])
    op.create_table(
        "rate_limit_events",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("limit_name", sa.String(32), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("session_id", sa.String(36), nullable=True),
    )
    op.create_index("ix_rate_limit_events_at", "rate_limit_events", ["at"])


def downgrade() -> None:
    op.drop_table("rate_limit_events")
    op.drop_table("error_events")
    op.drop_table("audit_log")
    op.drop_table("api_tokens")
    op.drop_table("users")

"""Usage indexes: `GET /v1/usage` over months of generation rows stays fast.

- `ix_generations_started_model_ttft (started_at, model, ttft_ms)` replaces the plain
  `started_at` index: the range scan of every usage query. On Postgres it also INCLUDEs the
  summed columns, so both usage statements are index-only scans that never touch the table
  (the TTFT percentile scan is covered on SQLite too).
- `ix_generations_user_started (user_id, started_at)` replaces the plain `user_id` index: a
  member's usage is one user's rows over a time range.
- Postgres only: extended statistics on the UTC day and hour buckets (the `date_bin`
  expressions in streams_service/ops/usage.py, which must stay identical), model, user and
  session. Without them the planner takes every row for its own group, sorts them all and
  never runs the aggregate in parallel; with them it hashes into the few real groups.
  (Expressions in statistics need Postgres 14, as `date_bin` does.)

Revision ID: 20261126_0005
Revises: 20261126_0004
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261126_0005"
down_revision: str | None = "20261126_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A copy of db.models.USAGE_SUMMED as of this revision (migrations never import the models).
SUMMED = [
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cost_usd",
    "error_code",
]
DAY = "date_bin(INTERVAL '1 day', started_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
HOUR = "date_bin(INTERVAL '1 hour', started_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')"


def upgrade() -> None:
    op.create_index(
        "ix_generations_started_model_ttft",
        "generations",
        ["started_at", "model", "ttft_ms"],
        postgresql_include=SUMMED,
    )
    op.drop_index("ix_generations_started_at", table_name="generations")
    op.create_index("ix_generations_user_started", "generations", ["user_id", "started_at"])
    op.drop_index("ix_generations_user_id", table_name="generations")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"CREATE STATISTICS generations_usage_stats (ndistinct) "
            f"ON ({DAY}), ({HOUR}), model, user_id, session_id FROM generations"
        )
        op.execute("ANALYZE generations")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP STATISTICS IF EXISTS generations_usage_stats")
    op.create_index("ix_generations_user_id", "generations", ["user_id"])
    op.drop_index("ix_generations_user_started", table_name="generations")
    op.create_index("ix_generations_started_at", "generations", ["started_at"])
    op.drop_index("ix_generations_started_model_ttft", table_name="generations")

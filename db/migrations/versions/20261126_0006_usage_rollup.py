"""Usage rollup: `GET /v1/usage` reads closed hours from a summary, not every generation row.

- `usage_rollup (hour, model)`: per UTC hour and model, the sums `GET /v1/usage` reports and
  every TTFT of the hour (sorted int32, little-endian), so percentiles stay exact.
- `usage_rollup_dirty (id, hour)`: hours whose generation rows changed since they were rolled
  up. Triggers on `generations` add a row in the same transaction as the change (insert,
  delete, or an update of a rolled-up column: db.models.USAGE_ROLLED_UP); the sweeper in
  streams_service/ops/rollup.py rebuilds those hours and removes exactly the rows it saw.
  Readers take an hour from the rollup only while no dirty row names it.
- Every hour that already has generation rows is marked dirty here, so the sweeper builds the
  rollup of an existing history in the background (reads stay exact meanwhile: dirty hours
  are read from `generations`).

Postgres: one statement-level trigger per event with transition tables, so a bulk load (COPY)
marks each hour it touched once rather than once per row; `ENABLE ALWAYS`, so loads that turn
ordinary triggers off (`session_replication_role = replica`, as benchmarks/history.py does for
foreign keys) still mark their hours. TRUNCATE of generations empties the rollup. SQLite:
row-level triggers (one writer; a marker per row is cheap there). The hour expressions must
stay identical to streams_service/ops/rollup.py's: `date_bin` (no time-zone lookups) on
Postgres, and on SQLite the text SQLAlchemy itself stores for a UTC datetime.

Caveat (SQLite): a later batch migration that rebuilds `generations` drops these triggers; it
must recreate them (and should mark every hour dirty again, as `upgrade` does).

Revision ID: 20261126_0006
Revises: 20261126_0005
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261126_0006"
down_revision: str | None = "20261126_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# The hour of a generation row is the one streams_service/ops/usage.py computes. The rolled-up
# columns (db.models.USAGE_ROLLED_UP as of this revision; migrations never import the models)
# are written out in the update triggers below.

# The history so far: every hour that has rows is marked, and the first sweeps roll it up.
PG_BACKFILL = """
    INSERT INTO usage_rollup_dirty (hour)
    SELECT DISTINCT date_bin(INTERVAL '1 hour', started_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')
    FROM generations"""
SQLITE_BACKFILL = """
    INSERT INTO usage_rollup_dirty (hour)
    SELECT DISTINCT strftime('%Y-%m-%d %H:00:00.000000', started_at) FROM generations"""

PG_FUNCTIONS = {
    "usage_rollup_mark": """
        CREATE FUNCTION usage_rollup_mark() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO usage_rollup_dirty (hour)
                SELECT DISTINCT date_bin(INTERVAL '1 hour', started_at,
                                         TIMESTAMPTZ '2000-01-01 00:00:00+00')
                FROM new_rows;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO usage_rollup_dirty (hour)
                SELECT DISTINCT date_bin(INTERVAL '1 hour', started_at,
                                         TIMESTAMPTZ '2000-01-01 00:00:00+00')
                FROM old_rows;
            ELSE
                -- Heartbeats and other writes that leave the rolled-up columns alone mark
                -- nothing; a changed start marks the hour it left and the one it joined.
                INSERT INTO usage_rollup_dirty (hour)
                SELECT DISTINCT date_bin(INTERVAL '1 hour', h.started_at,
                                         TIMESTAMPTZ '2000-01-01 00:00:00+00')
                FROM old_rows o
                JOIN new_rows n ON n.id = o.id
                CROSS JOIN LATERAL (VALUES (o.started_at), (n.started_at)) AS h (started_at)
                WHERE (o.started_at, o.model, o.input_tokens, o.output_tokens,
                       o.cache_read_tokens, o.cache_write_5m_tokens, o.cache_write_1h_tokens,
                       o.cost_usd, o.error_code, o.ttft_ms)
                      IS DISTINCT FROM
                      (n.started_at, n.model, n.input_tokens, n.output_tokens,
                       n.cache_read_tokens, n.cache_write_5m_tokens, n.cache_write_1h_tokens,
                       n.cost_usd, n.error_code, n.ttft_ms);
            END IF;
            RETURN NULL;
        END $$""",
    "usage_rollup_reset": """
        CREATE FUNCTION usage_rollup_reset() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM usage_rollup;
            DELETE FROM usage_rollup_dirty;
            RETURN NULL;
        END $$""",
}
PG_TRIGGERS = {
    "usage_rollup_ins": "AFTER INSERT ON generations REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup_mark()",
    "usage_rollup_upd": "AFTER UPDATE ON generations "
    "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup_mark()",
    "usage_rollup_del": "AFTER DELETE ON generations REFERENCING OLD TABLE AS old_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup_mark()",
    "usage_rollup_trunc": "AFTER TRUNCATE ON generations "
    "FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup_reset()",
}
SQLITE_TRIGGERS = {
    "usage_rollup_ins": """
        CREATE TRIGGER usage_rollup_ins AFTER INSERT ON generations BEGIN
            INSERT INTO usage_rollup_dirty (hour)
            VALUES (strftime('%Y-%m-%d %H:00:00.000000', new.started_at));
        END""",
    "usage_rollup_upd": """
        CREATE TRIGGER usage_rollup_upd AFTER UPDATE ON generations
        WHEN old.started_at IS NOT new.started_at OR old.model IS NOT new.model
            OR old.input_tokens IS NOT new.input_tokens
            OR old.output_tokens IS NOT new.output_tokens
            OR old.cache_read_tokens IS NOT new.cache_read_tokens
            OR old.cache_write_5m_tokens IS NOT new.cache_write_5m_tokens
            OR old.cache_write_1h_tokens IS NOT new.cache_write_1h_tokens
            OR old.cost_usd IS NOT new.cost_usd OR old.error_code IS NOT new.error_code
            OR old.ttft_ms IS NOT new.ttft_ms
        BEGIN
            INSERT INTO usage_rollup_dirty (hour)
            SELECT strftime('%Y-%m-%d %H:00:00.000000', old.started_at)
            UNION SELECT strftime('%Y-%m-%d %H:00:00.000000', new.started_at);
        END""",
    "usage_rollup_del": """
        CREATE TRIGGER usage_rollup_del AFTER DELETE ON generations BEGIN
            INSERT INTO usage_rollup_dirty (hour)
            VALUES (strftime('%Y-%m-%d %H:00:00.000000', old.started_at));
        END""",
}


def upgrade() -> None:
    op.create_table(
        "usage_rollup",
        sa.Column("hour", TS, primary_key=True),
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("generations", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micro_usd", sa.BigInteger(), nullable=False),
        sa.Column("ttfts", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "usage_rollup_dirty",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("hour", TS, nullable=False),
    )
    op.create_index("ix_usage_rollup_dirty_hour", "usage_rollup_dirty", ["hour"])
    if op.get_bind().dialect.name == "postgresql":
        for ddl in PG_FUNCTIONS.values():
            op.execute(ddl)
        for name, body in PG_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {body}")
            op.execute(f"ALTER TABLE generations ENABLE ALWAYS TRIGGER {name}")
        op.execute(PG_BACKFILL)
    else:
        for ddl in SQLITE_TRIGGERS.values():
            op.execute(ddl)
        op.execute(SQLITE_BACKFILL)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in PG_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON generations")
        for name in PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index("ix_usage_rollup_dirty_hour", table_name="usage_rollup_dirty")
    op.drop_table("usage_rollup_dirty")
    op.drop_table("usage_rollup")

"""Migration 0006 (usage rollup): an existing history is marked for the sweeper, the triggers
mark what later writes touch (bulk loads that turn triggers off included, on Postgres), and
the migration unwinds."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session

from db.engine import sync_url
from db.migrate import alembic_config, upgrade
from db.models import USAGE_ROLLED_UP, Generation, UsageRollup, UsageRollupDirty
from tests.support import postgres_database

BEFORE = "20261126_0005"
AT = datetime(2003, 5, 17, 22, 40, tzinfo=UTC)
MIDNIGHT = datetime(2003, 5, 18, tzinfo=UTC)
COPY = (
    "COPY generations (id, session_id, message_id, model, simulated, status, started_at, "
    "input_tokens, output_tokens, cache_read_tokens, cache_write_5m_tokens, "
    "cache_write_1h_tokens, cost_usd, reserved_usd, upstream_calls) FROM STDIN"
)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rollup.db'}"
        return
    with postgres_database() as url:
        yield url


def _generation(at: datetime, **extra: object) -> Generation:
    return Generation(
        id=str(uuid.uuid4()),
        session_id="s",
        message_id="m",
        model="claude-haiku-5-5",
        status="completed",
        ttft_ms=300,
        started_at=at,
        **extra,
    )


def _dirty(engine: sa.Engine) -> list[datetime]:
    """Every dirty row's hour, repeats included."""
    with Session(engine) as db:
        return sorted(db.execute(sa.select(UsageRollupDirty.hour)).scalars())


def test_upgrade_marks_the_existing_history_and_downgrade_unwinds(database: str) -> None:
    upgrade(database, BEFORE)
    engine = sa.create_engine(sync_url(database))
    try:
        times = [AT, AT + timedelta(minutes=19, seconds=59), AT + timedelta(hours=1, minutes=25)]
        with Session(engine) as db, db.begin():
            db.add_all(_generation(at) for at in times)
        upgrade(database)
        # Each hour with rows once, written in the format the app binds (SQLite compares text).
        assert _dirty(engine) == [AT.replace(minute=0), MIDNIGHT]
        with Session(engine) as db:
            assert (
                db.scalar(
                    sa.select(sa.func.count())
                    .select_from(UsageRollupDirty)
                    .where(UsageRollupDirty.hour == MIDNIGHT)
                )
                == 1
            )
        # A heartbeat marks nothing; a finished generation marks its hour.
        with Session(engine) as db, db.begin():
            db.execute(sa.delete(UsageRollupDirty))
            db.execute(sa.update(Generation).values(heartbeat_at=datetime.now(UTC)))
        assert _dirty(engine) == []
        with Session(engine) as db, db.begin():
            db.execute(
                sa.update(Generation).where(Generation.started_at == AT).values(output_tokens=5)
            )
        assert _dirty(engine) == [AT.replace(minute=0)]
        command.downgrade(alembic_config(database), BEFORE)
        inspector = sa.inspect(engine)
        assert not {"usage_rollup", "usage_rollup_dirty"} & set(inspector.get_table_names())
        # The triggers went with the tables: writes to generations still work.
        with Session(engine) as db, db.begin():
            db.add(_generation(AT + timedelta(days=1)))
        upgrade(database)
        assert len(_dirty(engine)) == 3
    finally:
        engine.dispose()


CHANGED: dict[str, object] = {
    "started_at": AT + timedelta(minutes=1),
    "model": "another-model",
    "input_tokens": 1,
    "output_tokens": 1,
    "cache_read_tokens": 1,
    "cache_write_5m_tokens": 1,
    "cache_write_1h_tokens": 1,
    "cost_usd": Decimal("0.000001"),
    "error_code": "overloaded",
    "ttft_ms": 301,
}
UNCOUNTED: dict[str, object] = {
    "heartbeat_at": AT,
    "owner": "replica-2",
    "status": "error",
    "finished_at": AT,
    "duration_ms": 5,
    "ratelimit": {"anthropic-ratelimit-requests-remaining": "9"},
}


def test_exactly_the_rolled_up_columns_mark_their_hour(database: str) -> None:
    upgrade(database)
    engine = sa.create_engine(sync_url(database))
    try:
        assert set(CHANGED) == set(USAGE_ROLLED_UP)
        row = _generation(AT)
        row_id = row.id
        with Session(engine) as db, db.begin():
            db.add(row)
        for column, value in {**CHANGED, **UNCOUNTED}.items():
            with Session(engine) as db, db.begin():
                db.execute(sa.delete(UsageRollupDirty))
                db.execute(
                    sa.update(Generation).where(Generation.id == row_id).values({column: value})
                )
            expected = [AT.replace(minute=0)] if column in CHANGED else []
            assert _dirty(engine) == expected, column
            # Writing the same value again is no change.
            with Session(engine) as db, db.begin():
                db.execute(
                    sa.update(Generation).where(Generation.id == row_id).values({column: value})
                )
            assert _dirty(engine) == expected, column
    finally:
        engine.dispose()


def test_postgres_bulk_loads_mark_their_hours_once_and_truncate_empties_the_rollup() -> None:
    with postgres_database() as url:
        upgrade(url)
        engine = sa.create_engine(sync_url(url))
        try:
            with psycopg.connect(url) as conn, conn.cursor() as cur:
                # As benchmarks/history.py loads: ordinary triggers off (foreign keys), COPY.
                cur.execute("SET session_replication_role = replica")
                with cur.copy(COPY) as copy:
                    for minutes in range(0, 120, 7):  # 22:40 to 00:39
                        at = AT + timedelta(minutes=minutes)
                        copy.write_row(
                            (str(uuid.uuid4()), "s", "m", "x", False, "done", at, *[0] * 8)
                        )
            assert _dirty(engine) == [AT.replace(minute=0), AT.replace(hour=23, minute=0), MIDNIGHT]
            with Session(engine) as db, db.begin():
                db.execute(
                    sa.insert(UsageRollup).values(
                        hour=AT.replace(minute=0),
                        model="m",
                        generations=1,
                        errors=0,
                        input_tokens=0,
                        output_tokens=0,
                        cache_read_tokens=0,
                        cache_write_tokens=0,
                        cost_micro_usd=0,
                        ttfts=b"",
                    )
                )
            with engine.begin() as sa_conn:
                sa_conn.execute(sa.text("TRUNCATE generations"))
            with Session(engine) as db:
                assert db.scalar(sa.select(sa.func.count()).select_from(UsageRollup)) == 0
            assert _dirty(engine) == []
        finally:
            engine.dispose()

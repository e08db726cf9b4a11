"""The migrations build exactly the schema the models describe, and unwind cleanly."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from db.engine import sync_url
from db.migrate import alembic_config, upgrade
from db.models import Base
from tests.support import postgres_database


def _diff(url: str) -> list[Any]:
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": False}
            )
            diffs = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    # Indexes the migrations add beyond the models (full-text search, partial indexes) are
    # expected, and so are SQLite's FTS5 search tables (with their shadow tables); anything
    # else — tables, columns, types, model indexes — is drift.
    return [
        d
        for d in diffs
        if not (isinstance(d, tuple) and (d[0] == "remove_index" or _is_fts_table(d)))
    ]


FTS_TABLES = ("chat_messages_fts", "chat_sessions_fts")


def _is_fts_table(diff: tuple[Any, ...]) -> bool:
    if diff[0] != "remove_table":
        return False
    name: str = diff[1].name
    return any(name == t or name.startswith(f"{t}_") for t in FTS_TABLES)


def test_postgres_schema_matches_the_models() -> None:
    with postgres_database() as url:
        upgrade(url)
        assert _diff(url) == []
        command.downgrade(alembic_config(url), "base")
        engine = sa.create_engine(sync_url(url))
        try:
            names = set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()
        assert names <= {"alembic_version"}


def test_sqlite_schema_matches_the_models(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    assert _diff(url) == []

"""History: keyset-pagination indexes and full-text search over titles and message bodies.

Postgres gets GIN indexes on `to_tsvector('english', ...)` expressions (no new columns, so the
models stay the schema's description). SQLite gets FTS5 tables kept current by triggers:
`chat_messages_fts(body, session_id UNINDEXED)` keyed by chat_messages' rowid, and
`chat_sessions_fts(title, session_id UNINDEXED)` keyed by chat_sessions' rowid. The search
queries in streams_service/sessions/history_repo.py must use exactly these expressions.

Caveat (SQLite): a later batch migration that rebuilds chat_messages or chat_sessions drops
these triggers and renumbers rowids; such a migration must recreate them and rebuild the FTS
tables (`_sqlite_fts_rebuild` below shows how).

Revision ID: 20261126_0004
Revises: 20261126_0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261126_0004"
down_revision: str | None = "20261126_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Keyset pagination runs newest first on (created_at, id); live and trashed sessions are
# listed apart, so the live indexes leave the trash out and the trash has small ones of its own.
LIVE = "deleted_at IS NULL"


def _btree_indexes() -> None:
    for name, columns in (
        ("ix_chat_sessions_user_created", ["user_id", "created_at", "id"]),
        ("ix_chat_sessions_created", ["created_at", "id"]),
    ):
        op.create_index(
            name,
            "chat_sessions",
            columns,
            postgresql_where=sa.text(LIVE),
            sqlite_where=sa.text(LIVE),
        )
    trash = "deleted_at IS NOT NULL"
    op.create_index(
        "ix_chat_sessions_deleted_at",
        "chat_sessions",
        ["deleted_at"],
        postgresql_where=sa.text(trash),
        sqlite_where=sa.text(trash),
    )
    ended = "ended_at IS NOT NULL"
    op.create_index(
        "ix_chat_sessions_ended_at",
        "chat_sessions",
        ["ended_at"],
        postgresql_where=sa.text(ended),
        sqlite_where=sa.text(ended),
    )


def _postgres_upgrade() -> None:
    op.execute(
        "CREATE INDEX ix_chat_messages_fts ON chat_messages "
        "USING gin (to_tsvector('english'::regconfig, content))"
    )
    op.execute(
        "CREATE INDEX ix_chat_sessions_title_fts ON chat_sessions "
        "USING gin (to_tsvector('english'::regconfig, coalesce(title, '')))"
    )


SQLITE_TRIGGERS = {
    "chat_messages_fts_ai": """
        CREATE TRIGGER chat_messages_fts_ai AFTER INSERT ON chat_messages BEGIN
            INSERT INTO chat_messages_fts(rowid, body, session_id)
            VALUES (new.rowid, new.content, new.session_id);
        END""",
    "chat_messages_fts_ad": """
        CREATE TRIGGER chat_messages_fts_ad AFTER DELETE ON chat_messages BEGIN
            DELETE FROM chat_messages_fts WHERE rowid = old.rowid;
        END""",
    "chat_messages_fts_au": """
        CREATE TRIGGER chat_messages_fts_au AFTER UPDATE OF content ON chat_messages BEGIN
            DELETE FROM chat_messages_fts WHERE rowid = old.rowid;
            INSERT INTO chat_messages_fts(rowid, body, session_id)
            VALUES (new.rowid, new.content, new.session_id);
        END""",
    "chat_sessions_fts_ai": """
        CREATE TRIGGER chat_sessions_fts_ai AFTER INSERT ON chat_sessions BEGIN
            INSERT INTO chat_sessions_fts(rowid, title, session_id)
            VALUES (new.rowid, coalesce(new.title, ''), new.id);
        END""",
    "chat_sessions_fts_ad": """
        CREATE TRIGGER chat_sessions_fts_ad AFTER DELETE ON chat_sessions BEGIN
            DELETE FROM chat_sessions_fts WHERE rowid = old.rowid;
        END""",
    "chat_sessions_fts_au": """
        CREATE TRIGGER chat_sessions_fts_au AFTER UPDATE OF title ON chat_sessions BEGIN
            DELETE FROM chat_sessions_fts WHERE rowid = old.rowid;
            INSERT INTO chat_sessions_fts(rowid, title, session_id)
            VALUES (new.rowid, coalesce(new.title, ''), new.id);
        END""",
}


def _sqlite_fts_rebuild() -> None:
    op.execute("DELETE FROM chat_messages_fts")
    op.execute(
        "INSERT INTO chat_messages_fts(rowid, body, session_id) "
        "SELECT rowid, content, session_id FROM chat_messages"
    )
    op.execute("DELETE FROM chat_sessions_fts")
    op.execute(
        "INSERT INTO chat_sessions_fts(rowid, title, session_id) "
        "SELECT rowid, coalesce(title, ''), id FROM chat_sessions"
    )


def _sqlite_upgrade() -> None:
    # Porter stemming on unicode61 words, close to Postgres' 'english' configuration.
    tokenize = "tokenize = 'porter unicode61 remove_diacritics 2'"
    for name, text_column in (("chat_messages_fts", "body"), ("chat_sessions_fts", "title")):
        op.execute(
            f"CREATE VIRTUAL TABLE {name} USING fts5({text_column}, session_id UNINDEXED, "
            f"{tokenize})"
        )
    for ddl in SQLITE_TRIGGERS.values():
        op.execute(ddl)
    _sqlite_fts_rebuild()


def upgrade() -> None:
    _btree_indexes()
    if op.get_bind().dialect.name == "postgresql":
        _postgres_upgrade()
    else:
        _sqlite_upgrade()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_chat_sessions_title_fts")
        op.execute("DROP INDEX IF EXISTS ix_chat_messages_fts")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS chat_sessions_fts")
        op.execute("DROP TABLE IF EXISTS chat_messages_fts")
    op.drop_index("ix_chat_sessions_ended_at", table_name="chat_sessions")
    op.drop_index("ix_chat_sessions_deleted_at", table_name="chat_sessions")
    op.drop_index("ix_chat_sessions_created", table_name="chat_sessions")
    op.drop_index("ix_chat_sessions_user_created", table_name="chat_sessions")

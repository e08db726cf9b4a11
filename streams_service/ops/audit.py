"""The audit trail: who renamed, deleted, restored, purged or imported what, and when.

Entries are written in the caller's transaction, so an audited change and its entry commit or
roll back together. Details hold before/after values (titles, models, counts), never message
text or secrets.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from db.models import AuditEntry
from streams_service.access.principal import Principal


async def record(
    db: AsyncSession,
    who: Principal,
    action: str,
    target_type: str,
    target_id: str | None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add one audit entry to the open transaction (flushed, not committed)."""
    entry = AuditEntry(
        at=datetime.now(UTC),
        actor_id=who.user_id,
        actor_email=who.email,
        action=action,
        target_type=target_type,
        target_id=target_id,
        detail=detail,
    )
    db.add(entry)
    await db.flush()
    return entry

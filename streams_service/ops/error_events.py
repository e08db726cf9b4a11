"""Error events for the ops dashboard (`GET /v1/errors`), written where failures happen.

A generation that ends with RUN_ERROR records one event in the transaction that persists its
end, so the event and the generation's error state commit together. The message is the
service's own explanation or the upstream's error text from `classify_error`, never the user's.
"""

from __future__ import annotations

from datetime import datetime

from db.models import ErrorEvent

MESSAGE_MAX_CHARS = 500


def generation_error(
    *,
    at: datetime,
    code: str,
    message: str | None,
    session_id: str,
    generation_id: str,
    user_id: str | None,
    model: str | None,
) -> ErrorEvent:
    """The event of one failed generation, to add to the caller's open transaction."""
    return ErrorEvent(
        at=at,
        type=code[:32],
        session_id=session_id,
        generation_id=generation_id,
        user_id=user_id,
        model=model,
        message=None if message is None else message[:MESSAGE_MAX_CHARS],
    )

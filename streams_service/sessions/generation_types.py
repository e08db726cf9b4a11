"""What more than one of the generation modules holds: a generation's spec and handle (the
manager and the runner), `cancel_quietly` (both), and INTERRUPTED_MESSAGE (a runner's
interrupted end and restart recovery say the same).

Separate so that sessions/runner.py and sessions/recovery.py can import them without a cycle:
sessions/generation.py imports the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from streams_service.llm.models import ModelInfo
from streams_service.sessions.memo import Memo


@dataclass
class GenerationSpec:
    generation_id: str
    session_id: str
    user_id: str | None
    message_id: str  # the assistant message this generation writes
    model: ModelInfo
    history: list[dict[str, Any]]  # Anthropic `messages` up to the user's turn
    stream_path: str
    budget_remaining: Decimal | None  # None: no cap
    reserved_usd: Decimal
    is_first_exchange: bool = False
    first_user_text: str = ""
    # The user message this answers, recorded with the answer.
    user_message_id: str | None = None
    # The user message's append (its stream offset), when the generation starts before it has
    # landed: the upstream call goes out at once (Claude's time to first token hides the
    # write), but nothing is written to the stream until this resolves, so the answer always
    # follows the question.
    user_appended: asyncio.Future[str] | None = None
    # A generation started before its send has read the session (from a memo, sessions/memo.py)
    # reads nothing from upstream until the send confirms the guess and has set the budget
    # fields above; abandoned instead if the guess was wrong.
    confirmed: asyncio.Future[None] | None = None
    # The conversation up to and including the user message: with the answer, once it is
    # saved, what the session's next send will read (its memo).
    memo: Memo | None = None

    @property
    def user_offset(self) -> str | None:
        """The user message's stream offset, once its append has landed."""
        appended = self.user_appended
        if appended is None or not appended.done() or appended.cancelled():
            return None
        return appended.result()


@dataclass
class Handle:
    spec: GenerationSpec
    task: asyncio.Task[None] | None = None
    inner: asyncio.Task[str] | None = None
    stop_reason: str | None = None  # "stopped" or "interrupted" once asked to end
    finishing: bool = False  # the terminal event is being written; only bookkeeping is left
    approvals: dict[str, asyncio.Future[bool]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # The session's generation this one replaced in `running` (one that was finishing), put
    # back if this one is abandoned while that one still runs.
    displaced: Handle | None = None


async def cancel_quietly(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


INTERRUPTED_MESSAGE = "The service restarted during this answer; it is kept as far as it got."

"""What this process last saw of each session's conversation, so a send can call Claude first.

A send must read the session (locked) and its messages before it can build the upstream
request, and that read is a database round trip on a loop that may be busy. When this process
ran the session's previous exchange it already knows what the read will return: the messages
the previous send read, its user message, and the answer its generation saved. The send then
starts the upstream request from that guess at once and checks it against the locked read; a
guess that does not match (another replica wrote to the session, it was regenerated, ended or
deleted) is abandoned before Claude has produced a token and the send goes on as without one.
A memo is used once: a send takes it, and only a finished answer leaves the next one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

# Sessions remembered per process (least recently finished forgotten first) and the longest
# conversation remembered: a memo costs memory as long as the conversation it holds.
MEMO_SESSIONS = 1000
MEMO_MAX_MESSAGES = 200


class StoredRow(NamedTuple):
    """A message as a send's history read returns it (conversation.StoredMessage)."""

    role: str
    content: str
    parts: list[dict[str, Any]]
    status: str
    ordinal: int


@dataclass(frozen=True)
class Memo:
    user_id: str | None  # the session's owner, as the previous send's caller
    model: str  # the session's model column
    rows: tuple[Any, ...]  # every message the next send will read, in order
    client_message_id: str | None  # the previous send's: a retry of it is not a new message


class Memos:
    def __init__(self, capacity: int = MEMO_SESSIONS) -> None:
        self._capacity = capacity
        self._memos: OrderedDict[str, Memo] = OrderedDict()

    def put(self, session_id: str, memo: Memo) -> None:
        if len(memo.rows) > MEMO_MAX_MESSAGES:
            self._memos.pop(session_id, None)
            return
        self._memos[session_id] = memo
        self._memos.move_to_end(session_id)
        while len(self._memos) > self._capacity:
            self._memos.popitem(last=False)

    def take(self, session_id: str, usable: Callable[[Memo], bool] = lambda _: True) -> Memo | None:
        """The session's memo, forgotten here, if there is one and `usable` says so; one that
        is not usable by this caller (another user's send) stays for the owner."""
        memo = self._memos.get(session_id)
        if memo is None or not usable(memo):
            return None
        del self._memos[session_id]
        return memo

    def __len__(self) -> int:
        return len(self._memos)

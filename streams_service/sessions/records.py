"""Records on a session stream (DESIGN §2): State-Protocol change events.

`chunk` rows carry AG-UI events (or a user's whole message) as a JSON *string* in `value.chunk`,
keyed `<messageId>:<seq>`, compatible with the open-source durable-session clients; a `session`
row (upsert) carries metadata changes so open tabs update live.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from streams_service import jsoncodec
from streams_service.durable.model import AppendRequest, Producer


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


# The formatted second `now_iso` last used: (Unix second, "YYYY-MM-DDTHH:MM:SS").
_second: tuple[int, str] = (0, "")


def now_iso() -> str:
    """`iso(datetime.now(UTC))` with microseconds always written, for a timestamp per write:
    the date and time are formatted once a second, not per call (1.5 µs here instead of 4)."""
    global _second
    now = time.time()
    second = int(now)
    if _second[0] != second:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second[1]}.{int((now - second) * 1_000_000):06d}Z"


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """An AG-UI event; every one carries a millisecond timestamp (Unix epoch, so UTC). Made
    once per token: `time.time()`, not a datetime object each time."""
    return {"type": kind, "timestamp": int(time.time() * 1000), **fields}


def chunk_record(
    *,
    message_id: str,
    actor_id: str,
    role: str,
    seq: int,
    chunk: dict[str, Any],
    created_at: str,
    txid: str | None = None,
) -> dict[str, Any]:
    headers: dict[str, Any] = {"operation": "insert"}
    if txid is not None:
        headers["txid"] = txid
    return {
        "type": "chunk",
        "key": f"{message_id}:{seq}",
        "value": {
            "messageId": message_id,
            "actorId": actor_id,
            "role": role,
            "chunk": jsoncodec.dumps_str(chunk),
            "seq": seq,
            "createdAt": created_at,
        },
        "headers": headers,
    }


def user_message_record(
    *,
    message_id: str,
    actor_id: str,
    parts: list[dict[str, Any]],
    created_at: str,
    txid: str | None = None,
) -> dict[str, Any]:
    message = {"id": message_id, "role": "user", "parts": parts, "createdAt": created_at}
    return chunk_record(
        message_id=message_id,
        actor_id=actor_id,
        role="user",
        seq=0,
        chunk={"type": "whole-message", "message": message},
        created_at=created_at,
        txid=txid,
    )


def session_record(session_id: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "session",
        "key": session_id,
        "value": {"sessionId": session_id, **value},
        "headers": {"operation": "upsert"},
    }


def encode(records: list[dict[str, Any]]) -> bytes:
    """One append of several records: a JSON array is stored as that many stream messages."""
    return jsoncodec.dumps(records)


def append(records: list[dict[str, Any]], producer: Producer | None = None) -> AppendRequest:
    """The append of these records to a session stream. Encoded here, so the store need not
    parse the body again to validate it."""
    return AppendRequest(
        body=encode(records), content_type="application/json", producer=producer, encoded_json=True
    )

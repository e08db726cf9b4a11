"""Value types of the stream engine: stream state, requests, outcomes, JSON-mode encoding."""

from __future__ import annotations

import functools
import json
import operator
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from streams_service.errors import BadRequest, Gone, NotFound

JSON_TYPE = "application/json"
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def now_ms() -> int:
    return int(time.time() * 1000)


@functools.lru_cache(maxsize=256)
def media_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json` (case-insensitive comparison).
    Cached: every SSE event asks it of its stream's content type, and streams share a few."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    return media_type(content_type) == JSON_TYPE


def is_text_like(content_type: str | None) -> bool:
    mt = media_type(content_type)
    return mt.startswith("text/") or mt == JSON_TYPE


class Availability(Enum):
    LIVE = "live"
    GONE = "gone"  # soft-deleted (or expired while forks still read through it): 410
    MISSING = "missing"  # never existed or expired: 404


@dataclass(slots=True)
class StreamState:
    id: int
    path: str
    content_type: str
    tail: int
    closed: bool
    closed_by: tuple[str, int, int] | None
    last_stream_seq: str | None
    ttl_seconds: int | None
    expires_at_raw: str | None
    expires_at_ms: int | None
    created_ms: int
    accessed_ms: int
    forked_from_id: int | None
    forked_from_path: str | None
    fork_pos: int | None
    fork_sub_offset: int | None
    ref_count: int
    soft_deleted: bool

    @classmethod
    def from_row(cls, row: Any) -> StreamState:
        closed_by = None
        if row.closed_by_producer is not None:
            closed_by = (row.closed_by_producer, int(row.closed_by_epoch), int(row.closed_by_seq))
        return cls(
            id=row.id,
            path=row.path,
            content_type=row.content_type,
            tail=row.tail,
            closed=bool(row.closed),
            closed_by=closed_by,
            last_stream_seq=row.last_stream_seq,
            ttl_seconds=row.ttl_seconds,
            expires_at_raw=row.expires_at_raw,
            expires_at_ms=row.expires_at_ms,
            created_ms=row.created_ms,
            accessed_ms=row.accessed_ms,
            forked_from_id=row.forked_from_id,
            forked_from_path=row.forked_from_path,
            fork_pos=row.fork_pos,
            fork_sub_offset=row.fork_sub_offset,
            ref_count=row.ref_count,
            soft_deleted=bool(row.soft_deleted),
        )

    def copy(self) -> StreamState:
        """A copy to stage on (its fields are all immutable values). `dataclasses.replace`
        passes every field by keyword: ~3 µs a copy against ~0.6 here, and the stream writer
        copies each stream of a batch (hundreds at 500 generations) holding the GIL."""
        return StreamState(*_STATE_FIELDS(self))

    def expiry_ms(self) -> int | None:
        """When the stream stops being readable: Expires-At, or last access + TTL (sliding)."""
        candidates = []
        if self.expires_at_ms is not None:
            candidates.append(self.expires_at_ms)
        if self.ttl_seconds is not None:
            candidates.append(self.accessed_ms + self.ttl_seconds * 1000)
        return min(candidates) if candidates else None

    def expired(self, now: int) -> bool:
        expiry = self.expiry_ms()
        return expiry is not None and now >= expiry

    def availability(self, now: int) -> Availability:
        if self.soft_deleted:
            return Availability.GONE
        if self.expired(now):
            # An expired stream that forks still read through lingers as soft-deleted.
            return Availability.GONE if self.ref_count > 0 else Availability.MISSING
        return Availability.LIVE

    def touch(self, now: int) -> None:
        self.accessed_ms = now

    def row_values(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "content_type": self.content_type,
            "tail": self.tail,
            "closed": self.closed,
            "closed_by_producer": self.closed_by[0] if self.closed_by else None,
            "closed_by_epoch": self.closed_by[1] if self.closed_by else None,
            "closed_by_seq": self.closed_by[2] if self.closed_by else None,
            "last_stream_seq": self.last_stream_seq,
            "ttl_seconds": self.ttl_seconds,
            "expires_at_raw": self.expires_at_raw,
            "expires_at_ms": self.expires_at_ms,
            "created_ms": self.created_ms,
            "accessed_ms": self.accessed_ms,
            "expiry_ms": self.expiry_ms(),
            "forked_from_id": self.forked_from_id,
            "forked_from_path": self.forked_from_path,
            "fork_pos": self.fork_pos,
            "fork_sub_offset": self.fork_sub_offset,
            "ref_count": self.ref_count,
            "soft_deleted": self.soft_deleted,
        }


# Every field of StreamState, in its constructor's order (StreamState.copy).
_STATE_FIELDS = operator.attrgetter(*(f.name for f in fields(StreamState)))


def missing(path: str) -> NotFound:
    return NotFound(f"stream {path!r} does not exist")


def gone(path: str) -> Gone:
    return Gone(f"stream {path!r} was deleted; its forks still hold its data")


def check_live(state: StreamState | None, path: str, now: int) -> StreamState:
    """The stream if it can be read and written: 404 when missing or expired, 410 when gone."""
    if state is None:
        raise missing(path)
    availability = state.availability(now)
    if availability is Availability.MISSING:
        raise missing(path)
    if availability is Availability.GONE:
        raise gone(path)
    return state


@dataclass(frozen=True, slots=True)
class Producer:
    id: str
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class CreateRequest:
    content_type: str | None  # None: a fork inherits its source's type
    ttl_seconds: int | None = None
    expires_at_raw: str | None = None
    expires_at_ms: int | None = None
    body: bytes = b""
    closed: bool = False
    forked_from: str | None = None
    fork_pos: int | None = None
    fork_sub_offset: int | None = None


@dataclass(frozen=True, slots=True)
class CreateOutcome:
    created: bool
    state: StreamState


@dataclass(frozen=True, slots=True)
class AppendRequest:
    body: bytes | None  # None: close-only
    content_type: str | None = None
    stream_seq: str | None = None
    producer: Producer | None = None
    close: bool = False
    # The body is a non-empty JSON array this process encoded itself (sessions/records.py), so
    # a JSON stream stores its values without parsing it again: the session hot path. Never set
    # from a request: a client's body is always validated.
    encoded_json: bool = False


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    status: int  # 200 (producer accepted) or 204
    next_offset_pos: int | None
    closed: bool = False
    producer_epoch: int | None = None
    producer_seq: int | None = None


@dataclass(slots=True)
class ReadResult:
    state: StreamState
    chunks: list[tuple[int, bytes]] = field(default_factory=list)  # (end position, stored bytes)
    next_pos: int = 0
    up_to_date: bool = True

    @property
    def at_closed_tail(self) -> bool:
        return self.state.closed and self.up_to_date


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _dump(value: Any) -> bytes:
    try:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
    except UnicodeEncodeError:
        # Lone surrogates cannot be UTF-8: keep them as JSON escapes.
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


def encode_json_append(body: bytes, *, allow_empty: bool) -> bytes:
    """Validate a JSON-mode body and return what is stored: its values, comma-joined.

    A top-level array is flattened exactly one level (protocol §9.1): `[a, b]` stores two values.
    The client's own text is kept (only the outer brackets of an array go): re-encoding every
    value would cost more than parsing it, and readers get the same values either way.
    """
    try:
        text = body.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("body is not valid UTF-8 JSON") from None
    if not isinstance(value, list):
        return text.strip().encode()
    if not value:
        if allow_empty:
            return b""
        raise BadRequest("an empty JSON array appends nothing")
    inner = text.strip()[1:-1].strip()
    return inner.encode()


def encoded_json_values(body: bytes) -> bytes:
    """What a JSON stream stores of an array this process encoded (`AppendRequest.encoded_json`):
    the values between its brackets. Anything else is validated as a client's body would be."""
    if len(body) > 2 and body[:1] == b"[" and body[-1:] == b"]":
        return body[1:-1]
    return encode_json_append(body, allow_empty=False)


def json_items(stored: bytes) -> list[Any]:
    decoded: list[Any] = json.loads(b"[" + stored + b"]")
    return decoded


def json_prefix(stored: bytes, count: int) -> bytes:
    return b",".join(_dump(item) for item in json_items(stored)[:count])

"""Staging a batch of appends: each request validated against the stream's state, and the
writes it implies collected, before anything is written. Shared by the SQLite and Postgres
commit paths; nothing here touches the database."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from streams_service.durable.live import TailUpdate
from streams_service.durable.model import (
    AppendOutcome,
    AppendRequest,
    StreamState,
    check_live,
    encode_json_append,
    encoded_json_values,
    is_json,
    media_type,
)
from streams_service.durable.offsets import format_offset
from streams_service.errors import AppError, BadRequest, Conflict, Forbidden


@dataclass(slots=True)
class AppendOp:
    path: str
    request: AppendRequest
    future: asyncio.Future[AppendOutcome]


BatchResult = tuple[
    list[tuple["AppendOp", AppendOutcome | AppError]], set[int], dict[int, TailUpdate]
]


@dataclass
class Staged:
    """A batch validated against locked state, with the writes it implies."""

    outcomes: list[tuple[AppendOp, AppendOutcome | AppError]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    dirty: dict[int, StreamState] = field(default_factory=dict)
    dirty_producers: set[tuple[int, str]] = field(default_factory=set)

    def result(self) -> BatchResult:
        updates: dict[int, TailUpdate] = {}
        for message in self.messages:
            sid = message["stream_id"]
            if sid not in updates:
                updates[sid] = TailUpdate(self.dirty[sid], [])
            updates[sid].chunks.append((message["end_pos"], message["data"]))
        return self.outcomes, set(self.dirty), updates


def stage_appends(
    appends: list[AppendOp],
    states: dict[str, StreamState],
    producer_state: dict[tuple[int, str], tuple[int, int]],
    now: int,
) -> Staged:
    staged = Staged()
    for op in appends:
        try:
            outcome = apply_append(
                op.path,
                op.request,
                states.get(op.path),
                producer_state,
                now,
                staged.messages,
                staged.dirty_producers,
            )
        except AppError as exc:
            staged.outcomes.append((op, exc))
            continue
        state = states[op.path]
        staged.dirty[state.id] = state
        staged.outcomes.append((op, outcome))
    return staged


def apply_append(
    path: str,
    req: AppendRequest,
    state: StreamState | None,
    producer_state: dict[tuple[int, str], tuple[int, int]],
    now: int,
    new_messages: list[dict[str, Any]],
    dirty_producers: set[tuple[int, str]],
) -> AppendOutcome:
    """Validate one append against the (locked) stream and stage its writes. Nothing is staged
    unless every check passes, so a rejected request leaves no trace. Checks follow the
    protocol's precedence: closed, then content type, then producer, then Stream-Seq."""
    state = check_live(state, path, now)
    producer = req.producer
    if state.closed:
        if producer is not None and state.closed_by == (producer.id, producer.epoch, producer.seq):
            # A retry of the request that closed the stream.
            return AppendOutcome(
                204,
                state.tail,
                closed=True,
                producer_epoch=producer.epoch,
                producer_seq=producer.seq,
            )
        if req.body is None and producer is None:
            state.touch(now)
            return AppendOutcome(204, state.tail, closed=True)
        raise Conflict(
            "stream is closed",
            headers={"Stream-Closed": "true", "Stream-Next-Offset": format_offset(state.tail)},
        )
    if (
        req.body is not None
        and req.content_type is not None
        and media_type(req.content_type) != media_type(state.content_type)
    ):
        raise Conflict(
            f"Content-Type {media_type(req.content_type)!r} does not match the stream's "
            f"{media_type(state.content_type)!r}"
        )
    proposed: tuple[int, int] | None = None
    key = (state.id, producer.id) if producer is not None else None
    if producer is not None and key is not None:
        current = producer_state.get(key)
        if current is None:
            if producer.seq != 0:
                raise _gap(0, producer.seq)
            proposed = (producer.epoch, 0)
        else:
            epoch, last_seq = current
            if producer.epoch < epoch:
                raise Forbidden("stale producer epoch", headers={"Producer-Epoch": str(epoch)})
            if producer.epoch > epoch:
                if producer.seq != 0:
                    raise BadRequest("a new producer epoch must start at Producer-Seq 0")
                proposed = (producer.epoch, 0)
            elif producer.seq <= last_seq:
                return AppendOutcome(
                    204, state.tail, producer_epoch=producer.epoch, producer_seq=last_seq
                )
            elif producer.seq == last_seq + 1:
                proposed = (producer.epoch, producer.seq)
            else:
                raise _gap(last_seq + 1, producer.seq)
    if (
        req.stream_seq is not None
        and state.last_stream_seq is not None
        and req.stream_seq <= state.last_stream_seq
    ):
        raise Conflict(
            f"Stream-Seq {req.stream_seq!r} is not after the last one ({state.last_stream_seq!r})"
        )
    data: bytes | None = None
    if req.body is not None:
        data = req.body
        if is_json(state.content_type):
            data = (
                encoded_json_values(req.body)
                if req.encoded_json
                else encode_json_append(req.body, allow_empty=False)
            )
    # Every check passed: stage the writes.
    if data is not None:
        state.tail += len(data)
        new_messages.append({"stream_id": state.id, "end_pos": state.tail, "data": data})
    if proposed is not None and key is not None:
        producer_state[key] = proposed
        dirty_producers.add(key)
    if req.stream_seq is not None:
        state.last_stream_seq = req.stream_seq
    if req.close:
        state.closed = True
        state.closed_by = (producer.id, producer.epoch, producer.seq) if producer else None
    state.touch(now)
    return AppendOutcome(
        # A producer's accepted append is 200; a close-only request has nothing to show: 204.
        200 if producer is not None and data is not None else 204,
        state.tail,
        closed=req.close,
        producer_epoch=producer.epoch if producer else None,
        producer_seq=producer.seq if producer else None,
    )


def _gap(expected: int, received: int) -> Conflict:
    return Conflict(
        "producer sequence gap",
        headers={"Producer-Expected-Seq": str(expected), "Producer-Received-Seq": str(received)},
    )

"""Writes one assistant message's AG-UI events to its session stream, coalescing deltas.

Token deltas arrive tens of times a second; each append is a durable write. Consecutive deltas of
the same kind are merged and written at most every `flush_interval` (or once `flush_chars`
characters are pending), so a busy generation costs a handful of writes per second. Structural
events (starts, ends, tool calls, errors) go out with whatever is pending, in order.

Every append carries idempotent-producer headers (`gen-<generation id>`, epoch 0, seq n): a retry
after a storage error can never write a batch twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from streams_service.durable.model import AppendOutcome, AppendRequest, Producer
from streams_service.durable.offsets import format_offset
from streams_service.durable.store import StreamStore
from streams_service.errors import ServiceUnavailable
from streams_service.sessions import records

log = structlog.get_logger(__name__)

# How long a write that failed because the database is unavailable keeps being retried: long
# enough to ride out a restart or a failover, short enough that a dead database ends the answer.
STORAGE_RETRY_S = 30.0

# Delta events that merge with an immediately preceding event of the same kind and target.
_MERGEABLE = {
    "TEXT_MESSAGE_CONTENT": ("messageId", "delta"),
    "STEP_FINISHED": ("stepId", "delta"),
    "TOOL_CALL_ARGS": ("toolCallId", "delta"),
}


# Ticks of the shared timer per flush interval: a batch is written at the last tick before it
# is one interval old, so with two ticks it waits between half an interval and one. More ticks
# write closer to the deadline but wake the loop more often; fewer spread the writes over
# fewer, larger bursts.
TICKS_PER_INTERVAL = 2
# From a sleeping generation's tick, where its socket starts being read again, to waking it: the
# loop's next look at its sockets receives what waited in the kernel, so the woken generation
# finds it already read instead of waiting for it (a second wake-up, through its whole read path).
SETTLE_S = 0.001


class Flusher:
    """One timer for the pending deltas of many ChunkWriters (GenerationManager keeps one for
    the process). A writer whose first delta is pending registers and is due one interval later
    (the interval asked as it registers: GenerationManager's stretches under load). While any
    writer is registered the timer ticks TICKS_PER_INTERVAL times an interval, and each tick
    hands the batch of every writer that would be overdue by the next tick to the store, from a
    callback: no task, coroutine or lock per write, and the batches of one tick reach the stream
    writer together, so they share its commits. A delta waits at most one interval. Idle writers
    cost nothing: the timer is armed only while one is registered.

    A generation can sleep until its writer's next timed write (`until_next_write`) instead of
    reading upstream event by event: the tick wakes it, it reads what upstream sent meanwhile
    in one go and writes that itself, and sleeps again; it wakes and reads once per interval.
    The tick still writes whatever such a writer has pending, a loop turn after waking it (a
    generation that read its data without waiting has written it by then)."""

    def __init__(self, interval: Callable[[], float]) -> None:
        self._interval = interval
        # Writer -> loop time its tick is due: its pending batch is one interval old, or the
        # generation sleeping on it wants to read. An ordered dict: writes go out in arrival
        # order.
        self._due: dict[ChunkWriter, float] = {}
        # Writer -> the generation sleeping on it: its future, and what to call at its tick.
        self._sleeping: dict[
            ChunkWriter, tuple[asyncio.Future[None], Callable[[], None] | None]
        ] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tick_s = 0.0

    def register(self, writer: ChunkWriter) -> None:
        if writer in self._due:
            return  # already due no later than one interval from now
        loop = asyncio.get_running_loop()
        interval = self._interval()
        self._due[writer] = loop.time() + interval
        if self._timer is None:
            self._tick_s = interval / TICKS_PER_INTERVAL
            self._timer = loop.call_later(self._tick_s, self._tick)

    def unregister(self, writer: ChunkWriter) -> None:
        """`writer` has nothing pending any more. A generation sleeping on it keeps its tick."""
        sleeper = self._sleeping.get(writer)
        if sleeper is not None and not sleeper[0].done():
            return
        self._sleeping.pop(writer, None)
        self._due.pop(writer, None)
        if not self._due and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def until_next_write(
        self, writer: ChunkWriter, before: Callable[[], None] | None = None
    ) -> asyncio.Future[None]:
        """Done just before `writer`'s next timed write: when its pending batch is due, or one
        interval from now when nothing is pending. `before` is called at that tick, and the
        future is done SETTLE_S later: time for whatever `before` starts (a socket read) to
        land first."""
        self.register(writer)
        sleeper = self._sleeping.get(writer)
        if sleeper is None or sleeper[0].done():
            sleeper = (asyncio.get_running_loop().create_future(), before)
            self._sleeping[writer] = sleeper
        return sleeper[0]

    def _tick(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        horizon = loop.time() + self._tick_s
        due = [writer for writer, at in self._due.items() if at <= horizon]
        waking: list[asyncio.Future[None]] = []
        settle = False
        for writer in due:
            del self._due[writer]
            sleeper = self._sleeping.pop(writer, None)
            if sleeper is not None and not sleeper[0].done():
                waking.append(sleeper[0])
                if sleeper[1] is not None:
                    sleeper[1]()
                    settle = True
        if due:
            if settle:
                loop.call_later(SETTLE_S, self._wake, waking, due)
            else:
                self._wake(waking, due)
        if self._due:
            self._tick_s = self._interval() / TICKS_PER_INTERVAL
            self._timer = loop.call_later(self._tick_s, self._tick)

    def _wake(self, waking: list[asyncio.Future[None]], due: list[ChunkWriter]) -> None:
        for sleeper in waking:
            if not sleeper.done():
                # The woken generation's step is queued now and runs before the write queued
                # below (the loop runs callbacks in order).
                sleeper.set_result(None)
        asyncio.get_running_loop().call_soon(self._write, due)

    @staticmethod
    def _write(due: list[ChunkWriter]) -> None:
        for writer in due:
            writer.flush_from_timer()


class ChunkWriter:
    def __init__(
        self,
        store: StreamStore,
        stream_path: str,
        *,
        message_id: str,
        producer_id: str,
        actor_id: str = "claude",
        flush_interval_s: float = 0.04,
        flush_chars: int = 300,
        retry_for_s: float = STORAGE_RETRY_S,
        pace: Callable[[], float] | None = None,
        flusher: Flusher | None = None,
        ready: asyncio.Future[Any] | None = None,
    ) -> None:
        self._store = store
        self._path = stream_path
        self._message_id = message_id
        self._producer_id = producer_id
        self._actor_id = actor_id
        self._flush_chars = flush_chars
        self._retry_for_s = retry_for_s
        # Whose timer writes pending deltas: the process's shared one, or one of its own that
        # asks `pace` (or waits `flush_interval_s`) each time it is armed.
        self._flusher = flusher or Flusher(pace or (lambda: flush_interval_s))
        # Awaited before the first write: what must be on the stream before this message.
        self._ready = ready
        self._pending: list[dict[str, Any]] = []
        self._pending_chars = 0
        self._pending_since: float | None = None
        self._seq = 0  # chunk seq within the message
        self._producer_seq = 0
        # A frozen batch not yet known to be written: retried as it is, under the same seq.
        self._inflight: bytes | None = None
        # The timer's write of `_inflight`, while it is in the store's hands.
        self._submitted: asyncio.Future[AppendOutcome] | None = None
        # A batch frozen after `_inflight` and sent right behind it under the next seq (a flush
        # that found the timer's write in flight), and the store's answer while it is pending.
        # Not known to be written until both are: retried after `_inflight`, under that seq.
        self._next: bytes | None = None
        self._behind: asyncio.Future[AppendOutcome] | None = None
        self._lock = asyncio.Lock()
        self._timed_flush: asyncio.Task[None] | None = None
        self.last_offset: str | None = None
        self.appends = 0

    async def __aenter__(self) -> ChunkWriter:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._flusher.unregister(self)
        if self._timed_flush is not None:
            with contextlib.suppress(Exception):
                await self._timed_flush
        await self.flush()

    async def emit(
        self, event: dict[str, Any], *, flush: bool = False, defer: bool = False
    ) -> None:
        """Queue an event. Deltas wait to be merged; anything else is written with them at once,
        unless `defer`: an opening event whose first delta follows at once goes out with it
        (one write, not two, before the first token shows)."""
        if self.queue(event, flush=flush, defer=defer):
            await self.flush()

    def queue(self, event: dict[str, Any], *, flush: bool = False, defer: bool = False) -> bool:
        """`emit` without the write: True when the caller must `flush()` now. For the token
        path, which calls it synchronously: most deltas only merge, and a coroutine per delta
        was ~2% of the event loop at 500 generations."""
        merge = _MERGEABLE.get(event["type"])
        last = self._pending[-1] if self._pending else None
        if merge is not None:
            target, text_field = merge
            if (
                last is not None
                and last["type"] == event["type"]
                and last.get(target) == event.get(target)
            ):
                last[text_field] = last.get(text_field, "") + event.get(text_field, "")
            else:
                self._pending.append(dict(event))
            self._pending_chars += len(event.get(text_field, ""))
            if self._pending_since is None:
                self._pending_since = time.monotonic()
                self._flusher.register(self)
            return self._pending_chars >= self._flush_chars or flush
        self._pending.append(dict(event))
        if defer:
            if self._pending_since is None:
                self._pending_since = time.monotonic()
                self._flusher.register(self)
            return False
        return True

    async def flush(self) -> None:
        """Write what is pending. A batch that failed is retried as it was, under the same
        producer seq, before anything newer: if its first attempt did commit, the retry is
        recognised as a duplicate instead of writing it twice.

        When the timer's write is still in the store's hands, what is pending goes to the store
        right behind it under the next seq instead of waiting for its outcome (a round trip
        and a loop wake-up: the first words of an answer often find the thinking's last batch
        in flight). The store applies a producer's appends in seq order, so the second lands
        only after the first; if either fails, both are retried in order, each under the seq
        it was sent with."""
        async with self._lock:
            if self._ready is not None:
                await self._ready
                self._ready = None
            submitted = self._submitted
            behind_it = submitted is not None and not submitted.done()
            if behind_it and self._pending and self._next is None:
                self._next = self._freeze()
                self._behind = self._store.submit_append(
                    self._path, self._request(self._next, self._producer_seq + 1)
                )
            if submitted is not None:
                # The timer's write goes first; its outcome decides whether it is retried.
                await asyncio.wait([submitted])
                self._settle(submitted)
            behind = self._behind
            if behind is not None:
                await asyncio.wait([behind])
                self._behind = None
                if _succeeded(behind) and self._inflight is None:
                    self._next = None
                    self._count(behind.result())
            while True:
                if self._inflight is None:
                    if self._next is not None:
                        self._inflight, self._next = self._next, None
                    elif not self._pending:
                        return
                    else:
                        self._inflight = self._freeze()
                await self._append(self._inflight)
                self._inflight = None

    def until_next_write(self, before: Callable[[], None] | None = None) -> asyncio.Future[None]:
        """See Flusher.until_next_write: done just before this writer's next timed write."""
        return self._flusher.until_next_write(self, before)

    def flush_from_timer(self) -> None:
        """The Flusher's tick: hand the pending batch to the store now, from the callback. When
        a write is already under way (a flush holding the lock, an earlier batch not yet
        settled, the user message not yet on the stream), a task waits its turn instead, and
        the batch grows meanwhile."""
        if self._pending_since is None:
            return
        if (
            self._lock.locked()
            or self._submitted is not None
            or self._inflight is not None
            or self._next is not None
            or not self._is_ready()
        ):
            if self._timed_flush is None or self._timed_flush.done():
                self._timed_flush = asyncio.create_task(self._flush_quietly())
            return
        self._ready = None
        self._inflight = self._freeze()
        future = self._store.submit_append(self._path, self._request(self._inflight))
        self._submitted = future
        future.add_done_callback(self._settle)

    def _is_ready(self) -> bool:
        """Whatever this message waits for is on the stream (or it waits for nothing)."""
        ready = self._ready
        if ready is None:
            return True
        return ready.done() and not ready.cancelled() and ready.exception() is None

    def _settle(self, future: asyncio.Future[AppendOutcome]) -> None:
        """The outcome of the timer's write (once: from its callback or from flush, whichever
        comes first). A failed write stays in flight, for the next flush to retry."""
        if self._submitted is not future:
            return
        self._submitted = None
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            # The generation sees the error on its next write (the retry), as a flush would.
            log.warning("chunk_flush_failed", error=type(exc).__name__)
            return
        self._inflight = None
        self._count(future.result())

    def _freeze(self) -> bytes:
        batch, self._pending = self._pending, []
        self._pending_chars = 0
        self._pending_since = None
        self._flusher.unregister(self)
        created = records.now_iso()
        rows = []
        for event in batch:
            rows.append(
                records.chunk_record(
                    message_id=self._message_id,
                    actor_id=self._actor_id,
                    role="assistant",
                    seq=self._seq,
                    chunk=event,
                    created_at=created,
                )
            )
            self._seq += 1
        return records.encode(rows)

    def _request(self, body: bytes, seq: int | None = None) -> AppendRequest:
        producer = Producer(self._producer_id, 0, self._producer_seq if seq is None else seq)
        # `body` is records.encode() of a non-empty batch (_freeze): no need to parse it again.
        return AppendRequest(
            body=body, content_type="application/json", producer=producer, encoded_json=True
        )

    async def _append(self, body: bytes) -> None:
        request = self._request(body)
        deadline = time.monotonic() + self._retry_for_s
        delay = 0.1
        while True:
            try:
                outcome = await self._store.append(self._path, request)
                break
            except ServiceUnavailable:
                # The database restarting or failing over must not end the answer: the same
                # batch under the same producer seq is retried until it lands (a first attempt
                # that did commit is recognised as a duplicate), for a bounded time.
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("chunk_append_retry", stream=self._path, delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self._count(outcome)

    def _count(self, outcome: AppendOutcome) -> None:
        self._producer_seq += 1
        self.appends += 1
        if outcome.next_offset_pos is not None:
            self.last_offset = format_offset(outcome.next_offset_pos)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except Exception as exc:
            # Kept for the next flush; the generation sees the error on its next write.
            log.warning("chunk_flush_failed", error=type(exc).__name__)


def _succeeded(future: asyncio.Future[AppendOutcome]) -> bool:
    """Done without an error (which is retrieved: a failure here is dealt with by a retry)."""
    return not future.cancelled() and future.exception() is None

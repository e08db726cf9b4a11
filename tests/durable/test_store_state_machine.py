"""A hypothesis state machine over the Durable Streams store, checked against a plain model.

Random creates, appends (plain, idempotent-producer, wrong content type, closing), reads from
earlier offsets with small read budgets, forks, deletes, clock jumps and sweeps run against the
real StreamStore on SQLite and Postgres; after every step each path's full read (or its 404/410)
must equal what the model predicts.

The store reads its clock through `now_ms` (no `now` parameter), so the machine patches that
name in the store and writer modules with a clock it advances by hand: TTL expiry is exercised
without sleeping. Each run's clock starts ~2 days (more than a run can advance) before the
previous run's, and a day before real time, so streams of earlier runs and of other tests
never expire within a run and the sweep counts stay exact (an initial sweep clears anything
already expired at the run's start).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar
from unittest import mock

from hypothesis import event
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from db.engine import create_engine
from streams_service.config import Settings
from streams_service.durable import store as store_module
from streams_service.durable import writer as writer_module
from streams_service.durable.live import LiveHub
from streams_service.durable.model import (
    AppendOutcome,
    AppendRequest,
    CreateRequest,
    Producer,
    ReadResult,
)
from streams_service.durable.store import StreamStore
from streams_service.errors import AppError, BadRequest, Conflict, Gone, NotFound

T = TypeVar("T")

JSON_TYPE = "application/json"
BYTES_TYPE = "application/octet-stream"
TTL_S = 60
NAMES = ["a", "b", "c"]  # few paths, so rules keep meeting the same streams
PRODUCER = "p"
_runs = itertools.count()

json_values = st.one_of(
    st.integers(-1000, 1000),
    st.text(max_size=6),
    st.dictionaries(st.sampled_from(["k", "v"]), st.integers(0, 9), max_size=2),
    st.lists(st.integers(0, 99), max_size=3),  # a top-level array: flattened one level
)
byte_values = st.binary(min_size=1, max_size=12)


# ---------------------------------------------------------------------- the model


@dataclass
class MStream:
    order: int  # creation order, which the store's ids follow (sweep visits streams by id)
    is_json: bool
    ttl_ms: int | None
    accessed: int
    parent: MStream | None = None
    fork_pos: int | None = None
    source_path: str | None = None
    own: list[tuple[int, bytes]] = field(default_factory=list)
    tail: int = 0
    closed: bool = False
    ref_count: int = 0
    soft_deleted: bool = False
    producer: tuple[int, int] | None = None  # (epoch, last seq)

    def view(self) -> list[tuple[int, bytes]]:
        """What a reader sees: the source's messages up to the fork position, then its own."""
        prefix: list[tuple[int, bytes]] = []
        if self.parent is not None:
            assert self.fork_pos is not None
            prefix = [m for m in self.parent.view() if m[0] <= self.fork_pos]
        return prefix + self.own

    def expired(self, now: int) -> bool:
        return self.ttl_ms is not None and now >= self.accessed + self.ttl_ms

    def availability(self, now: int) -> type[AppError] | None:
        """None when live, else the error reads, appends and deletes get."""
        if self.soft_deleted:
            return Gone
        if self.expired(now):
            return Gone if self.ref_count > 0 else NotFound
        return None


@dataclass
class Model:
    streams: dict[str, MStream] = field(default_factory=dict)  # every row the store still holds
    created: int = 0

    def cascade(self, path: str) -> None:
        """Remove a stream, release its source, remove a soft-deleted source left forkless."""
        rec = self.streams.pop(path)
        while rec.parent is not None:
            parent = rec.parent
            parent.ref_count -= 1
            if parent.ref_count > 0 or not parent.soft_deleted:
                return
            parent_path = next(p for p, r in self.streams.items() if r is parent)
            rec = self.streams.pop(parent_path)


def stored_json_text(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def stored_json(value: object) -> bytes:
    """What the store keeps for a JSON append: the client's text, or an array's items without
    its brackets (the encoding is this test's own, so a store that re-encoded would be caught)."""
    text = stored_json_text(value).decode()
    if isinstance(value, list):
        return text[1:-1].encode()
    return text.encode()


class Clock:
    def __init__(self, start: int) -> None:
        self.ms = start

    def now(self) -> int:
        return self.ms


# ---------------------------------------------------------------------- the machine


class StoreMachine(RuleBasedStateMachine):
    database_url = ""  # set by the test that runs the machine

    def __init__(self) -> None:
        super().__init__()
        run = next(_runs)
        self.clock = Clock(int(time.time() * 1000) - 86_400_000 - run * 200_000_000)
        self.patches = [
            mock.patch.object(store_module, "now_ms", self.clock.now),
            mock.patch.object(writer_module, "now_ms", self.clock.now),
        ]
        for patch in self.patches:
            patch.start()
        self.prefix = f"/sm-{uuid.uuid4().hex[:12]}/"
        self.loop = asyncio.new_event_loop()
        self.engine = create_engine(self.database_url, pool_size=2, max_overflow=0, read_only=True)
        self.store = StreamStore(self.database_url, self.engine, LiveHub())
        self.run(self.store.start())
        self.run(self.store.sweep())  # leftovers already expired at this run's clock
        self.model = Model()

    def teardown(self) -> None:
        try:
            self.run(self.store.stop())
            self.run(self.engine.dispose())
        finally:
            self.loop.close()
            for patch in self.patches:
                patch.stop()

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def path(self, name: str) -> str:
        return self.prefix + name

    def attempt(self, coro: Awaitable[T]) -> T | AppError:
        try:
            return self.run(coro)
        except AppError as exc:
            return exc

    def expect_error(self, got: object, expected: type[AppError]) -> None:
        assert type(got) is expected, f"expected {expected.__name__}, got {got!r}"
        event(f"answered {expected.__name__}")

    # ------------------------------------------------------------------ model transitions

    def predict_create(
        self, name: str, is_json: bool, ttl: int | None, source: str | None, fork_pos: int | None
    ) -> tuple[Model, bool] | type[AppError]:
        """The model after a create (on a copy: a failed create changes nothing), and whether
        a stream was made; or the error the store must answer."""
        model = copy.deepcopy(self.model)
        now = self.clock.ms
        existing = model.streams.get(name)
        if existing is not None:
            availability = existing.availability(now)
            if availability is NotFound:
                model.cascade(name)  # expired: the path is free again
            elif availability is Gone:
                return Conflict
            else:
                same = (
                    (source is not None or existing.is_json == is_json)  # a fork inherits
                    and existing.ttl_ms == (ttl * 1000 if ttl else None)
                    and not existing.closed
                    and existing.source_path == source
                    and (fork_pos is None or fork_pos == existing.fork_pos)
                )
                return (model, False) if same else Conflict
        rec = MStream(
            order=model.created, is_json=is_json, ttl_ms=ttl * 1000 if ttl else None, accessed=now
        )
        if source is not None:
            src = model.streams.get(source)
            if src is None or (src.expired(now) and not src.soft_deleted):
                return NotFound
            if src.soft_deleted:
                return Conflict
            pos = src.tail if fork_pos is None else fork_pos
            if pos > src.tail:
                return BadRequest
            src.ref_count += 1
            rec.is_json, rec.parent, rec.source_path = src.is_json, src, source
            rec.fork_pos = rec.tail = pos
            if ttl is None:
                rec.ttl_ms = src.ttl_ms  # a fork without its own expiry inherits its source's
        model.created += 1
        model.streams[name] = rec
        return model, True

    def check_create(
        self, name: str, is_json: bool, ttl: int | None, source: str | None, fork_pos: int | None
    ) -> None:
        expected = self.predict_create(name, is_json, ttl, source, fork_pos)
        request = CreateRequest(
            content_type=None if source else (JSON_TYPE if is_json else BYTES_TYPE),
            ttl_seconds=ttl,
            forked_from=self.path(source) if source else None,
            fork_pos=fork_pos,
        )
        got = self.attempt(self.store.create(self.path(name), request))
        if isinstance(expected, type):
            self.expect_error(got, expected)
            return
        model, created = expected
        assert not isinstance(got, AppError), f"create failed: {got!r}"
        assert got.created == created
        assert got.state.tail == model.streams[name].tail
        self.model = model

    # ------------------------------------------------------------------ rules

    @initialize(is_json=st.booleans(), ttl=st.sampled_from([None, TTL_S]))
    def create_first(self, is_json: bool, ttl: int | None) -> None:
        """Start with a stream, so the first steps have something to append to and fork."""
        self.check_create(NAMES[0], is_json, ttl, None, None)

    @rule(name=st.sampled_from(NAMES), is_json=st.booleans(), ttl=st.sampled_from([None, TTL_S]))
    def create(self, name: str, is_json: bool, ttl: int | None) -> None:
        self.check_create(name, is_json, ttl, None, None)

    @rule(
        source=st.sampled_from(NAMES),
        name=st.sampled_from(NAMES),
        where=st.one_of(st.none(), st.integers(0, 50)),
        beyond=st.booleans(),
        ttl=st.sampled_from([None, TTL_S]),
    )
    def fork(
        self, source: str, name: str, where: int | None, beyond: bool, ttl: int | None
    ) -> None:
        """Fork at the source's tail (None), at a message boundary, or past the tail."""
        fork_pos = None
        src = self.model.streams.get(source)
        if where is not None and src is not None:
            boundaries = [0] + [end for end, _ in src.view()]
            fork_pos = src.tail + 1 if beyond else boundaries[where % len(boundaries)]
        self.check_create(name, False, ttl, source, fork_pos)

    @rule(
        name=st.sampled_from(NAMES),
        json_value=json_values,
        raw=byte_values,
        mode=st.sampled_from(["plain", "producer", "retry", "wrong-type", "close", "close-only"]),
    )
    def append(self, name: str, json_value: object, raw: bytes, mode: str) -> None:
        rec = self.model.streams.get(name)
        is_json = rec.is_json if rec is not None else True
        body: bytes | None = stored_json_text(json_value) if is_json else raw
        data = stored_json(json_value) if is_json else raw
        content_type = JSON_TYPE if is_json else BYTES_TYPE
        if mode == "wrong-type":
            content_type = BYTES_TYPE if is_json else JSON_TYPE
        if mode == "close-only":
            body, content_type = None, BYTES_TYPE
        producer = None
        if mode in ("producer", "retry"):
            last = rec.producer[1] if rec is not None and rec.producer is not None else None
            seq = 0 if last is None else (last if mode == "retry" else last + 1)
            producer = Producer(PRODUCER, 0, seq)
        request = AppendRequest(
            body=body,
            content_type=content_type,
            producer=producer,
            close=mode in ("close", "close-only"),
        )
        before = rec.tail if rec is not None else None
        got = self.attempt(self.store.append(self.path(name), request))

        now = self.clock.ms
        error = rec.availability(now) if rec is not None else NotFound
        if error is None and rec is not None and rec.closed:
            if body is None and producer is None:
                rec.accessed = now  # closing a closed stream again is a harmless no-op
                assert isinstance(got, AppendOutcome) and got.closed, got
                assert got.next_offset_pos == rec.tail
                return
            error = Conflict  # a closed stream refuses appends
        if error is None and mode == "wrong-type":
            error = Conflict
        if error is None and mode == "retry" and rec is not None and rec.producer is not None:
            # A retried producer append is acknowledged again but not written twice.
            assert isinstance(got, AppendOutcome), f"retry failed: {got!r}"
            assert got.status == 204 and got.next_offset_pos == rec.tail
            return
        if error is None and body is not None and is_json and json_value == []:
            error = BadRequest  # an empty array appends nothing
        if error is not None:
            self.expect_error(got, error)
            return
        assert rec is not None and before is not None
        assert isinstance(got, AppendOutcome), f"append failed: {got!r}"
        if producer is not None:
            rec.producer = (0, producer.seq)
        if body is not None:
            rec.tail += len(data)
            rec.own.append((rec.tail, data))
        rec.closed = rec.closed or request.close
        rec.accessed = now
        assert got.status == (200 if producer is not None else 204)
        assert got.next_offset_pos == rec.tail
        if body is not None:
            assert rec.tail > before  # offsets strictly increase with every written append

    @rule(
        name=st.sampled_from(NAMES),
        values=st.lists(st.tuples(json_values, byte_values), min_size=1, max_size=4),
    )
    def append_several(self, name: str, values: list[tuple[object, bytes]]) -> None:
        """Plain appends in a row: streams get several messages to paginate and fork between."""
        for json_value, raw in values:
            self.append(name, json_value, raw, "plain")

    @rule(
        name=st.sampled_from(NAMES),
        start=st.integers(0, 200),
        max_bytes=st.sampled_from([1, 7, 32, 1 << 20]),
    )
    def read_from(self, name: str, start: int, max_bytes: int) -> None:
        """Read from an earlier offset (a boundary, or inside a message) page by page."""
        rec = self.model.streams.get(name)
        tail = rec.tail if rec is not None else 0
        from_pos = start % (tail + 1)
        got = self.attempt(self.read_all(name, from_pos, max_bytes))
        error = rec.availability(self.clock.ms) if rec is not None else NotFound
        if error is not None:
            self.expect_error(got, error)
            return
        assert rec is not None
        assert got == [m for m in rec.view() if m[0] > from_pos]

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: str) -> None:
        got = self.attempt(self.store.delete(self.path(name)))
        rec = self.model.streams.get(name)
        if rec is None:
            self.expect_error(got, NotFound)
            return
        # An expired row stays: the store's cascade runs in the transaction its 404 rolls back.
        error = rec.availability(self.clock.ms)
        if error is not None:
            self.expect_error(got, error)
            return
        assert got is None, got
        if rec.ref_count > 0:
            rec.soft_deleted = True  # forks still read through it: hidden, data kept
        else:
            self.model.cascade(name)

    @rule(ms=st.sampled_from([1_000, TTL_S * 1000 - 1, TTL_S * 1000, 2 * 3600 * 1000]))
    def advance_clock(self, ms: int) -> None:
        self.clock.ms += ms

    @rule()
    def sweep(self) -> None:
        got = self.run(self.store.sweep())
        now, expected = self.clock.ms, 0
        for name, rec in sorted(self.model.streams.items(), key=lambda kv: kv[1].order):
            if self.model.streams.get(name) is not rec or not rec.expired(now):
                continue  # removed earlier in this sweep, or not expired
            if rec.ref_count > 0:
                if not rec.soft_deleted:
                    rec.soft_deleted = True
                    expected += 1
            else:
                self.model.cascade(name)
                expected += 1
        assert got == expected
        event(f"sweep removed {min(got, 2)}+")

    # ------------------------------------------------------------------ invariants

    async def read_all(self, name: str, from_pos: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Follow next_pos until up to date, checking each page keeps to the budget."""
        chunks: list[tuple[int, bytes]] = []
        pos = from_pos
        for _ in range(1000):
            page: ReadResult = await self.store.read(self.path(name), pos, max_bytes)
            if len(page.chunks) > 1:
                assert page.chunks[-1][0] - pos <= max_bytes, "a page overran its read budget"
            if not page.up_to_date:
                assert page.chunks, "a page short of the tail carried nothing"
            chunks.extend(page.chunks)
            assert page.next_pos == (page.chunks[-1][0] if page.chunks else page.state.tail)
            pos = page.next_pos
            if page.up_to_date:
                assert pos == page.state.tail
                return chunks
        raise AssertionError("never reached the tail")

    @invariant()
    def every_stream_matches_the_model(self) -> None:
        now = self.clock.ms
        for name in NAMES:
            rec = self.model.streams.get(name)
            error = rec.availability(now) if rec is not None else NotFound
            # A small budget: the full read is paginated (and each page's size checked) every step.
            got = self.attempt(self.read_all(name, 0, 16))
            if error is not None:
                self.expect_error(got, error)
                self.expect_error(self.attempt(self.store.head(self.path(name))), error)
                continue
            assert rec is not None
            assert got == rec.view()
            ends = [end for end, _ in got]
            assert all(a < b for a, b in itertools.pairwise(ends)), ends
            state = self.run(self.store.head(self.path(name)))
            assert (state.tail, state.closed) == (rec.tail, rec.closed)


def test_store_matches_model(database_url: str) -> None:
    url = Settings(database_url=database_url).database_url

    class Machine(StoreMachine):
        database_url = url

    run_state_machine_as_test(
        Machine,
        settings=hsettings(max_examples=40, stateful_step_count=30, deadline=None),
    )

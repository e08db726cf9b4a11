"""One batch of appends, one Postgres transaction, for the writer thread.

Two ways to the same transaction:

- **Locked** (always correct): lock the batch's stream rows and read its producers' state, stage
  the appends against them, then write and COMMIT: two round trips in psycopg's pipeline mode.
- **Known** (the common case): the writer remembers the state its own commits left for each
  stream and producer (`KnownState`). When a batch stages cleanly against that memory, its
  writes go out with conditions that hold only if nobody changed those rows since (another
  process, a control operation, a sweep), checked by the database in the same statement. The
  writes and the NOTIFYs are that one statement, sent in autocommit: it is its own transaction,
  committed as it is answered. One round trip, no reads. A failed check aborts it before
  anything is written, and the batch goes the locked way.

The memory is only ever a guess: nothing is answered from it that the database did not confirm
in the same transaction, so several processes writing the same streams stay correct, they only
fall back to the locked way more often.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import psycopg

from streams_service import jsoncodec
from streams_service.durable.live import LiveHub
from streams_service.durable.model import StreamState
from streams_service.durable.staging import AppendOp, BatchResult, Staged, stage_appends

# Streams and producers remembered at most; past this the memory starts again (the next batch
# of each stream takes the locked way once). Every generation has its own producer id.
KNOWN_LIMIT = 20_000

# SQLSTATEs after which the known way's transaction is certainly rolled back and the locked way
# may run: our own check failing (division by zero), a row another writer inserted first, a
# deadlock or serialization failure. Anything else (a dropped connection above all: its COMMIT
# may have landed) is raised as before.
_RETRY_LOCKED = frozenset({"22012", "23505", "40P01", "40001"})


class _Row:
    """Attribute access over a psycopg row, the shape StreamState.from_row reads."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


_LOCK_STREAMS = "SELECT * FROM ds_streams WHERE path = ANY(%(paths)s) ORDER BY id FOR UPDATE"
_PRODUCERS = (
    "SELECT p.stream_id, p.producer_id, p.epoch, p.last_seq FROM ds_producers p "
    "JOIN ds_streams s ON s.id = p.stream_id "
    "WHERE s.path = ANY(%(paths)s) AND p.producer_id = ANY(%(pids)s)"
)
# The batch's payloads travel as one bytea and its numbers as comma-separated text, split
# server-side: adapting a Python list of N values costs Python work per element, under the GIL
# the request handlers need; joining strings and bytes does not.
_INSERT_MESSAGES = (
    "INSERT INTO ds_messages (stream_id, end_pos, data) "
    "SELECT v.sid, v.pos, substring(%(blob)s::bytea FROM v.start FOR v.len) "
    "FROM unnest(string_to_array(%(sids)s, ',')::bigint[], "
    "string_to_array(%(pos)s, ',')::bigint[], string_to_array(%(starts)s, ',')::int[], "
    "string_to_array(%(lens)s, ',')::int[]) AS v(sid, pos, start, len)"
)
_UPDATE_STREAMS = (
    "UPDATE ds_streams AS s SET tail = v.tail, closed = v.closed, "
    "closed_by_producer = v.cbp, closed_by_epoch = v.cbe, closed_by_seq = v.cbs, "
    "last_stream_seq = v.seq, accessed_ms = v.acc, expiry_ms = v.exp "
    "FROM unnest(%(ids)s::bigint[], %(tails)s::bigint[], %(closed)s::boolean[], "
    "%(cbp)s::text[], %(cbe)s::bigint[], %(cbs)s::bigint[], %(seq)s::text[], "
    "%(acc)s::bigint[], %(exp)s::bigint[]) "
    "AS v(id, tail, closed, cbp, cbe, cbs, seq, acc, exp) WHERE s.id = v.id"
)
_UPSERT_PRODUCERS = (
    "INSERT INTO ds_producers (stream_id, producer_id, epoch, last_seq, updated_ms) "
    "SELECT v.sid, v.pid, v.epoch, v.seq, %(now)s "
    "FROM unnest(%(sids)s::bigint[], %(pids)s::text[], %(epochs)s::bigint[], %(seqs)s::bigint[]) "
    "AS v(sid, pid, epoch, seq) "
    "ON CONFLICT (stream_id, producer_id) DO UPDATE SET epoch = excluded.epoch, "
    "last_seq = excluded.last_seq, updated_ms = excluded.updated_ms"
)
# The known way in one statement. Each write carries the state it was staged against: a stream
# row must still have the remembered tail and Stream-Seq (and be open and not deleted), a
# remembered producer its epoch and seq, and a producer believed new must not exist. The final
# SELECT divides by zero unless every write found its row as expected, which aborts the whole
# transaction (data-modifying WITH clauses all run, and all or nothing).
# Each CTE's rows travel as one JSON array of arrays, one text parameter encoded in C, where a
# Python list per column cost psycopg's list adapter Python work per element and per call (its
# type detection), most of the writer thread's own CPU at low load. Tuples rather than objects:
# cheaper to build, and a batch has a row per stream written.
_KNOWN_APPEND = (
    "WITH s AS ("
    "UPDATE ds_streams AS s SET tail = v.tail, last_stream_seq = v.seq, "
    "accessed_ms = v.acc, expiry_ms = v.exp "
    "FROM (SELECT (e->>0)::bigint AS id, (e->>1)::bigint AS was, (e->>2)::bigint AS tail, "
    "e->>3 AS wasseq, e->>4 AS seq, (e->>5)::bigint AS acc, (e->>6)::bigint AS exp "
    "FROM json_array_elements(%(streams)s::json) AS e) AS v "
    "WHERE s.id = v.id AND s.tail = v.was AND NOT s.closed AND NOT s.soft_deleted "
    "AND s.last_stream_seq IS NOT DISTINCT FROM v.wasseq RETURNING 1), "
    "pu AS ("
    "UPDATE ds_producers AS p SET epoch = v.epoch, last_seq = v.seq, updated_ms = %(now)s "
    "FROM (SELECT (e->>0)::bigint AS sid, e->>1 AS pid, (e->>2)::bigint AS epoch, "
    "(e->>3)::bigint AS seq, (e->>4)::bigint AS wasepoch, (e->>5)::bigint AS wasseq "
    "FROM json_array_elements(%(updated)s::json) AS e) AS v "
    "WHERE p.stream_id = v.sid AND p.producer_id = v.pid "
    "AND p.epoch = v.wasepoch AND p.last_seq = v.wasseq RETURNING 1), "
    "pi AS ("
    "INSERT INTO ds_producers (stream_id, producer_id, epoch, last_seq, updated_ms) "
    "SELECT v.sid, v.pid, v.epoch, v.seq, %(now)s "
    "FROM (SELECT (e->>0)::bigint AS sid, e->>1 AS pid, (e->>2)::bigint AS epoch, "
    "(e->>3)::bigint AS seq FROM json_array_elements(%(inserted)s::json) AS e) AS v "
    "ON CONFLICT (stream_id, producer_id) DO NOTHING RETURNING 1), "
    "m AS (INSERT INTO ds_messages (stream_id, end_pos, data) "
    "SELECT v.sid, v.pos, substring(%(blob)s::bytea FROM v.start FOR v.len) "
    "FROM unnest(string_to_array(%(sids)s, ',')::bigint[], "
    "string_to_array(%(pos)s, ',')::bigint[], string_to_array(%(starts)s, ',')::int[], "
    "string_to_array(%(lens)s, ',')::int[]) AS v(sid, pos, start, len)) "
    "SELECT 1 / ((SELECT count(*) FROM s) = %(ns)s AND (SELECT count(*) FROM pu) = %(npu)s "
    "AND (SELECT count(*) FROM pi) = %(npi)s)::int, "
    # The NOTIFYs for other processes' readers, in the same statement (a statement fewer per
    # batch); queued only if the transaction commits, as any NOTIFY.
    "(SELECT count(*) FROM (SELECT pg_notify('ds_append', n) "
    "FROM json_array_elements_text(%(notes)s::json) AS n) AS sent)"
)


class KnownState:
    """What this writer's own commits left in the database: stream rows by path and producer
    state by (stream id, producer id). Only the writer thread touches it."""

    def __init__(self, limit: int = KNOWN_LIMIT) -> None:
        self._limit = limit
        self.streams: dict[str, StreamState] = {}
        self.producers: dict[tuple[int, str], tuple[int, int]] = {}

    def forget_streams(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.streams.pop(path, None)

    def forget(self) -> None:
        self.streams.clear()
        self.producers.clear()

    def remember(
        self,
        states: Iterable[StreamState],
        producers: dict[tuple[int, str], tuple[int, int]],
        keys: Iterable[tuple[int, str]],
    ) -> None:
        if len(self.streams) >= self._limit or len(self.producers) >= self._limit:
            self.forget()
        for state in states:
            # Kept as given: each batch stages against its own copies (_stage_known) or states
            # fresh from the database, and nothing else holds them after the commit.
            self.streams[state.path] = state
        for key in keys:
            self.producers[key] = producers[key]


@dataclasses.dataclass(slots=True)
class _KnownBatch:
    staged: Staged
    was: dict[str, StreamState]  # by path: the remembered state each write is conditioned on
    was_producers: dict[tuple[int, str], tuple[int, int]]  # absent: believed new
    producers: dict[tuple[int, str], tuple[int, int]]  # after the batch


class PgBatches:
    """Commits batches of appends on a psycopg connection (in its own transaction)."""

    def __init__(self, hub: LiveHub) -> None:
        self._hub = hub
        self.known = KnownState()
        self.known_commits = 0  # batches committed the known way (tests read it)

    def commit(self, pg: psycopg.Connection[Any], appends: list[AppendOp], now: int) -> BatchResult:
        known = self._stage_known(appends, now)
        if known is not None:
            try:
                self._write_known(pg, known, now)
            except psycopg.Error as exc:
                if exc.sqlstate not in _RETRY_LOCKED:
                    raise
                pg.rollback()  # nothing open after an autocommit statement; kept for safety
                # Only this batch's streams are suspect (another replica wrote them); the
                # locked way below reads them afresh and remembers them again.
                self.known.forget_streams(known.was)
            else:
                self.known_commits += 1
                return known.staged.result()
        return self._commit_locked(pg, appends, now)

    # ------------------------------------------------------------------ the known way

    def _stage_known(self, appends: list[AppendOp], now: int) -> _KnownBatch | None:
        """The batch staged against remembered state; None when the known way does not apply:
        a stream not remembered, or any request that is not a plain accepted append (a close, a
        duplicate, an error), whose answer must come from locked state."""
        was: dict[str, StreamState] = {}
        states: dict[str, StreamState] = {}
        producer_state: dict[tuple[int, str], tuple[int, int]] = {}
        for op in appends:
            request = op.request
            if request.body is None or request.close:
                return None
            state = states.get(op.path)
            if state is None:
                remembered = self.known.streams.get(op.path)
                if remembered is None:
                    return None
                was[op.path] = remembered
                state = states[op.path] = remembered.copy()  # staging mutates it
            if request.producer is not None:
                key = (state.id, request.producer.id)
                remembered_producer = self.known.producers.get(key)
                if remembered_producer is not None:
                    producer_state[key] = remembered_producer
        was_producers = dict(producer_state)
        staged = stage_appends(appends, states, producer_state, now)
        # Each accepted append with a body stages one message; a refused one or a duplicate none.
        if len(staged.messages) != len(appends):
            return None
        return _KnownBatch(staged, was, was_producers, producer_state)

    def _write_known(self, pg: psycopg.Connection[Any], batch: _KnownBatch, now: int) -> None:
        staged = batch.staged
        dirty = list(staged.dirty.values())
        keys = sorted(staged.dirty_producers)
        updated = [k for k in keys if k in batch.was_producers]
        inserted = [k for k in keys if k not in batch.was_producers]
        after, before = batch.producers, batch.was_producers
        was = batch.was
        # In the columns' order in _KNOWN_APPEND.
        streams = [
            (
                s.id,
                was[s.path].tail,
                s.tail,
                was[s.path].last_stream_seq,
                s.last_stream_seq,
                s.accessed_ms,
                s.expiry_ms(),
            )
            for s in dirty
        ]
        producers_updated = [(*k, *after[k], *before[k]) for k in updated]
        producers_inserted = [(*k, *after[k]) for k in inserted]
        params: dict[str, Any] = {
            "streams": jsoncodec.dumps(streams).decode(),
            "updated": jsoncodec.dumps(producers_updated).decode(),
            "inserted": jsoncodec.dumps(producers_inserted).decode(),
            "ns": len(dirty),
            "npu": len(updated),
            "npi": len(inserted),
            "now": now,
            "notes": jsoncodec.dumps(self._hub.payloads(sorted(staged.dirty))).decode(),
            **message_params(staged.messages),
        }
        # One statement is its own transaction: sent in autocommit it commits as Postgres
        # answers it (durable before the reply, as a COMMIT is), with no BEGIN or COMMIT around
        # it. Against the same statement between BEGIN and COMMIT in a pipeline: one exchange
        # with the server instead of several, and fewer hand-backs of the GIL to this thread
        # (each costs up to the switch interval behind a busy loop). A lone append's commit
        # 0.75-0.86 -> 0.57-0.69 ms idle; a first token's commit inside the service at 50
        # sessions p50 2.3 -> 1.2 ms (docs/BENCHMARKS.md, session 12).
        pg.autocommit = True
        try:
            with pg.cursor() as cur:
                cur.execute(_KNOWN_APPEND, params)
        finally:
            pg.autocommit = False
        self.known.remember(dirty, after, keys)

    def _notify(self, cur: psycopg.Cursor[Any], staged: Staged) -> None:
        """Wake other processes' readers of the streams written, when the commit lands."""
        for payload in self._hub.payloads(sorted(staged.dirty)):
            cur.execute("SELECT pg_notify('ds_append', %(p)s)", {"p": payload})

    # ------------------------------------------------------------------ the locked way

    def _commit_locked(
        self, pg: psycopg.Connection[Any], appends: list[AppendOp], now: int
    ) -> BatchResult:
        """The same transaction in two round trips, with psycopg's pipeline mode: the stream rows
        (locked) and producer states come back together; then every write and the COMMIT go
        out together. On this hot path, round trips are most of a commit's latency."""
        paths = sorted({op.path for op in appends})
        pids = sorted({op.request.producer.id for op in appends if op.request.producer})
        with pg.pipeline() as pipeline, pg.cursor() as cur_streams, pg.cursor() as cur_prod:
            cur_streams.execute(_LOCK_STREAMS, {"paths": paths})
            if pids:
                cur_prod.execute(_PRODUCERS, {"paths": paths, "pids": pids})
            pipeline.sync()
            columns = [c.name for c in cur_streams.description or ()]
            states = {
                state.path: state
                for state in (
                    StreamState.from_row(_Row(dict(zip(columns, r, strict=True))))
                    for r in cur_streams.fetchall()
                )
            }
            producer_state: dict[tuple[int, str], tuple[int, int]] = {}
            if pids:
                producer_state = {(r[0], r[1]): (r[2], r[3]) for r in cur_prod.fetchall()}
            staged = stage_appends(appends, states, producer_state, now)
            if staged.messages:
                cur_streams.execute(_INSERT_MESSAGES, message_params(staged.messages))
            if staged.dirty:
                cur_streams.execute(_UPDATE_STREAMS, stream_arrays(staged.dirty))
            if staged.dirty_producers:
                keys = sorted(staged.dirty_producers)
                cur_streams.execute(
                    _UPSERT_PRODUCERS,
                    {
                        "sids": [k[0] for k in keys],
                        "pids": [k[1] for k in keys],
                        "epochs": [producer_state[k][0] for k in keys],
                        "seqs": [producer_state[k][1] for k in keys],
                        "now": now,
                    },
                )
            self._notify(cur_streams, staged)
            # Inside the pipeline: the COMMIT travels with the writes, one round trip.
            pg.commit()
        # What the database now holds: the streams written (the locked read plus this batch's
        # writes; a stream only read may have been touched in memory, not in the database) and
        # every producer state read or written.
        self.known.remember(staged.dirty.values(), producer_state, producer_state.keys())
        return staged.result()


def message_params(rows: list[dict[str, Any]]) -> dict[str, Any]:
    datas = [r["data"] for r in rows]
    starts: list[int] = []
    at = 1  # substring() counts from 1
    for data in datas:
        starts.append(at)
        at += len(data)
    return {
        "blob": b"".join(datas),
        "sids": ",".join(str(r["stream_id"]) for r in rows),
        "pos": ",".join(str(r["end_pos"]) for r in rows),
        "starts": ",".join(map(str, starts)),
        "lens": ",".join(str(len(d)) for d in datas),
    }


def stream_arrays(dirty: dict[int, StreamState]) -> dict[str, list[Any]]:
    states = list(dirty.values())
    return {
        "ids": [s.id for s in states],
        "tails": [s.tail for s in states],
        "closed": [s.closed for s in states],
        "cbp": [s.closed_by[0] if s.closed_by else None for s in states],
        "cbe": [s.closed_by[1] if s.closed_by else None for s in states],
        "cbs": [s.closed_by[2] if s.closed_by else None for s in states],
        "seq": [s.last_stream_seq for s in states],
        "acc": [s.accessed_ms for s in states],
        "exp": [s.expiry_ms() for s in states],
    }

"""Postgres batches in one round trip against remembered state (durable/pg_batch.py), and the
locked way whenever that memory is wrong: another writer on the same database (another replica)
appended, closed the stream, fenced a producer or used a producer id first. Two stores, each
with its own writer thread and memory, on one real database; nothing answered from a stale
memory may differ from what the locked way answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from db.engine import create_engine, normalize_database_url
from streams_service.durable.live import LiveHub
from streams_service.durable.model import AppendOutcome, AppendRequest, CreateRequest, Producer
from streams_service.durable.store import StreamStore
from streams_service.errors import AppError, Conflict, Forbidden
from tests.support import migrate, postgres_database

PATH = "pg-batch/stream"


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with postgres_database("chatops_pgbatch") as url:
        migrate(url)
        yield url


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[tuple[StreamStore, StreamStore]]:
    """Two stores (writer threads) on one database, and a fresh stream."""
    url = normalize_database_url(database_url)
    pair = []
    for _ in range(2):
        store = StreamStore(url, create_engine(url), LiveHub())
        await store.start()
        pair.append(store)
    a, b = pair
    if await _exists(a):
        await a.delete(PATH)  # the previous test's
    await a.create(PATH, CreateRequest(content_type="application/json"))
    try:
        yield a, b
    finally:
        for store in pair:
            await store.stop()


async def _exists(store: StreamStore, path: str = PATH) -> bool:
    try:
        await store.head(path)
    except AppError:
        return False
    return True


async def _append(
    store: StreamStore, value: object, producer: Producer | None = None, close: bool = False
) -> AppendOutcome:
    body = json.dumps([value]).encode()
    return await store.append(
        PATH,
        AppendRequest(body=body, content_type="application/json", producer=producer, close=close),
    )


async def _values(store: StreamStore) -> list[object]:
    result = await store.read(PATH, 0, 1 << 20)
    return [json.loads(data) for _, data in result.chunks]


async def test_appends_after_the_first_commit_against_remembered_state(
    stores: tuple[StreamStore, StreamStore],
) -> None:
    a, _ = stores
    before = a.writer.known_commits
    offsets = []
    for seq in range(5):
        outcome = await _append(a, seq, Producer("p", 0, seq))
        assert outcome.status == 200
        offsets.append(outcome.next_offset_pos)
    # The first append read the stream under lock; the other four went the known way.
    assert a.writer.known_commits - before == 4
    assert offsets == sorted(offsets) and len(set(offsets)) == 5
    assert await _values(a) == [0, 1, 2, 3, 4]
    # A retried append is still recognised as a duplicate (the locked way answers it).
    again = await _append(a, 4, Producer("p", 0, 4))
    assert again.status == 204 and again.next_offset_pos == offsets[-1]
    assert await _values(a) == [0, 1, 2, 3, 4]


async def test_another_writer_appending_sends_the_batch_the_locked_way(
    stores: tuple[StreamStore, StreamStore],
) -> None:
    a, b = stores
    await _append(a, "a0")
    await _append(a, "a1")  # a now remembers the stream
    # Behind a's back, and longer, so that a's next message would not even collide with this
    # one's end position: only the remembered tail's check can catch it.
    await _append(b, "b0-longer")
    known = a.writer.known_commits
    last = await _append(a, "a2")
    assert a.writer.known_commits == known  # the check failed; the locked way wrote it
    assert await _values(a) == ["a0", "a1", "b0-longer", "a2"]
    assert last.next_offset_pos == (await a.head(PATH)).tail
    await _append(a, "a3")
    assert a.writer.known_commits == known + 1  # remembered again
    assert await _values(b) == ["a0", "a1", "b0-longer", "a2", "a3"]


async def test_a_stream_closed_by_another_writer_refuses_the_append(
    stores: tuple[StreamStore, StreamStore],
) -> None:
    a, b = stores
    await _append(a, 1)
    await _append(a, 2)
    await b.append(PATH, AppendRequest(body=None, content_type=None, close=True))
    with pytest.raises(Conflict, match="closed"):
        await _append(a, 3)
    assert await _values(a) == [1, 2]


@pytest.mark.parametrize("how", ["append", "producer row only"])
async def test_a_producer_fenced_by_another_writer_is_refused(
    stores: tuple[StreamStore, StreamStore], database_url: str, how: str
) -> None:
    a, b = stores
    await _append(a, "old-0", Producer("gen", 0, 0))
    await _append(a, "old-1", Producer("gen", 0, 1))
    expected = ["old-0", "old-1"]
    if how == "append":
        await _append(b, "new-0", Producer("gen", 1, 0))  # a new epoch fences epoch 0
        expected.append("new-0")
    else:
        # The producer's row alone changed (the stream's tail is as a remembers it), so only
        # the producer's own check can catch it.
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE ds_producers SET epoch = 1, last_seq = 0 WHERE producer_id = 'gen'"
            )
    with pytest.raises(Forbidden, match="stale producer epoch"):
        await _append(a, "old-2", Producer("gen", 0, 2))
    assert await _values(a) == expected


async def test_a_producer_believed_new_that_exists_is_checked(
    stores: tuple[StreamStore, StreamStore], database_url: str
) -> None:
    a, _ = stores
    await _append(a, "x")
    await _append(a, "y")  # a remembers the stream; producer "late" is unknown to it
    stream_id = (await a.head(PATH)).id
    # Another replica's producer state, written without changing the stream's tail.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ds_producers (stream_id, producer_id, epoch, last_seq, updated_ms) "
            "VALUES (%s, 'late', 0, 0, 0)",
            (stream_id,),
        )
    outcome = await _append(a, "late-0", Producer("late", 0, 0))
    # Seq 0 was already taken: a duplicate, nothing written.
    assert outcome.status == 204
    assert await _values(a) == ["x", "y"]
    accepted = await _append(a, "late-1", Producer("late", 0, 1))
    assert accepted.status == 200
    assert await _values(a) == ["x", "y", "late-1"]


async def test_a_stream_deleted_and_created_again_is_not_mistaken_for_the_old_one(
    stores: tuple[StreamStore, StreamStore],
) -> None:
    a, _ = stores
    await _append(a, "old-1")
    await _append(a, "old-2")  # remembered, under the old stream's id
    await a.delete(PATH)
    await a.create(PATH, CreateRequest(content_type="application/json"))
    first = await _append(a, "new")
    assert await _values(a) == ["new"]
    assert first.next_offset_pos == (await a.head(PATH)).tail


async def test_a_failed_check_forgets_only_the_streams_it_wrote(
    stores: tuple[StreamStore, StreamStore],
) -> None:
    a, b = stores
    other = f"{PATH}-other"
    if await _exists(a, other):
        await a.delete(other)
    await a.create(other, CreateRequest(content_type="application/json"))
    for value in ("a", "b"):  # both streams remembered by a
        await _append(a, value)
        await a.append(other, AppendRequest(body=b'["x"]', content_type="application/json"))
    await _append(b, "behind a's back")
    await _append(a, "c")  # the check fails: the locked way
    known = a.writer.known_commits
    await a.append(other, AppendRequest(body=b'["y"]', content_type="application/json"))
    assert a.writer.known_commits == known + 1  # still remembered
    assert await _values(a) == ["a", "b", "behind a's back", "c"]

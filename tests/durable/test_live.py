"""A channel answers a reader from memory only with exactly what the database would return."""

from __future__ import annotations

import asyncio
import contextlib

from streams_service.durable.live import RECENT_UPDATES, Channel, TailUpdate
from streams_service.durable.model import StreamState


def _state(tail: int) -> StreamState:
    return StreamState(
        id=1,
        path="/s",
        content_type="application/json",
        tail=tail,
        closed=False,
        closed_by=None,
        last_stream_seq=None,
        ttl_seconds=None,
        expires_at_raw=None,
        expires_at_ms=None,
        created_ms=0,
        accessed_ms=0,
        forked_from_id=None,
        forked_from_path=None,
        fork_pos=None,
        fork_sub_offset=None,
        ref_count=0,
        soft_deleted=False,
    )


def _commit(start: int, *pieces: bytes) -> TailUpdate:
    """One commit appending `pieces` from `start` (end positions as the writer reports them)."""
    chunks = []
    position = start
    for piece in pieces:
        position += len(piece)
        chunks.append((position, piece))
    return TailUpdate(_state(position), chunks)


def test_one_commit_behind_is_read_from_memory() -> None:
    channel = Channel()
    channel.changed(_commit(0, b"ab", b"cd"))
    result = channel.cached_read(0, 0, 1000)
    assert result is not None
    assert result.chunks == [(2, b"ab"), (4, b"cd")]
    assert result.next_pos == 4 and result.up_to_date
    # From inside the commit: only what follows the reader's position.
    inside = channel.cached_read(0, 2, 1000)
    assert inside is not None and inside.chunks == [(4, b"cd")]


def test_several_commits_behind_are_joined_in_order() -> None:
    channel = Channel()
    channel.changed(_commit(0, b"a"))
    seen = channel.version
    channel.changed(_commit(1, b"bb"))
    channel.changed(_commit(3, b"ccc", b"d"))
    channel.changed(_commit(7, b"ee"))
    result = channel.cached_read(seen, 1, 1000)
    assert result is not None
    assert result.chunks == [(3, b"bb"), (6, b"ccc"), (7, b"d"), (9, b"ee")]
    assert result.next_pos == 9 and result.state.tail == 9 and result.up_to_date


def test_a_gap_between_commits_goes_to_the_database() -> None:
    # Another process appended 3..5 between this process's two commits; its NOTIFY has not
    # arrived yet, so nothing here says so except the positions.
    channel = Channel()
    channel.changed(_commit(0, b"abc"))
    channel.changed(_commit(5, b"fg"))
    assert channel.cached_read(0, 0, 1000) is None
    # The newest commit alone is still served to a reader standing at its start.
    assert channel.cached_read(1, 5, 1000) is not None
    assert channel.cached_read(1, 3, 1000) is None


def test_a_change_made_elsewhere_or_forgotten_goes_to_the_database() -> None:
    channel = Channel()
    channel.changed(_commit(0, b"a"))
    channel.changed(None)  # a NOTIFY from another process: what it appended is unknown
    channel.changed(_commit(2, b"c"))
    assert channel.cached_read(0, 0, 1000) is None
    assert channel.cached_read(2, 2, 1000) is not None

    channel = Channel()
    for i in range(RECENT_UPDATES + 1):
        channel.changed(_commit(i, b"x"))
    assert channel.cached_read(0, 0, 1000) is None  # one more behind than remembered
    oldest_kept = channel.cached_read(1, 1, 1000)
    assert oldest_kept is not None and oldest_kept.next_pos == RECENT_UPDATES + 1


def test_a_read_larger_than_allowed_goes_to_the_database() -> None:
    channel = Channel()
    channel.changed(_commit(0, b"aaaa"))
    channel.changed(_commit(4, b"bbbb"))
    assert channel.cached_read(0, 0, 7) is None
    assert channel.cached_read(0, 0, 8) is not None


def test_nothing_changed_nothing_cached() -> None:
    channel = Channel()
    assert channel.cached_read(0, 0, 1000) is None
    channel.changed(_commit(0, b"a"))
    assert channel.cached_read(1, 1, 1000) is None  # the reader has seen everything


async def test_a_change_wakes_every_waiting_reader_at_once() -> None:
    channel = Channel()
    waits = [asyncio.create_task(channel.wait(0, 30)) for _ in range(3)]
    await asyncio.sleep(0)
    assert channel.waiting == 3
    channel.changed(_commit(0, b"a"))
    await asyncio.wait_for(asyncio.gather(*waits), 1)  # a hang guard: they wake on the change
    assert channel.waiting == 0


async def test_a_wait_ends_after_its_own_time_and_leaves_nothing_behind() -> None:
    channel = Channel()
    long_wait = asyncio.create_task(channel.wait(0, 30))
    await channel.wait(0, 0.01)  # returns by itself, nothing changed
    assert channel.version == 0
    assert channel.waiting == 1  # the other reader still waits
    channel.changed(None)
    await asyncio.wait_for(long_wait, 1)
    assert channel.waiting == 0


async def test_a_cancelled_reader_does_not_disturb_the_others() -> None:
    channel = Channel()
    cancelled = asyncio.create_task(channel.wait(0, 30))
    other = asyncio.create_task(channel.wait(0, 30))
    await asyncio.sleep(0)
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    assert channel.waiting == 1
    channel.changed(None)
    await asyncio.wait_for(other, 1)


async def test_a_reader_already_behind_does_not_wait() -> None:
    channel = Channel()
    channel.changed(None)
    await asyncio.wait_for(channel.wait(0, 30), 1)
    assert channel.waiting == 0

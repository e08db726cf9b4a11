"""Crash safety: kill -9 the server under concurrent appends; nothing acknowledged may be lost.

"Acknowledged means durable" (DESIGN §2): once a client has a 2xx for an append, a crash of the
server process must not lose it, duplicate it or reorder it. Each test runs a real `chatops serve`,
drives it with 16 concurrent writers (each sequential: message n+1 is sent only after message n
was acknowledged), SIGKILLs the process once enough appends were acknowledged (a count, not a
time), restarts a fresh process on the same database and reads the stream back.

What a request caught in flight by the kill did is unknown: it may or may not have been committed.
The tests allow both, but never a duplicate, and never a message nobody sent.

With idempotent producers the in-flight request is retried after the restart with the same
(Producer-Id, Epoch, Seq): it must land exactly once, as a 200 if the crash lost it and as a 204
duplicate if it had been committed.

Note: SIGKILL of the server process leaves the OS page cache intact, so these tests prove the
server acknowledges only after its transaction committed; they do not simulate power loss.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ServerProcess, tail

WRITERS = 16
# Kill once this many appends have been acknowledged (count-based, never time-based).
KILL_AFTER_ACKS = 300
# Hang guards only: nothing asserts on how long anything takes.
HANG_GUARD_S = 60.0
MAX_PER_WRITER = 5_000
JSON_HEADERS = {"Content-Type": "application/json"}

Key = tuple[int, int]  # (writer, n)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[str, str], ServerProcess]]:
    """Start `chatops serve` processes; whatever is still running is stopped at teardown."""
    started: list[ServerProcess] = []

    def _spawn(fresh_database_url: str, name: str) -> ServerProcess:
        server = ServerProcess(fresh_database_url, tmp_path, name)
        started.append(server)
        return server.start()

    yield _spawn
    for server in reversed(started):
        server.stop()


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Ack:
    writer: int
    n: int
    offset: str
    status: int


@dataclass
class Run:
    """What the writers observed before and at the kill."""

    acked: list[Ack] = field(default_factory=list)
    # writer -> the n whose request was cut off by the kill (its fate is unknown)
    in_flight: dict[int, int] = field(default_factory=dict)
    # responses that were neither an acknowledgement nor a transport error
    unexpected: list[str] = field(default_factory=list)
    enough: asyncio.Event = field(default_factory=asyncio.Event)

    def acked_keys(self) -> set[Key]:
        return {(a.writer, a.n) for a in self.acked}


def producer_headers(writer: int, n: int) -> dict[str, str]:
    return {
        **JSON_HEADERS,
        "Producer-Id": f"crash-producer-{writer}",
        "Producer-Epoch": "0",
        "Producer-Seq": str(n),
    }


async def post_message(
    client: httpx.AsyncClient, url: str, writer: int, n: int, *, producer: bool
) -> httpx.Response:
    headers = producer_headers(writer, n) if producer else JSON_HEADERS
    return await client.post(url, json={"w": writer, "n": n}, headers=headers)


async def writer_loop(
    client: httpx.AsyncClient, url: str, writer: int, run: Run, *, producer: bool
) -> None:
    """Append {"w": writer, "n": n} for n = 0, 1, ... one at a time until the server dies."""
    # A producer's new data is a 200; a plain append is a 204 (protocol §1.6, §1.2).
    expected = 200 if producer else 204
    for n in range(MAX_PER_WRITER):
        try:
            response = await post_message(client, url, writer, n, producer=producer)
        except httpx.TransportError:
            # The kill: this request may or may not have been committed.
            run.in_flight[writer] = n
            return
        if response.status_code != expected:
            run.unexpected.append(
                f"writer {writer} n={n}: {response.status_code} {response.text[:200]}"
            )
            return
        offset = response.headers.get("Stream-Next-Offset")
        if not offset:
            run.unexpected.append(f"writer {writer} n={n}: no Stream-Next-Offset on the ack")
            return
        run.acked.append(Ack(writer, n, offset, response.status_code))
        if len(run.acked) >= KILL_AFTER_ACKS:
            run.enough.set()


async def drive_until_kill(server: ServerProcess, url: str, *, producer: bool) -> Run:
    """Run WRITERS concurrent writers, SIGKILL the server once KILL_AFTER_ACKS appends were
    acknowledged, and wait for every writer to notice."""
    run = Run()
    limits = httpx.Limits(max_connections=WRITERS * 2, max_keepalive_connections=WRITERS * 2)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        writers = asyncio.gather(
            *(writer_loop(client, url, w, run, producer=producer) for w in range(WRITERS))
        )
        enough = asyncio.ensure_future(run.enough.wait())
        await asyncio.wait(
            {writers, enough}, timeout=HANG_GUARD_S, return_when=asyncio.FIRST_COMPLETED
        )
        enough.cancel()
        if not run.enough.is_set():
            server.kill()
            await asyncio.wait({writers}, timeout=HANG_GUARD_S)
            pytest.fail(
                f"only {len(run.acked)} appends were acknowledged before the writers stopped; "
                f"unexpected responses: {run.unexpected[:5]}\n"
                f"--- server stderr ---\n{tail(server.stderr_path)}"
            )
        # The crash, while (nearly) every writer has a request in flight.
        server.kill()
        done, _ = await asyncio.wait({writers}, timeout=HANG_GUARD_S)
        assert done, "writers did not stop after the server was killed"
        writers.result()
    assert not run.unexpected, (
        "the server answered appends with something other than an acknowledgement before the "
        f"kill: {run.unexpected[:5]}\n--- server stderr ---\n{tail(server.stderr_path)}"
    )
    assert len(run.acked) >= KILL_AFTER_ACKS
    assert sorted(run.in_flight) == list(range(WRITERS)), (
        "every writer should end on a transport error caused by the kill; "
        f"writers that did not: {sorted(set(range(WRITERS)) - set(run.in_flight))}"
    )
    return run


async def read_all(
    client: httpx.AsyncClient, url: str, offset: str = "-1"
) -> tuple[list[Any], str]:
    """Catch-up read from `offset` to the tail, following Stream-Next-Offset until
    Stream-Up-To-Date. Returns the messages and the final offset."""
    items: list[Any] = []
    for _ in range(10_000):
        response = await client.get(url, params={"offset": offset})
        assert response.status_code == 200, (
            f"GET ?offset={offset}: {response.status_code} {response.text[:300]}"
        )
        body = response.json()
        assert isinstance(body, list), f"a JSON stream read must be an array, got {body!r}"
        items.extend(body)
        next_offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date") == "true":
            return items, next_offset
        assert body, f"a partial read from {offset} returned nothing and is not up to date"
        assert next_offset > offset or offset == "-1", "Stream-Next-Offset did not advance"
        offset = next_offset
    pytest.fail("the read never reached Stream-Up-To-Date")


def keys_of(items: list[Any]) -> list[Key]:
    keys: list[Key] = []
    for item in items:
        assert isinstance(item, dict) and set(item) == {"w", "n"}, f"unexpected message {item!r}"
        keys.append((item["w"], item["n"]))
    return keys


def assert_log_consistent(stream: list[Key], run: Run) -> None:
    """The invariants that hold after a crash, whatever the in-flight requests did."""
    counts = Counter(stream)
    duplicates = sorted(k for k, c in counts.items() if c > 1)
    assert not duplicates, f"messages stored more than once: {duplicates[:10]}"

    acked = run.acked_keys()
    missing = sorted(acked - counts.keys())
    assert not missing, (
        f"{len(missing)} acknowledged appends are missing after the crash: {missing[:10]} "
        f"(stream has {len(stream)} messages, {len(acked)} were acknowledged)"
    )

    phantom = [k for k in stream if k not in acked and run.in_flight.get(k[0]) != k[1]]
    assert not phantom, f"messages that were never sent or never in flight: {phantom[:10]}"

    for writer in range(WRITERS):
        ns = [n for w, n in stream if w == writer]
        # Each writer sent n only after n-1 was acknowledged, so its messages are 0..k in order.
        assert ns == list(range(len(ns))), f"writer {writer}'s messages out of order: {ns}"
        acked_count = sum(1 for a in run.acked if a.writer == writer)
        assert acked_count <= len(ns) <= acked_count + 1

    offsets = [a.offset for a in run.acked]
    assert len(set(offsets)) == len(offsets), "two acknowledged appends share an offset"
    position = {k: i for i, k in enumerate(stream)}
    by_offset = [(a.writer, a.n) for a in sorted(run.acked, key=lambda a: a.offset)]
    by_stream = sorted(acked, key=position.__getitem__)
    assert by_offset == by_stream, (
        "ordering acknowledged appends by their Stream-Next-Offset does not give stream order"
    )


async def assert_resume_offsets(
    client: httpx.AsyncClient, url: str, stream: list[Key], run: Run
) -> None:
    """Resuming from an acknowledged append's Stream-Next-Offset yields exactly what follows it."""
    position = {k: i for i, k in enumerate(stream)}
    ordered = sorted(run.acked, key=lambda a: a.offset)
    step = max(1, len(ordered) // 12)
    for ack in [*ordered[::step], ordered[-1]]:
        items, _ = await read_all(client, url, ack.offset)
        expected = stream[position[(ack.writer, ack.n)] + 1 :]
        assert keys_of(items) == expected, (
            f"resuming at {ack.offset} (after w={ack.writer} n={ack.n}) did not return exactly "
            "the messages after it"
        )


async def create_stream(client: httpx.AsyncClient, url: str) -> None:
    response = await client.put(url, headers=JSON_HEADERS)
    assert response.status_code == 201, f"PUT {url}: {response.status_code} {response.text}"


def stream_url(server: ServerProcess, path: str) -> str:
    return f"{server.base_url}/v1/stream/{path}"


# --------------------------------------------------------------------------- tests


async def test_acknowledged_appends_survive_sigkill(
    fresh_database_url: str, spawn: Callable[[str, str], ServerProcess]
) -> None:
    path = f"crash/plain-{secrets.token_hex(4)}"
    before = spawn(fresh_database_url, "before-crash")
    async with httpx.AsyncClient(timeout=30.0) as client:
        await create_stream(client, stream_url(before, path))

    run = await drive_until_kill(before, stream_url(before, path), producer=False)

    after = spawn(fresh_database_url, "after-crash")
    url = stream_url(after, path)
    async with httpx.AsyncClient(timeout=30.0) as client:
        items, tail_offset = await read_all(client, url)
        stream = keys_of(items)
        assert_log_consistent(stream, run)
        await assert_resume_offsets(client, url, stream, run)

        highest_ack = max(a.offset for a in run.acked)
        head = await client.head(url)
        assert head.status_code == 200
        assert head.headers["Stream-Next-Offset"] == tail_offset
        assert tail_offset >= highest_ack

        # The stream still takes appends, and they go after everything acknowledged.
        response = await client.post(url, json={"w": 99, "n": 0}, headers=JSON_HEADERS)
        assert response.status_code == 204, response.text
        new_offset = response.headers["Stream-Next-Offset"]
        assert new_offset > tail_offset >= highest_ack
        items_after, final_offset = await read_all(client, url)
        assert items_after == [*items, {"w": 99, "n": 0}]
        assert final_offset == new_offset


async def test_idempotent_producer_retry_after_sigkill_lands_exactly_once(
    fresh_database_url: str, spawn: Callable[[str, str], ServerProcess]
) -> None:
    """Sixteen idempotent producers (one request per seq); each one's request cut off by the kill
    is retried after the restart with the same (id, epoch, seq)."""
    path = f"crash/producers-{secrets.token_hex(4)}"
    before = spawn(fresh_database_url, "before-crash")
    async with httpx.AsyncClient(timeout=30.0) as client:
        await create_stream(client, stream_url(before, path))

    run = await drive_until_kill(before, stream_url(before, path), producer=True)

    after = spawn(fresh_database_url, "after-crash")
    url = stream_url(after, path)
    async with httpx.AsyncClient(timeout=30.0) as client:
        items, _ = await read_all(client, url)
        stream = keys_of(items)
        assert_log_consistent(stream, run)
        await assert_resume_offsets(client, url, stream, run)
        highest_ack = max(a.offset for a in run.acked)

        outcomes: dict[int, int] = {}
        for writer, seq in sorted(run.in_flight.items()):
            committed_before = (writer, seq) in stream
            if seq > 0:
                # Repeating an acknowledged request after the crash is a duplicate, not a second
                # copy; the 204 names the highest seq the (recovered) producer state accepted,
                # which must agree with what the log holds.
                repeat = await post_message(client, url, writer, seq - 1, producer=True)
                assert repeat.status_code == 204, (
                    f"producer {writer}: repeating acknowledged seq {seq - 1} after the crash "
                    f"gave {repeat.status_code} {repeat.text[:200]}"
                )
                highest = seq if committed_before else seq - 1
                assert repeat.headers.get("Producer-Seq") == str(highest), (
                    f"producer {writer}: the recovered state's highest seq disagrees with the "
                    f"log (in-flight seq {seq} {'is' if committed_before else 'is not'} in it)"
                )

            retry = await post_message(client, url, writer, seq, producer=True)
            outcomes[writer] = retry.status_code
            if committed_before:
                assert retry.status_code == 204, (
                    f"producer {writer} seq {seq} was committed before the crash; its retry must "
                    f"be a 204 duplicate, got {retry.status_code} {retry.text[:200]}"
                )
            else:
                assert retry.status_code == 200, (
                    f"producer {writer} seq {seq} was lost in the crash; its retry must be "
                    f"accepted with 200, got {retry.status_code} {retry.text[:200]}"
                )
                assert retry.headers["Stream-Next-Offset"] > highest_ack
            # Either way the highest accepted seq is now the retried one.
            assert retry.headers.get("Producer-Seq") == str(seq)
            assert retry.headers.get("Producer-Epoch") == "0"

            # And the producer carries on where it left off.
            following = await post_message(client, url, writer, seq + 1, producer=True)
            assert following.status_code == 200, f"{following.status_code} {following.text[:200]}"

        final_items, _ = await read_all(client, url)
        final = keys_of(final_items)
        assert len(set(final)) == len(final), "a retry or repeat stored a second copy"
        for writer, seq in run.in_flight.items():
            ns = [n for w, n in final if w == writer]
            assert ns == list(range(seq + 2)), (
                f"producer {writer} after its retry (seq {seq}) and seq {seq + 1}: {ns}"
            )
        # Nothing already there moved: the old log is a prefix of the new one.
        assert final[: len(stream)] == stream
        # Shows up under `pytest -rP`: which branch each in-flight retry took.
        print(f"in-flight retries: {Counter(outcomes.values())} (200 = lost, 204 = committed)")

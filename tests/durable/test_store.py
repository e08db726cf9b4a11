"""Store semantics on real SQLite and Postgres: offsets, resume, group commit, forks, expiry."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI

from streams_service.app import Services, create_app
from streams_service.config import Settings
from streams_service.durable.offsets import parse_offset

JSON = {"Content-Type": "application/json"}


def _services(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


async def _pages(client: httpx.AsyncClient, url: str, offset: str = "-1") -> list[httpx.Response]:
    """Follow Stream-Next-Offset until Stream-Up-To-Date, the way a resuming client does."""
    pages: list[httpx.Response] = []
    for _ in range(10_000):
        response = await client.get(url, params={"offset": offset})
        assert response.status_code == 200, response.text
        pages.append(response)
        offset = response.headers["stream-next-offset"]
        if response.headers.get("stream-up-to-date") == "true":
            return pages
    raise AssertionError("never reached the tail")


async def _read_all(client: httpx.AsyncClient, url: str, offset: str = "-1") -> list[object]:
    return [value for page in await _pages(client, url, offset) for value in page.json()]


async def _read_bytes(client: httpx.AsyncClient, url: str, offset: str) -> bytes:
    return b"".join(page.content for page in await _pages(client, url, offset))


async def test_offsets_strictly_increase_and_resume_without_loss_or_duplicates(
    client: httpx.AsyncClient, stream_url: str
) -> None:
    assert (await client.put(stream_url, headers=JSON)).status_code == 201
    offsets: list[str] = []
    for n in range(20):
        response = await client.post(stream_url, headers=JSON, content=json.dumps({"n": n}))
        assert response.status_code == 204
        offsets.append(response.headers["stream-next-offset"])
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert [parse_offset(o) for o in offsets] == sorted(parse_offset(o) for o in offsets)
    # Resuming from the offset acknowledged for message k yields exactly messages k+1...
    for k, offset in enumerate(offsets):
        rest = await _read_all(client, stream_url, offset)
        assert rest == [{"n": n} for n in range(k + 1, 20)]


async def test_small_read_budget_paginates_exactly_once(
    settings: Settings, stream_url: str
) -> None:
    """With a 8 KiB read budget, 60 messages of ~3 KB take many reads; following
    Stream-Next-Offset yields each exactly once, and each partial page says it is not the tail."""
    small = create_app(settings.model_copy(update={"streams_max_read_bytes": 8192}))
    async with small.router.lifespan_context(small):
        transport = httpx.ASGITransport(app=small)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.put(stream_url, headers=JSON)).status_code == 201
            big = "x" * 3000
            batch = json.dumps([{"n": n, "pad": big} for n in range(50)])
            assert (await client.post(stream_url, headers=JSON, content=batch)).status_code == 204
            for n in range(50, 60):
                body = json.dumps({"n": n, "pad": big})
                assert (
                    await client.post(stream_url, headers=JSON, content=body)
                ).status_code == 204
            first = await client.get(stream_url, params={"offset": "-1"})
            # The 50-value batch is one append: bigger than the budget, so it comes whole.
            assert len(first.json()) == 50
            assert "stream-up-to-date" not in first.headers
            second = await client.get(
                stream_url, params={"offset": first.headers["stream-next-offset"]}
            )
            assert 1 <= len(second.json()) <= 3
            values = await _read_all(client, stream_url)
    assert [v["n"] for v in values] == list(range(60))  # type: ignore[index]


async def test_json_arrays_flatten_exactly_one_level(
    client: httpx.AsyncClient, stream_url: str
) -> None:
    await client.put(stream_url, headers=JSON, content=b"[]")
    await client.post(stream_url, headers=JSON, content=b'[[1,2],{"a":[3]}]')
    await client.post(stream_url, headers=JSON, content=b'"\\u00e9t\\u00e9"')
    assert await _read_all(client, stream_url) == [[1, 2], {"a": [3]}, "été"]


async def test_concurrent_appends_share_transactions(
    client: httpx.AsyncClient, stream_url: str, app: FastAPI
) -> None:
    """Group commit: 200 concurrent appends are all acknowledged with distinct offsets, in fewer
    transactions than appends, and the stream order matches the acknowledged offsets."""
    store = _services(app).store
    assert (await client.put(stream_url, headers=JSON)).status_code == 201
    batches_before = store.batches_committed

    async def append(n: int) -> tuple[int, str]:
        response = await client.post(stream_url, headers=JSON, content=json.dumps({"n": n}))
        assert response.status_code == 204
        return n, response.headers["stream-next-offset"]

    acked = await asyncio.gather(*(append(n) for n in range(200)))
    batches = store.batches_committed - batches_before
    assert batches < 200, f"{batches} transactions for 200 concurrent appends"
    assert len({offset for _, offset in acked}) == 200
    by_offset = [n for n, _ in sorted(acked, key=lambda pair: pair[1])]
    assert [v["n"] for v in await _read_all(client, stream_url)] == by_offset  # type: ignore[index]


async def test_a_rejected_append_in_a_batch_leaves_the_others_intact(
    client: httpx.AsyncClient, stream_url: str
) -> None:
    assert (await client.put(stream_url, headers=JSON)).status_code == 201
    bodies = [b'{"ok":1}', b"{broken", b'{"ok":2}', b"[]", b'{"ok":3}']
    responses = await asyncio.gather(
        *(client.post(stream_url, headers=JSON, content=b) for b in bodies)
    )
    assert [r.status_code for r in responses] == [204, 400, 204, 400, 204]
    assert sorted(v["ok"] for v in await _read_all(client, stream_url)) == [1, 2, 3]  # type: ignore[index]


async def test_long_poll_wakes_on_append_without_polling(
    client: httpx.AsyncClient, stream_url: str, app: FastAPI
) -> None:
    created = await client.put(stream_url, headers=JSON)
    tail = created.headers["stream-next-offset"]
    hub = _services(app).hub
    poll = asyncio.create_task(client.get(stream_url, params={"offset": tail, "live": "long-poll"}))
    # Wait until the reader is registered with the hub, then write.
    for _ in range(200):
        if hub.waiting_streams:
            break
        await asyncio.sleep(0.01)
    assert hub.waiting_streams == 1
    appended = await client.post(stream_url, headers=JSON, content=b'{"hello":"world"}')
    response = await poll
    assert response.status_code == 200
    assert response.json() == [{"hello": "world"}]
    assert response.headers["stream-next-offset"] == appended.headers["stream-next-offset"]
    assert response.headers["stream-cursor"].isdigit()


async def test_fork_shares_history_and_soft_delete_cascades(
    client: httpx.AsyncClient, stream_url: str
) -> None:
    source, fork = stream_url, stream_url + "-fork"
    await client.put(source, headers=JSON, content=b'[{"n":0},{"n":1}]')
    mid = (await client.post(source, headers=JSON, content=b'{"n":2}')).headers[
        "stream-next-offset"
    ]
    await client.post(source, headers=JSON, content=b'{"n":3}')
    created = await client.put(
        fork, headers={"Stream-Forked-From": source, "Stream-Fork-Offset": mid}
    )
    assert created.status_code == 201
    assert created.headers["stream-next-offset"] == mid
    await client.post(fork, headers=JSON, content=b'{"f":1}')
    assert await _read_all(client, fork) == [{"n": 0}, {"n": 1}, {"n": 2}, {"f": 1}]
    assert await _read_all(client, source) == [{"n": n} for n in range(4)]

    # Deleting a source that a fork reads through hides it (410) but keeps the fork whole.
    assert (await client.delete(source)).status_code == 204
    assert (await client.get(source)).status_code == 410
    assert (await client.put(source, headers=JSON)).status_code == 409
    assert await _read_all(client, fork) == [{"n": 0}, {"n": 1}, {"n": 2}, {"f": 1}]
    # Deleting the last fork removes the soft-deleted source for good: the path is free again.
    assert (await client.delete(fork)).status_code == 204
    assert (await client.get(source)).status_code == 404
    assert (await client.put(source, headers=JSON)).status_code == 201


async def test_revive_shows_a_hidden_source_again_and_nothing_else(
    client: httpx.AsyncClient, stream_url: str, app: FastAPI
) -> None:
    store = _services(app).store
    path = stream_url.removeprefix("/v1/stream/")
    source, fork = stream_url, stream_url + "-fork"
    await client.put(source, headers=JSON, content=b'[{"n":0}]')
    at = (await client.post(source, headers=JSON, content=b'{"n":1}')).headers["stream-next-offset"]
    await client.put(fork, headers={"Stream-Forked-From": source, "Stream-Fork-Offset": at})
    assert not await store.revive(path)  # live: nothing to undo
    assert (await client.delete(source)).status_code == 204
    assert (await client.get(source)).status_code == 410
    assert await store.revive(path)
    # Back whole, appendable, and still the fork's source.
    assert await _read_all(client, source) == [{"n": 0}, {"n": 1}]
    assert (await client.post(source, headers=JSON, content=b'{"n":2}')).status_code == 204
    assert await _read_all(client, fork) == [{"n": 0}, {"n": 1}]
    # A stream deleted outright (no fork reads it) cannot come back.
    assert (await client.delete(fork)).status_code == 204
    assert (await client.delete(source)).status_code == 204
    assert (await client.get(source)).status_code == 404
    assert not await store.revive(path)
    # Nor can one hidden after its own expiry passed.
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    await client.put(source, headers={**JSON, "Stream-Expires-At": soon})
    await client.put(fork, headers={"Stream-Forked-From": source, "Stream-Fork-Offset": "-1"})
    assert (await client.delete(source)).status_code == 204
    await asyncio.sleep(1.1)
    assert not await store.revive(path)
    assert (await client.get(source)).status_code in (404, 410)


async def test_sweeper_removes_expired_streams_and_keeps_sources_of_forks(
    client: httpx.AsyncClient, stream_url: str, app: FastAPI
) -> None:
    store = _services(app).store
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    expired, kept = stream_url + "-expired", stream_url + "-kept"
    assert (
        await client.put(expired, headers={**JSON, "Stream-Expires-At": past})
    ).status_code == 201
    assert (
        await client.put(kept, headers={**JSON, "Stream-Expires-At": future})
    ).status_code == 201
    assert (await client.get(expired)).status_code == 404
    before = await store.count_streams()
    removed = await store.sweep()
    assert removed >= 1
    assert await store.count_streams() <= before - 1
    assert (await client.head(kept)).status_code == 200
    # The expired path can be created afresh.
    assert (await client.put(expired, headers=JSON)).status_code == 201


async def test_idempotent_producer_retry_lands_once(
    client: httpx.AsyncClient, stream_url: str
) -> None:
    await client.put(stream_url, headers=JSON)
    headers = {**JSON, "Producer-Id": "gen-1", "Producer-Epoch": "0", "Producer-Seq": "0"}
    first = await client.post(stream_url, headers=headers, content=b'{"once":true}')
    retry = await client.post(stream_url, headers=headers, content=b'{"once":true}')
    assert first.status_code == 200 and retry.status_code == 204
    assert retry.headers["producer-seq"] == "0"
    assert await _read_all(client, stream_url) == [{"once": True}]


async def test_binary_messages_read_back_exactly_from_every_offset(
    settings: Settings, stream_url: str
) -> None:
    """Octet messages holding every byte value, some bigger than the read budget (each then
    comes alone) and some several to a page, read back byte for byte from every acknowledged
    offset; and a fork, read across its fork point (the source's messages, then its own) and
    from past it (its own only)."""
    octet = {"Content-Type": "application/octet-stream"}
    every_byte = bytes(range(256))
    sizes = [1, 300, 5000, 17, 4096, 9000, 256, 2, 4097, 700]
    payloads = [(every_byte * (n // 256 + 1))[i % 256 :][:n] for i, n in enumerate(sizes)]
    small = create_app(settings.model_copy(update={"streams_max_read_bytes": 4096}))

    async with small.router.lifespan_context(small):
        transport = httpx.ASGITransport(app=small)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.put(stream_url, headers=octet)).status_code == 201
            offsets = ["-1"]
            for payload in payloads:
                response = await client.post(stream_url, headers=octet, content=payload)
                assert response.status_code == 204
                offsets.append(response.headers["stream-next-offset"])
            for k, offset in enumerate(offsets):
                assert await _read_bytes(client, stream_url, offset) == b"".join(payloads[k:])

            fork = stream_url + "-fork"
            created = await client.put(
                fork,
                headers={
                    **octet,
                    "Stream-Forked-From": stream_url,
                    "Stream-Fork-Offset": offsets[4],
                },
            )
            assert created.status_code == 201
            own = [every_byte[::-1] * 20, b"\x00" * 10]
            fork_offsets = []
            for payload in own:
                response = await client.post(fork, headers=octet, content=payload)
                fork_offsets.append(response.headers["stream-next-offset"])
            assert await _read_bytes(client, fork, "-1") == b"".join(payloads[:4] + own)
            assert await _read_bytes(client, fork, offsets[2]) == b"".join(payloads[2:4] + own)
            assert await _read_bytes(client, fork, fork_offsets[0]) == own[1]

"""Live readers of one generation over real HTTP, with the official durable-streams client: a
long-poll reader and an SSE reader that drops its connection at random points and resumes from
the last offset it saw. Both must see exactly the same records, and the text must equal the
persisted answer; dropping readers never stops the generation."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from durable_streams import astream

from tests.support import ServerProcess


@pytest.fixture
def server(fresh_database_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {
        "SIMULATOR_TTFT_MS": "20",
        "SIMULATOR_TOKENS_PER_S": "400",
        "STREAM_FLUSH_INTERVAL_MS": "15",
        "STREAMS_LONG_POLL_TIMEOUT_MS": "1000",
    }
    with ServerProcess(fresh_database_url, tmp_path, **env) as proc:
        yield proc


def _run_end(records: list[Any]) -> int | None:
    """Index of the run's terminal event (RUN_FINISHED / RUN_ERROR), if it has arrived."""
    for i, r in enumerate(records):
        if isinstance(r, dict) and r.get("type") == "chunk" and r["value"]["role"] == "assistant":
            kind = json.loads(r["value"]["chunk"])["type"]
            if kind in ("RUN_FINISHED", "RUN_ERROR"):
                return i
    return None


def _finished(records: list[Any]) -> bool:
    return _run_end(records) is not None


def _through_run_end(records: list[Any]) -> list[Any]:
    """The records up to and including the terminal event. What follows it in the same batch
    (the title's `session` upsert, appended after the answer) depends on where each reader's
    batch happened to end, so it is not part of the comparison."""
    end = _run_end(records)
    assert end is not None
    return records[: end + 1]


async def _long_poll_reader(url: str, offset: str) -> list[Any]:
    records: list[Any] = []
    async with astream(url, offset=offset, live="long-poll") as response:
        async for event in response.iter_events(mode="json_batches"):
            records.extend(event.data)
            if _finished(records):
                return records
    raise AssertionError("long-poll reader ended before the generation did")


async def _dropping_sse_reader(url: str, offset: str, rng: random.Random) -> tuple[list[Any], int]:
    """Reads a few batches, hangs up, resumes from the last offset; until the run ends."""
    records: list[Any] = []
    reconnects = 0
    while True:
        budget = rng.randint(1, 4)
        async with astream(url, offset=offset, live="sse") as response:
            async for event in response.iter_events(mode="json_batches"):
                records.extend(event.data)
                offset = event.next_offset
                budget -= 1
                if _finished(records):
                    return records, reconnects
                if budget == 0:
                    break
        reconnects += 1


@pytest.mark.timeout(180)
async def test_two_live_readers_see_the_same_generation(server: ServerProcess) -> None:
    base = server.base_url
    rng = random.Random(20261125)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for trial in range(4):
            sid = (await client.post("/v1/sessions", json={})).json()["id"]
            url = f"{base}/v1/stream/sessions/{sid}"
            start = (await client.head(url)).headers["stream-next-offset"]
            readers = asyncio.gather(
                _long_poll_reader(url, start),
                _dropping_sse_reader(url, start, rng),
            )
            tokens = 150 + 50 * trial
            sent = await client.post(
                f"/v1/sessions/{sid}/messages",
                json={"content": f"trial {trial} [[tokens:{tokens}]]"},
            )
            assert sent.status_code == 202
            long_poll, (sse, reconnects) = await asyncio.wait_for(readers, timeout=60)
            assert reconnects >= 1, "the SSE reader never dropped its connection"
            # Identical record for record: no gap, no duplicate, whatever the reconnects.
            assert _through_run_end(sse) == _through_run_end(long_poll)
            session = (await client.get(f"/v1/sessions/{sid}")).json()
            assistant = session["messages"][-1]
            assert assistant["role"] == "assistant" and assistant["status"] == "complete"
            events = [
                json.loads(r["value"]["chunk"])
                for r in sse
                if r.get("type") == "chunk" and r["value"]["messageId"] == assistant["id"]
            ]
            text = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
            persisted = "".join(p["content"] for p in assistant["parts"] if p["type"] == "text")
            assert text == persisted and len(text.split()) == tokens
            assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["finishReason"] == "stop"


@pytest.mark.timeout(120)
async def test_closing_every_reader_does_not_stop_the_generation(server: ServerProcess) -> None:
    base = server.base_url
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        sid = (await client.post("/v1/sessions", json={})).json()["id"]
        url = f"{base}/v1/stream/sessions/{sid}"
        sent = await client.post(
            f"/v1/sessions/{sid}/messages", json={"content": "keep going [[tokens:400]]"}
        )
        assert sent.status_code == 202
        # A reader that leaves after its first batch of the answer.
        async with astream(url, offset=sent.json()["offset"], live="sse") as response:
            async for _event in response.iter_events(mode="json_batches"):
                break
        for _ in range(600):
            session = (await client.get(f"/v1/sessions/{sid}")).json()
            if session["active_generation_id"] is None:
                break
            await asyncio.sleep(0.05)
        assistant = session["messages"][-1]
        assert assistant["status"] == "complete"
        text = "".join(p["content"] for p in assistant["parts"] if p["type"] == "text")
        assert len(text.split()) == 400

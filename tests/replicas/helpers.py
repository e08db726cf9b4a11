"""Shared by the replica tests: reading session streams, following them live, waiting on
processes, and looking at the `generations` table directly."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import psycopg
import pytest

from tests.support import sse_events

# Every real-process test lets a burst of sessions be created by the one local user.
BASE_ENV = {
    "RATE_LIMIT_SESSION_CREATE": "1000/minute",
    "RATE_LIMIT_MESSAGES": "1000/minute",
    "STREAM_FLUSH_INTERVAL_MS": "10",
    "SIMULATOR_TTFT_MS": "10",
}


async def read_all(
    client: httpx.AsyncClient, base_url: str, sid: str, offset: str = "-1"
) -> tuple[list[dict[str, Any]], str]:
    """Catch-up read of a session stream from `offset` to its tail: (records, tail offset)."""
    records: list[dict[str, Any]] = []
    while True:
        response = await client.get(
            f"{base_url}/v1/stream/sessions/{sid}", params={"offset": offset}
        )
        assert response.status_code == 200, response.text
        records.extend(response.json())
        offset = response.headers["stream-next-offset"]
        if response.headers.get("stream-up-to-date") == "true":
            return records, offset


def events_of(records: list[dict[str, Any]], message_id: str) -> list[dict[str, Any]]:
    """The AG-UI events of one message, in stream order."""
    return [
        json.loads(r["value"]["chunk"])
        for r in records
        if r.get("type") == "chunk" and r["value"]["messageId"] == message_id
    ]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")


def persisted_text(message: dict[str, Any]) -> str:
    return "".join(p["content"] for p in message["parts"] if p["type"] == "text")


def run_ended(records: list[dict[str, Any]], message_id: str) -> bool:
    return any(e["type"] in ("RUN_FINISHED", "RUN_ERROR") for e in events_of(records, message_id))


def assistant_ids(records: list[dict[str, Any]]) -> list[str]:
    """Ids of the assistant messages on a stream, in order of their first record."""
    seen: list[str] = []
    for r in records:
        if r.get("type") == "chunk" and r["value"]["role"] == "assistant":
            mid = r["value"]["messageId"]
            if mid not in seen:
                seen.append(mid)
    return seen


async def wait_idle(
    client: httpx.AsyncClient, base_url: str, sid: str, guard_s: float = 60
) -> dict[str, Any]:
    """The session once no generation runs in it (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + guard_s
    while True:
        body: dict[str, Any] = (await client.get(f"{base_url}/v1/sessions/{sid}")).json()
        if body["active_generation_id"] is None:
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"session {sid} still has a running generation after {guard_s:.0f}s")
        await asyncio.sleep(0.05)


def wait_exit(proc: subprocess.Popen[bytes] | None, guard_s: float) -> int:
    assert proc is not None
    try:
        return proc.wait(timeout=guard_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {guard_s:.0f}s of SIGTERM")


def generations(database_url: str, ids: list[str]) -> dict[str, tuple[str, datetime | None]]:
    """(status, finished_at) of generations, straight from Postgres."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id, status, finished_at FROM generations WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


@dataclass
class RawSseReader:
    """Follows one SSE response by hand, so a test sees exactly how the server ended it.

    Records count as delivered when the control event after them arrives (that is when a
    client learns the offset to resume from); `offset` is the last such offset."""

    records: list[dict[str, Any]] = field(default_factory=list)
    offset: str | None = None
    last_kind: str | None = None
    ended: bool = False

    async def follow(self, client: httpx.AsyncClient, url: str, offset: str) -> None:
        pending: list[dict[str, Any]] = []
        async with client.stream("GET", url, params={"offset": offset, "live": "sse"}) as resp:
            assert resp.status_code == 200
            async for event in sse_events(resp):
                self.last_kind = event.kind
                if event.kind == "data":
                    pending.extend(json.loads(event.data))
                elif event.kind == "control":
                    self.records.extend(pending)
                    pending = []
                    self.offset = json.loads(event.data)["streamNextOffset"]
        self.ended = True

"""A process killed mid-generation: the next start closes the generation as interrupted, keeps the
partial answer (rebuilt from the stream), ends the stream's run with RUN_ERROR, and the session
takes new messages again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ServerProcess

ENV = {
    "SIMULATOR_TTFT_MS": "10",
    "SIMULATOR_TOKENS_PER_S": "60",
    "STREAM_FLUSH_INTERVAL_MS": "10",
    "GENERATION_STALE_AFTER_S": "1",
}


def _records(client: httpx.Client, sid: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    offset = "-1"
    while True:
        response = client.get(f"/v1/stream/sessions/{sid}", params={"offset": offset})
        assert response.status_code == 200
        out.extend(response.json())
        offset = response.headers["stream-next-offset"]
        if response.headers.get("stream-up-to-date") == "true":
            return out


def _events(records: list[dict[str, Any]], message_id: str) -> list[dict[str, Any]]:
    return [
        json.loads(r["value"]["chunk"])
        for r in records
        if r.get("type") == "chunk" and r["value"]["messageId"] == message_id
    ]


@pytest.mark.timeout(120)
def test_a_generation_cut_by_a_crash_is_closed_as_interrupted(
    fresh_database_url: str, tmp_path: Path
) -> None:
    first = ServerProcess(fresh_database_url, tmp_path, "first", **ENV).start()
    try:
        with httpx.Client(base_url=first.base_url, timeout=30) as client:
            sid = client.post("/v1/sessions", json={}).json()["id"]
            sent = client.post(
                f"/v1/sessions/{sid}/messages", json={"content": "long [[tokens:3000]]"}
            )
            assert sent.status_code == 202
            # Some of the answer is on the stream, then the process dies.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                records = _records(client, sid)
                deltas = [
                    r
                    for r in records
                    if r.get("type") == "chunk" and "TEXT_MESSAGE_CONTENT" in r["value"]["chunk"]
                ]
                if len(deltas) >= 3:
                    break
                time.sleep(0.05)
            first.kill()
    finally:
        first.stop()
    time.sleep(1.5)  # past GENERATION_STALE_AFTER_S: the dead process's heartbeat is stale

    second = ServerProcess(fresh_database_url, tmp_path, "second", **ENV)
    with second, httpx.Client(base_url=second.base_url, timeout=30) as client:
        session = client.get(f"/v1/sessions/{sid}").json()
        assert session["active_generation_id"] is None
        assistant = session["messages"][-1]
        assert assistant["role"] == "assistant" and assistant["status"] == "interrupted"
        records = _records(client, sid)
        events = _events(records, assistant["id"])
        streamed = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
        persisted = "".join(p["content"] for p in assistant["parts"] if p["type"] == "text")
        assert streamed and persisted == streamed
        assert events[-1]["type"] == "RUN_ERROR"
        assert events[-1]["error"]["code"] == "interrupted"
        # The session takes a new message and answers it.
        again = client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi [[tokens:3]]"})
        assert again.status_code == 202
        deadline = time.monotonic() + 30
        while client.get(f"/v1/sessions/{sid}").json()["active_generation_id"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get(f"/v1/sessions/{sid}").json()["messages"][-1]["status"] == "complete"

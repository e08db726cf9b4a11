"""A process killed mid-generation: the next process closes the generation as interrupted, keeps
the partial answer (rebuilt from the stream), ends the stream's run with RUN_ERROR, and the
session takes new messages again; no acknowledged user message is lost."""

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


SESSIONS = 6
GUARD_S = 30.0  # hang guard for each wait below


def _wait_idle(client: httpx.Client, sid: str) -> dict[str, Any]:
    deadline = time.monotonic() + GUARD_S
    while True:
        session: dict[str, Any] = client.get(f"/v1/sessions/{sid}").json()
        if session["active_generation_id"] is None:
            return session
        assert time.monotonic() < deadline, f"session {sid} never became idle"
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_generations_cut_by_a_crash_are_closed_as_interrupted(
    fresh_database_url: str, tmp_path: Path
) -> None:
    """Several sessions, each with an earlier exchange and an answer running, when the process
    is killed; the next process starts at once (before the dead one's heartbeats go stale) and
    closes them as soon as they do."""
    acked: dict[str, list[str]] = {}  # session -> acknowledged user message ids, in order
    first = ServerProcess(fresh_database_url, tmp_path, "first", **ENV).start()
    try:
        with httpx.Client(base_url=first.base_url, timeout=30) as client:
            sids = [client.post("/v1/sessions", json={}).json()["id"] for _ in range(SESSIONS)]
            for sid in sids:
                sent = client.post(
                    f"/v1/sessions/{sid}/messages", json={"content": "hi [[tokens:3]]"}
                )
                assert sent.status_code == 202
                acked[sid] = [sent.json()["message_id"]]
            for sid in sids:
                _wait_idle(client, sid)
            for sid in sids:
                sent = client.post(
                    f"/v1/sessions/{sid}/messages", json={"content": "long [[tokens:3000]]"}
                )
                assert sent.status_code == 202
                acked[sid].append(sent.json()["message_id"])
            # Some of every answer is on its stream, then the process dies.
            deadline = time.monotonic() + GUARD_S
            for sid in sids:
                while True:
                    records = _records(client, sid)
                    answers = [
                        r["value"]["messageId"]
                        for r in records
                        if r.get("type") == "chunk" and r["value"]["role"] == "assistant"
                    ]
                    running = _events(records, answers[-1]) if len(set(answers)) == 2 else []
                    if len([e for e in running if e["type"] == "TEXT_MESSAGE_CONTENT"]) >= 3:
                        break
                    assert time.monotonic() < deadline, "the answers never reached the streams"
                    time.sleep(0.05)
            first.kill()
    finally:
        first.stop()

    second = ServerProcess(fresh_database_url, tmp_path, "second", **ENV)
    with second, httpx.Client(base_url=second.base_url, timeout=30) as client:
        for sid in sids:
            session = _wait_idle(client, sid)
            users = [m for m in session["messages"] if m["role"] == "user"]
            # Every acknowledged user message is there, in order.
            assert [m["id"] for m in users] == acked[sid]
            assistant = session["messages"][-1]
            assert assistant["role"] == "assistant" and assistant["status"] == "interrupted"
            records = _records(client, sid)
            events = _events(records, assistant["id"])
            streamed = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
            persisted = "".join(p["content"] for p in assistant["parts"] if p["type"] == "text")
            assert streamed and persisted == streamed
            assert events[-1]["type"] == "RUN_ERROR"
            assert events[-1]["error"]["code"] == "interrupted"
            terminals = [e for e in events if e["type"] in ("RUN_ERROR", "RUN_FINISHED")]
            assert len(terminals) == 1, "the run was closed more than once"
        # Every session takes a new message and answers it.
        for sid in sids:
            again = client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi [[tokens:3]]"})
            assert again.status_code == 202
        for sid in sids:
            assert _wait_idle(client, sid)["messages"][-1]["status"] == "complete"

"""The chaos harness (`make chaos`) kept from rotting: its invariant checks catch what they
exist to catch, and the kill -9 and disconnect scenarios run end to end at a tiny scale through
the same code as the full run (a real service, real kills, real hang-ups)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from chaos import checks
from chaos.load import Ack, ChatLedger, SendAck, WriterLedger
from chaos.scenarios import Context, Scale, run
from streams_service.sessions import records

# --------------------------------------------------------------------------- stream checks


def _writer() -> WriterLedger:
    ledger = WriterLedger("w0", "chaos/s", producer=True)
    ledger.acked = [Ack(0, "o1", 200), Ack(1, "o2", 200), Ack(2, "o3", 200)]
    return ledger


def _stream_problems(items: list[Any], ledger: WriterLedger) -> checks.StreamReport:
    report = checks.StreamReport()
    checks._check_one_stream("chaos/s", items, [ledger], report)
    return report


def test_stream_check_passes_an_intact_stream() -> None:
    items = [{"w": "w0", "n": n} for n in range(3)]
    report = _stream_problems(items, _writer())
    assert report.problems == []
    assert (report.acked, report.lost, report.duplicated, report.phantom) == (3, 0, 0, 0)


@pytest.mark.parametrize(
    ("ns", "counter", "needle"),
    [
        ([0, 2], "lost", "acknowledged but missing"),
        ([0, 1, 1, 2], "duplicated", "stored more than once"),
        ([0, 1, 2, 9], "phantom", "never acknowledged nor in flight"),
        ([1, 0, 2], None, "out of order"),
    ],
)
def test_stream_check_catches(ns: list[int], counter: str | None, needle: str) -> None:
    report = _stream_problems([{"w": "w0", "n": n} for n in ns], _writer())
    assert any(needle in p for p in report.problems), report.problems
    if counter:
        assert getattr(report, counter) == 1


def test_stream_check_catches_offsets_out_of_stream_order() -> None:
    ledger = _writer()
    ledger.acked[1] = Ack(1, "o0", 200)  # acknowledged with an offset before its predecessor's
    report = _stream_problems([{"w": "w0", "n": n} for n in range(3)], ledger)
    assert not report.offsets_ok
    assert report.lost == report.duplicated == 0


def test_stream_check_allows_a_plain_writers_in_flight_append_once() -> None:
    ledger = WriterLedger("w0", "chaos/s", producer=False, acked=[Ack(0, "o1", 204)])
    ledger.in_flight = {1}
    assert _stream_problems([{"w": "w0", "n": 0}, {"w": "w0", "n": 1}], ledger).problems == []
    assert _stream_problems([{"w": "w0", "n": 0}], ledger).problems == []
    twice = _stream_problems([{"w": "w0", "n": n} for n in (0, 1, 1)], ledger)
    assert twice.duplicated == 1


# --------------------------------------------------------------------------- session checks

SID = "00000000-0000-4000-8000-000000000001"
GID = "00000000-0000-4000-8000-0000000000aa"
USER_MSG = "msg_user"
ANSWER = "msg_answer"


def _chunk(seq: int, event: dict[str, Any]) -> dict[str, Any]:
    return records.chunk_record(
        message_id=ANSWER,
        actor_id="claude",
        role="assistant",
        seq=seq,
        chunk=event,
        created_at=records.now_iso(),
    )


def _session_fixture() -> dict[str, Any]:
    ledger = ChatLedger(SID, acked=[SendAck("c-0", USER_MSG, GID, "o1")])
    items = [
        records.user_message_record(
            message_id=USER_MSG,
            actor_id="local",
            parts=[{"type": "text", "content": "hello"}],
            created_at=records.now_iso(),
        ),
        _chunk(0, records.event("RUN_STARTED", runId=GID)),
        _chunk(1, records.event("TEXT_MESSAGE_CONTENT", messageId=ANSWER, delta="Hel")),
        _chunk(2, records.event("TEXT_MESSAGE_CONTENT", messageId=ANSWER, delta="lo")),
        _chunk(3, records.event("RUN_FINISHED", runId=GID, finishReason="stop")),
    ]
    gens = [(SID, GID, ANSWER, "completed", None)]
    msgs = [
        (SID, USER_MSG, "user", "complete", "hello", "c-0", GID, []),
        (SID, ANSWER, "assistant", "complete", "Hello", None, GID, []),
    ]
    return {"ledger": ledger, "items": items, "gens": gens, "msgs": msgs, "session": (SID, None, 2)}


def _session_report(case: dict[str, Any]) -> checks.SessionReport:
    report = checks.SessionReport()
    checks._check_one_session(
        case["ledger"], case["items"], case["gens"], case["msgs"], case["session"], report
    )
    return report


def test_session_check_passes_a_consistent_session() -> None:
    report = _session_report(_session_fixture())
    assert report.problems == []
    assert (report.acked, report.lost, report.usage_rows) == (1, 0, 1)
    assert report.codes() == {"completed": 1}


def _break(kind: str, case: dict[str, Any]) -> None:
    if kind == "lost message":
        case["items"] = case["items"][1:]
    elif kind == "second terminal event":
        error = records.event("RUN_ERROR", runId=GID, error={"code": "interrupted"})
        case["items"].append(_chunk(10**9, error))
    elif kind == "text differs":
        case["msgs"][1] = (*case["msgs"][1][:4], "Hell", *case["msgs"][1][5:])
    elif kind == "usage row missing":
        case["gens"] = []
    elif kind == "still running":
        case["gens"] = [(SID, GID, ANSWER, "running", None)]
    elif kind == "duplicate chunk":
        case["items"].append(copy.deepcopy(case["items"][2]))
    elif kind == "status disagrees":
        case["gens"] = [(SID, GID, ANSWER, "error", "overloaded")]


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("lost message", "lost"),
        ("second terminal event", "2 terminal events"),
        ("text differs", "differs"),
        ("usage row missing", "usage rows 0 != acknowledged sends 1"),
        ("still running", "still running"),
        ("duplicate chunk", "chunk keys on the stream twice"),
        ("status disagrees", "but the stream says"),
    ],
)
def test_session_check_catches(kind: str, needle: str) -> None:
    case = _session_fixture()
    _break(kind, case)
    problems = _session_report(case).problems
    assert any(needle in p for p in problems), problems


# --------------------------------------------------------------------------- end to end


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scenario", ["kill9", "disconnects"])
async def test_scenario_at_smoke_scale(scenario: str, tmp_path: Path) -> None:
    result = await run(scenario, Context(tmp_path, Scale.smoke()))
    assert result.ok, "\n".join([result.line, *result.problems])
    assert result.line.startswith(f"chaos {scenario}: ")
    assert result.line.endswith("— PASS")
    # The scenario really did what it claims: a kill interrupted something, the hang-ups
    # happened, and nothing was lost along the way.
    if scenario == "kill9":
        assert "1 kills (0 " not in result.line
        assert " 0 ended interrupted" not in result.line
    else:
        found = re.search(r"([\d,]+) disconnects", result.line)
        assert found and int(found.group(1).replace(",", "")) >= Scale.smoke().disconnects
        assert "all completed" in result.line

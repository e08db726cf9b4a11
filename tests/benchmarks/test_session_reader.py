"""The scale benchmark's reader: delivery lag measured from the simulator's send time."""

from __future__ import annotations

import json

from benchmarks.sessions import _SessionReader


def _record(event: dict[str, object]) -> dict[str, object]:
    return {"type": "chunk", "value": {"role": "assistant", "chunk": json.dumps(event)}}


def test_every_clock_stamp_in_a_merged_delta_counts_from_when_it_was_sent() -> None:
    reader = _SessionReader("127.0.0.1", 1, "/v1/stream/sessions/x", "-1")
    event = {
        "type": "TEXT_MESSAGE_CONTENT",
        "messageId": "m",
        "delta": "[t:1000] alpha[t:1020] beta [t:1040]gamma",
        "timestamp": 1030,
    }
    reader._on_records([_record(event)], now_ms=1100.0, now_perf=5.0)

    # Three upstream deltas merged into one event: each keeps its own send time.
    assert reader.source_lags == [(1000, 100.0), (1020, 80.0), (1040, 60.0)]
    # The service's own stamp is kept apart: it starts after the upstream read.
    assert reader.stamped_lags == [(1030, 70.0)]
    assert reader.first_text.is_set() and reader.first_text_at == 5.0


def test_text_without_stamps_and_other_events_add_no_source_lag() -> None:
    reader = _SessionReader("127.0.0.1", 1, "/v1/stream/sessions/x", "-1")
    plain = {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "[t:] x", "timestamp": 1}
    thinking = {"type": "STEP_FINISHED", "stepId": "s", "delta": "[t:1000]"}
    reader._on_records([_record(plain), _record(thinking)], now_ms=2.0, now_perf=0.0)

    assert reader.source_lags == []
    assert reader.stamped_lags == [(1, 1.0)]


def test_a_run_error_is_reported_by_its_code_and_message() -> None:
    reader = _SessionReader("127.0.0.1", 1, "/v1/stream/sessions/x", "-1")
    error = {
        "type": "RUN_ERROR",
        "timestamp": 1795784936841,
        "runId": "d69d83a5-1e43-43df-b856-83e246ce9383",
        "error": {"message": "Claude is overloaded; try again shortly.", "code": "overloaded"},
    }
    reader._on_records([_record(error)], now_ms=2.0, now_perf=0.0)

    # The code first: summaries keep only the start of each error.
    assert reader.run_error == "overloaded: Claude is overloaded; try again shortly."

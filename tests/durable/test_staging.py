"""Bodies this process encoded itself are stored without being parsed again, exactly as the
validated path would store them; anything else still gets the client's validation."""

from __future__ import annotations

import dataclasses

import pytest

from streams_service.durable.model import StreamState, encode_json_append, encoded_json_values
from streams_service.errors import BadRequest
from streams_service.sessions import records


def test_an_encoded_batch_is_stored_as_its_validated_values() -> None:
    rows = [
        records.chunk_record(
            message_id="m",
            actor_id="claude",
            role="assistant",
            seq=seq,
            chunk=records.event("TEXT_MESSAGE_CONTENT", messageId="m", delta=f"<b>é {seq}\n"),
            created_at="2026-11-26T00:00:00Z",
        )
        for seq in range(3)
    ]
    request = records.append(rows)
    assert request.encoded_json and request.body is not None
    stored = encoded_json_values(request.body)
    assert stored == encode_json_append(request.body, allow_empty=False)
    assert stored.count(b'"type":"chunk"') == 3


@pytest.mark.parametrize("body", [b'{"a": 1}', b"[1, 2]", b' [{"a":1}]'])
def test_other_shapes_are_stored_as_validation_stores_them(body: bytes) -> None:
    assert encoded_json_values(body) == encode_json_append(body, allow_empty=False)


@pytest.mark.parametrize("body", [b"[]", b"[1,", b"not json"])
def test_bodies_that_are_not_a_batch_are_still_validated(body: bytes) -> None:
    with pytest.raises(BadRequest):
        encoded_json_values(body)


def test_a_stream_states_copy_has_every_field_and_is_its_own() -> None:
    # A distinct value per field: a copy that put one field in another's place would differ.
    values = {f.name: f"v{i}" for i, f in enumerate(dataclasses.fields(StreamState))}
    state = StreamState(**values)  # type: ignore[arg-type]
    copy = state.copy()
    assert copy == state and copy is not state
    copy.tail = 99
    assert state.tail == values["tail"]

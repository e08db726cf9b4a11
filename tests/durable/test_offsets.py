"""Offsets and cursors: opaque strings whose order is the order of the stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams_service.durable.offsets import (
    BEYOND,
    CURSOR_EPOCH_S,
    CURSOR_INTERVAL_S,
    InvalidOffset,
    current_cursor,
    format_offset,
    parse_offset,
    response_cursor,
)

positions = st.integers(min_value=0, max_value=10**16 - 1)


@given(positions)
def test_format_parse_round_trip(position: int) -> None:
    offset = format_offset(position)
    assert parse_offset(offset) == position
    assert len(offset) == 33
    assert not set(offset) & set(",&=?/")


@given(positions, positions)
def test_string_order_is_position_order(a: int, b: int) -> None:
    assert (format_offset(a) < format_offset(b)) == (a < b)


@pytest.mark.parametrize("raw", ["", "-1", "now", "1", "a_b", "1_", "_1", "1_2_3", " 1_2", "1_2\n"])
def test_malformed_offsets_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidOffset):
        parse_offset(raw)


def test_offsets_from_a_later_read_sequence_sort_after_everything() -> None:
    assert parse_offset("0000000000000001_0000000000000000") == BEYOND
    assert parse_offset(format_offset(10**16 - 1)) < BEYOND


def test_cursor_is_the_interval_since_the_protocol_epoch() -> None:
    assert current_cursor(CURSOR_EPOCH_S) == 0
    assert current_cursor(CURSOR_EPOCH_S + CURSOR_INTERVAL_S * 7 + 1) == 7


@given(st.integers(min_value=0, max_value=10**6))
def test_echoed_cursor_always_advances(offset_intervals: int) -> None:
    now = CURSOR_EPOCH_S + 1_000_000 * CURSOR_INTERVAL_S
    current = current_cursor(now)
    client = current + offset_intervals
    assert int(response_cursor(str(client), now)) > client
    # A stale or garbage cursor gets the current interval.
    assert response_cursor(str(current - 5), now) == str(current)
    assert response_cursor("garbage", now) == str(current)
    assert response_cursor(None, now) == str(current)

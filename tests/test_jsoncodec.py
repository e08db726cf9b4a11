"""jsoncodec: orjson on the token path, the standard library wherever orjson refuses."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams_service import jsoncodec

# JSON values without floats: their compact encoding is one exact string in both libraries.
_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _stdlib(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@given(_values)
def test_encodes_exactly_as_the_standard_library_and_decodes_back(value: Any) -> None:
    try:
        expected = _stdlib(value)
    except UnicodeEncodeError:  # a lone surrogate in generated text: escaped instead
        expected = json.dumps(value, separators=(",", ":")).encode()
    assert jsoncodec.dumps(value) == expected
    compact = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert jsoncodec.dumps_str(value) == compact
    assert jsoncodec.loads(expected) == value
    assert jsoncodec.loads(expected.decode()) == value


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_round_trip(value: float) -> None:
    encoded = jsoncodec.dumps({"x": value})
    assert json.loads(encoded)["x"] == value
    assert jsoncodec.loads(encoded)["x"] == value


def test_what_orjson_refuses_is_left_to_the_standard_library() -> None:
    # Decoding: a lone surrogate escape, NaN and a number too big for a double.
    assert jsoncodec.loads(b'"\\ud800"') == "\ud800"
    assert math.isnan(jsoncodec.loads(b"NaN"))
    assert jsoncodec.loads(b"1e400") == math.inf
    # Encoding: a lone surrogate becomes an escape (still valid UTF-8 JSON), a big integer and
    # a non-string key come out as `json` writes them.
    assert jsoncodec.dumps({"t": "a\ud800b"}) == b'{"t":"a\\ud800b"}'
    assert jsoncodec.dumps_str("a\ud800") == '"a\ud800"'
    assert jsoncodec.dumps(2**70) == str(2**70).encode()
    assert jsoncodec.dumps({1: "one"}) == b'{"1":"one"}'
    # Text stays UTF-8, not escaped.
    assert jsoncodec.dumps(["héllo ✓"]) == '["héllo ✓"]'.encode()


def test_broken_documents_and_unknown_types_raise_what_json_raises() -> None:
    with pytest.raises(json.JSONDecodeError):
        jsoncodec.loads(b'{"a": ')
    with pytest.raises(ValueError):
        jsoncodec.loads(b"\xff")
    with pytest.raises(TypeError):
        jsoncodec.dumps({"when": object()})

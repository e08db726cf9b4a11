"""Built-in tools: the calculator's parser, current_time, search_my_history and output hygiene."""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from streams_service.llm import tools
from streams_service.llm.tools import (
    TOOLS,
    CalculatorError,
    ToolContext,
    ToolResult,
    evaluate,
    get_tool,
    sanitize_tool_output,
    tool_specs,
)


class FakeSearch:
    def __init__(self, hits: list[dict[str, Any]] | None = None, fail: bool = False) -> None:
        self.hits = hits or []
        self.fail = fail
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, query: str, limit: int) -> list[dict[str, Any]]:
        self.calls.append((query, limit))
        if self.fail:
            raise RuntimeError("connection to postgres://secret@db failed")
        return self.hits


def context(search: FakeSearch | None = None) -> ToolContext:
    return ToolContext(user_id="u1", session_id="s1", search_history=search or FakeSearch())


async def calc(expression: str) -> ToolResult:
    return await TOOLS["calculator"].run({"expression": expression}, context())


# --- calculator: values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3*4", "14"),
        ("2 ** 3 ** 2", "512"),  # right-associative: 2 ** 9
        ("(2 ** 3) ** 2", "64"),
        ("-2**2", "-4"),  # Python's convention: ** binds tighter than unary minus
        ("(-2)**2", "4"),
        ("2**-1", "0.5"),  # the exponent may carry its own sign
        ("(1+2)*3", "9"),
        ("10-4-3", "3"),  # left-associative
        ("100/10/5", "2"),
        ("7//2", "3"),
        ("-7//2", "-4"),  # floors, like Python
        ("7%3", "1"),
        ("-7%3", "2"),  # sign of the divisor, like Python
        ("7.5 % 2", "1.5"),
        ("+-+-3", "3"),
        ("2*-3", "-6"),
        ("1/3", "0.333333333333333"),
        ("0.1+0.2", "0.3"),  # floats shown with 15 significant digits
        ("1e3", "1000"),
        ("1.5E-3 * 2", "0.003"),
        (".5 + 5.", "5.5"),
        ("2**100", "1267650600228229401496703205376"),  # integers stay exact
        ("sqrt(16)", "4"),
        ("sqrt(2)", "1.4142135623731"),
        ("abs(-3.5)", "3.5"),
        ("round(2.567, 2)", "2.57"),
        ("round(2.5)", "2"),  # half to even, like Python
        ("round(1234, -2)", "1200"),
        ("min(3, 1, 2)", "1"),
        ("max(3, 1, 2)", "3"),
        ("max(4)", "4"),
        ("log(1000)", "3"),  # base 10
        ("log(8, 2)", "3"),
        ("ln(e)", "1"),
        ("exp(0)", "1"),
        ("sin(pi / 2)", "1"),  # radians
        ("cos(0)", "1"),
        ("tan(0)", "0"),
        ("floor(-2.5)", "-3"),
        ("ceil(2.1)", "3"),
        ("pi", "3.14159265358979"),
        ("e", "2.71828182845905"),
        ("2 * pi * 10", "62.8318530717959"),
        ("  ( 1 + 2 ) * ( 3 + 4 )  ", "21"),
        ("sqrt(3**2 + 4**2)", "5"),
    ],
)
async def test_calculator_values(expression: str, expected: str) -> None:
    result = await calc(expression)
    assert result == ToolResult(expected, is_error=False)


# --- calculator: errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("1 +", "unexpected end of expression"),
        ("(1 + 2", "expected ')'"),
        ("1 + 2)", "unexpected ')' at position 6"),
        ("1 2", "unexpected '2' at position 3"),
        ("2 * * 3", "unexpected '*' at position 5"),
        ("3 $ 4", "unexpected character '$' at position 3"),
        ("2 ^ 3", "use ** for powers"),
        ("foo + 1", "unknown name 'foo'"),
        ("__import__(1)", "unknown name '__import__'"),
        ("open('x')", 'unexpected character "\'" at position 6'),
        ("sqrt", "sqrt is a function"),
        ("pi(2)", "pi is a constant"),
        ("max()", "max() takes at least 1 argument"),
        ("sqrt(1, 2)", "sqrt() takes 1 argument"),
        ("1/0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("1 / (2 - 2)", "division by zero"),
        ("sqrt(-1)", "domain"),
        ("log(0)", "domain"),
        ("(-8) ** (1/3)", "no real result"),
        ("9**9**9", "overflow"),
        ("2**2**2**2**2", "overflow"),
        ("10 ** 400", "overflow"),
        ("10.0 ** 400", "overflow"),
        ("2**1024", "overflow"),
        ("1e308 * 10", "overflow"),
        ("exp(1000)", "overflow"),
        ("1e999", "too large"),
        ("round(5, -1000000000)", "digits must be between"),
        ("round(1, 0.5)", "whole number"),
        ("x" * 501, "too long"),
        ("(" * 100 + "1" + ")" * 100, "nested too deeply"),
        ("-" * 300 + "1", "nested too deeply"),
    ],
)
async def test_calculator_errors(expression: str, message: str) -> None:
    result = await calc(expression)
    assert result.is_error
    assert result.content.startswith("calculator: ")
    assert message in result.content


@pytest.mark.parametrize("bad_input", [{}, {"expression": 12}, {"expr": "1+1"}])
async def test_calculator_needs_an_expression_string(bad_input: dict[str, Any]) -> None:
    result = await TOOLS["calculator"].run(bad_input, context())
    assert result.is_error and "'expression' must be a string" in result.content


def test_limits_are_at_the_documented_size() -> None:
    assert evaluate("1" + "+1" * 249) == 250  # 499 characters
    with pytest.raises(CalculatorError, match="too long"):
        evaluate("1" + "+1" * 250)  # 501 characters
    assert evaluate("2**1023") == 2**1023


CALC_ALPHABET = "0123456789.eE+-*/%(), ^pisqrtlogmaxnbcfu_\t\n"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=600), st.text(alphabet=CALC_ALPHABET, max_size=120)))
def test_random_input_never_raises_or_hangs(expression: str) -> None:
    started = time.perf_counter()
    try:
        value = evaluate(expression)
    except CalculatorError as exc:
        assert str(exc)
    else:
        assert isinstance(value, int | float)
        assert not (isinstance(value, float) and not math.isfinite(value))
    # A hang bound, not a speed figure: the limits (500 characters, 1,024-bit integers) keep an
    # evaluation to microseconds, and what they exist to stop (say 9**9**9) runs for minutes.
    # Generous, since on a busy 2-core machine one scheduling pause in 500 examples took 0.25 s.
    assert time.perf_counter() - started < 2.0


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=CALC_ALPHABET, max_size=120))
async def test_tool_never_raises_on_random_input(expression: str) -> None:
    result = await calc(expression)
    assert isinstance(result.content, str) and result.content


# Expressions in the calculator's language are valid Python with the same meaning for these
# operators, so Python itself is the oracle for precedence and associativity. `**` only gets a
# small literal exponent on a parenthesised base, so no case can blow up.
_leaf = st.integers(min_value=0, max_value=30).map(str)


def _extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "//", "%", "/"]), children).map(
            " ".join
        ),
        children.map(lambda c: f"({c})"),
        children.map(lambda c: f"-{c}"),
        st.tuples(children, st.sampled_from(["0", "1", "2", "3", "-1"])).map(
            lambda t: f"({t[0]}) ** {t[1]}"
        ),
    )


@settings(max_examples=400, deadline=None)
@given(st.recursive(_leaf, _extend, max_leaves=8))
def test_agrees_with_python_arithmetic(expression: str) -> None:
    try:
        expected = eval(expression, {"__builtins__": {}})  # the oracle, on generated input only
    except ZeroDivisionError:
        with pytest.raises(CalculatorError, match="division by zero"):
            evaluate(expression)
        return
    assume(not isinstance(expected, complex))
    assume(not isinstance(expected, int) or expected.bit_length() <= tools.MAX_INT_BITS)
    try:
        value = evaluate(expression)
    except CalculatorError as exc:
        # Fractional powers of negatives are complex in Python, refused here.
        assert "no real result" in str(exc) or "overflow" in str(exc)
        return
    if isinstance(expected, int):
        assert value == expected and isinstance(value, int)
    else:
        assert math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12)


# --- current_time ------------------------------------------------------------------------------


async def test_current_time_defaults_to_utc() -> None:
    result = await TOOLS["current_time"].run({}, context())
    assert not result.is_error
    first_line, second_line = result.content.split("\n")
    when = dt.datetime.fromisoformat(first_line)
    assert when.utcoffset() == dt.timedelta(0)
    assert abs((when - dt.datetime.now(dt.UTC)).total_seconds()) < 5
    assert second_line.endswith("time zone UTC")


async def test_current_time_in_a_named_zone() -> None:
    result = await TOOLS["current_time"].run({"timezone": "Asia/Tokyo"}, context())
    assert not result.is_error
    when = dt.datetime.fromisoformat(result.content.split("\n")[0])
    assert when.utcoffset() == dt.timedelta(hours=9)  # Japan has no daylight saving time


async def test_current_time_format(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = dt.datetime(2026, 11, 25, 22, 17, 2, 123456, tzinfo=dt.UTC)
    monkeypatch.setattr(tools, "_now", lambda tz: fixed.astimezone(tz))
    result = await TOOLS["current_time"].run({"timezone": "Europe/Paris"}, context())
    assert result == ToolResult("2026-11-25T23:17:02+01:00\nWednesday, time zone Europe/Paris")


@pytest.mark.parametrize(
    "timezone", ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime", "America", "x" * 65, 5]
)
async def test_current_time_bad_zone_is_an_error_result(timezone: object) -> None:
    result = await TOOLS["current_time"].run({"timezone": timezone}, context())
    assert result.is_error
    assert "IANA" in result.content


# --- search_my_history -------------------------------------------------------------------------


async def test_search_calls_the_context_callable_and_formats_hits() -> None:
    search = FakeSearch(
        [
            {"session_id": "a1", "title": "Trip to Lisbon", "snippet": "book the\n  tram"},
            {"session_id": "b2", "title": None, "snippet": ""},
        ]
    )
    result = await TOOLS["search_my_history"].run(
        {"query": " lisbon ", "limit": 3}, context(search)
    )
    assert search.calls == [("lisbon", 3)]
    assert result == ToolResult(
        "1. Trip to Lisbon (session a1)\n   book the tram\n2. Untitled (session b2)"
    )


async def test_search_default_limit_and_no_hits() -> None:
    search = FakeSearch([])
    result = await TOOLS["search_my_history"].run({"query": "nothing"}, context(search))
    assert search.calls == [("nothing", tools.SEARCH_DEFAULT_LIMIT)]
    assert not result.is_error
    assert "No past conversations match 'nothing'" in result.content


async def test_search_never_shows_more_than_the_limit() -> None:
    hits = [{"session_id": str(i), "title": f"t{i}", "snippet": "s"} for i in range(10)]
    result = await TOOLS["search_my_history"].run(
        {"query": "t", "limit": 2}, context(FakeSearch(hits))
    )
    assert result.content.count("(session ") == 2


@pytest.mark.parametrize(
    "bad_input",
    [
        {},
        {"query": ""},
        {"query": "   "},
        {"query": 3},
        {"query": "x" * 501},
        {"query": "ok", "limit": 0},
        {"query": "ok", "limit": 21},
        {"query": "ok", "limit": "5"},
        {"query": "ok", "limit": True},
    ],
)
async def test_search_validates_input_without_calling(bad_input: dict[str, Any]) -> None:
    search = FakeSearch()
    result = await TOOLS["search_my_history"].run(bad_input, context(search))
    assert result.is_error
    assert search.calls == []


async def test_search_failure_is_an_error_result_without_details() -> None:
    result = await TOOLS["search_my_history"].run({"query": "x"}, context(FakeSearch(fail=True)))
    assert result.is_error
    assert "failed unexpectedly" in result.content
    assert "postgres" not in result.content


async def test_search_output_is_sanitized() -> None:
    search = FakeSearch([{"session_id": "a", "title": "bell\x07", "snippet": "nul\x00 esc\x1b[2J"}])
    result = await TOOLS["search_my_history"].run({"query": "x"}, context(search))
    assert result.content == "1. bell (session a)\n   nul esc[2J"


# --- registry ----------------------------------------------------------------------------------


def test_registry() -> None:
    assert list(TOOLS) == ["calculator", "current_time", "search_my_history"]
    assert get_tool("calculator") is TOOLS["calculator"]
    assert get_tool("rm_rf") is None
    with pytest.raises(TypeError):
        TOOLS["evil"] = TOOLS["calculator"]  # type: ignore[index]


def test_approval_flags() -> None:
    assert TOOLS["calculator"].requires_approval is False
    assert TOOLS["current_time"].requires_approval is False
    # Reads the user's stored conversations into this one: the user confirms each search.
    assert TOOLS["search_my_history"].requires_approval is True


def test_tool_specs_are_anthropic_tool_params() -> None:
    specs = tool_specs()
    assert [s["name"] for s in specs] == list(TOOLS)
    for spec in specs:
        assert set(spec) == {"name", "description", "input_schema"}
        assert spec["description"]
        assert spec["input_schema"]["type"] == "object"
    assert [s["name"] for s in tool_specs(["search_my_history", "calculator"])] == [
        "calculator",
        "search_my_history",
    ]


def test_input_schemas_are_valid_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for spec in tool_specs():
        jsonschema.Draft202012Validator.check_schema(spec["input_schema"])


async def test_non_object_input_is_an_error_result() -> None:
    result = await TOOLS["calculator"].run(["1+1"], context())  # type: ignore[arg-type]
    assert result == ToolResult("calculator: input must be a JSON object", is_error=True)


# --- sanitize_tool_output ----------------------------------------------------------------------


def test_sanitize_strips_control_characters_but_keeps_newline_and_tab() -> None:
    raw = "a\x00b\x01c\x08d\te\nf\x0bg\x0ch\x1b[31mi\x7fj\x85k\x9fl"
    assert sanitize_tool_output(raw) == "abcd\te\nfgh[31mijkl"


def test_sanitize_turns_carriage_returns_into_newlines() -> None:
    assert sanitize_tool_output("a\r\nb\rc") == "a\nb\nc"


def test_sanitize_drops_lone_surrogates_and_keeps_real_text() -> None:
    text = "caf\u00e9 \u05e9\u05dc\u05d5\u05dd \U0001f469\u200d\U0001f4bb \ud800!"
    assert (
        sanitize_tool_output(text)
        == "caf\u00e9 \u05e9\u05dc\u05d5\u05dd \U0001f469\u200d\U0001f4bb !"
    )
    sanitize_tool_output(text).encode("utf-8")  # storable


def test_sanitize_truncates_with_a_marker() -> None:
    out = sanitize_tool_output("x" * 10_000)
    assert len(out) <= tools.TOOL_OUTPUT_LIMIT
    assert out.startswith("x" * 7_000)
    assert out.endswith("of 10000 characters]")
    assert sanitize_tool_output("x" * 8_000) == "x" * 8_000


def test_sanitize_counts_after_cleaning() -> None:
    # 8,000 visible characters plus NULs fit: the limit applies to what is kept.
    assert sanitize_tool_output("x\x00" * 8_000) == "x" * 8_000


def test_sanitize_tiny_limits() -> None:
    assert sanitize_tool_output("abcdef", 3) == "abc"
    assert sanitize_tool_output("abcdef", 0) == ""
    with pytest.raises(ValueError):
        sanitize_tool_output("a", -1)


@given(st.text(), st.integers(min_value=0, max_value=200))
def test_sanitize_properties(text: str, limit: int) -> None:
    out = sanitize_tool_output(text, limit)
    assert len(out) <= limit
    assert all(ch in "\n\t" or not (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F) for ch in out)
    assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in out)
    out.encode("utf-8")

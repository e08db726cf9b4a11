"""The built-in tools Claude may call: a registry of small, safe functions.

Each tool has the Anthropic tool shape (name, description, JSON `input_schema`), a
`requires_approval` flag (the orchestrator asks the user on the stream before running it), and an
async `run(input, ctx)` that never raises for bad input: problems come back as
`ToolResult(is_error=True)` so Claude can read them and correct itself. Every output goes through
`sanitize_tool_output` before it is returned, because tool outputs are stored and re-sent upstream.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

log = structlog.get_logger(__name__)

TOOL_OUTPUT_LIMIT = 8_000

SearchHistory: TypeAlias = Callable[[str, int], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool may know about the request that called it.

    `search_history(query, limit)` is supplied by the service and must already be scoped to
    `user_id`: the tool passes the query through and trusts the callable to see only that user's
    sessions.
    """

    user_id: str | None
    session_id: str
    search_history: SearchHistory


@dataclass(frozen=True, slots=True)
class ToolResult:
    content: str
    is_error: bool = False


ToolHandler: TypeAlias = Callable[[Mapping[str, Any], ToolContext], Awaitable[ToolResult]]


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    input_schema: Mapping[str, Any]
    requires_approval: bool
    handler: ToolHandler

    def spec(self) -> dict[str, Any]:
        """This tool as one entry of the Messages API `tools` parameter."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": dict(self.input_schema),
        }

    async def run(self, input: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
        """Run the tool; always a sanitized ToolResult, never an exception (except cancellation).

        An unexpected failure is logged with its traceback and reported to Claude without
        details: exception text can carry SQL, paths or other users' data.
        """
        if not isinstance(input, Mapping):
            return _error(f"{self.name}: input must be a JSON object")
        try:
            result = await self.handler(input, ctx)
        except Exception:
            log.exception("tool_failed", tool=self.name, session_id=ctx.session_id)
            result = ToolResult(f"{self.name} failed unexpectedly; try again later", True)
        return ToolResult(sanitize_tool_output(result.content), result.is_error)


def _error(message: str) -> ToolResult:
    return ToolResult(message, is_error=True)


# --- output hygiene ----------------------------------------------------------------------------


# Category Cc is exactly U+0000-U+001F and U+007F-U+009F; U+D800-U+DFFF are surrogates (Cs).
_UNSAFE_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_TRUNCATION_MARKER = "\n[truncated: showing {kept} of {total} characters]"


def sanitize_tool_output(text: str, limit: int = TOOL_OUTPUT_LIMIT) -> str:
    """Strip control characters (keeping \\n and \\t) and cut to at most `limit` characters.

    Removed: C0 controls, DEL and C1 controls (category Cc) — they corrupt terminals and logs, and
    NUL is rejected by Postgres text columns — and lone surrogates (Cs), which cannot be encoded
    as UTF-8 and would fail at storage or JSON time. CR and CRLF become LF first so that lines
    are not glued together. Format characters (Cf: zero-width joiners in emoji, bidi marks in
    right-to-left text) are legitimate content and kept.
    """
    if limit < 0:
        raise ValueError("limit must be >= 0")
    clean = _UNSAFE_CHARS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if len(clean) <= limit:
        return clean
    total = len(clean)
    # The marker's length depends on `kept`, whose digits never outnumber those of `total`, so
    # sizing it with `total` keeps the result within `limit`.
    kept = limit - len(_TRUNCATION_MARKER.format(kept=total, total=total))
    if kept <= 0:
        return clean[:limit]
    return clean[:kept] + _TRUNCATION_MARKER.format(kept=kept, total=total)


# --- calculator --------------------------------------------------------------------------------
#
# A tokenizer and a recursive-descent parser that evaluates as it parses. Numbers are Python
# ints while a computation stays integral (exact big integers: 2**100 is exact) and floats
# otherwise (`/`, decimals, functions) — binary floats, results shown with 15 significant
# digits so 0.1+0.2 prints 0.3. Semantics follow Python: `//` floors, `%` takes the divisor's
# sign, `**` is right-associative and binds tighter than unary minus, so -2**2 == -4 and
# 2**-1 == 0.5, and round() halves to even. Trigonometry is in radians; log(x) is base 10,
# ln(x) natural, log(x, b) base b. Floats were chosen over Decimal because the functions (sin,
# log, ...) are float functions anyway; exact integers cover the cases where precision matters.
#
# Grammar:
#   expression := term (("+" | "-") term)*
#   term       := unary (("*" | "/" | "//" | "%") unary)*
#   unary      := ("+" | "-") unary | power
#   power      := primary ("**" unary)?
#   primary    := NUMBER | NAME | NAME "(" [expression ("," expression)*] ")" | "(" expression ")"

MAX_EXPRESSION_CHARS = 500
MAX_NESTING = 60
# Integer results beyond this many bits (~1e308, the float range) are refused, which also keeps
# every operation on them cheap.
MAX_INT_BITS = 1_024
MAX_ROUND_DIGITS = 100

Number: TypeAlias = int | float


class CalculatorError(Exception):
    """A problem with the expression, phrased for whoever wrote it."""


_TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<op>\*\*|//|[-+*/%(),])
    """,
    # ASCII: \d and \s must not accept other scripts' digits or exotic spaces.
    re.VERBOSE | re.ASCII,
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "number" | "name" | "op" | "end"
    text: str
    pos: int


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN_RE.match(source, pos)
        if match is None:
            char = source[pos]
            if char == "^":
                raise CalculatorError(
                    f"'^' at position {pos + 1} is not supported; use ** for powers"
                )
            raise CalculatorError(f"unexpected character {char!r} at position {pos + 1}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append(_Token(kind, match.group(), pos))
        pos = match.end()
    tokens.append(_Token("end", "", len(source)))
    return tokens


def _check(value: Number) -> Number:
    """Refuse results too large to be useful (or cheap): huge ints, inf and nan."""
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise CalculatorError("overflow: result is too large")
        return value
    if math.isinf(value):
        raise CalculatorError("overflow: result is too large")
    if math.isnan(value):
        raise CalculatorError("result is not a number")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        # Predict the size before computing it: 9**9**9 would take minutes and gigabytes.
        if abs(base) > 1 and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
            raise CalculatorError("overflow: exponent is too large")
        exact: int = base**exponent  # int ** non-negative int stays an exact int
        return exact
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero (zero to a negative power)")
    if base < 0 and not float(exponent).is_integer():
        raise CalculatorError("a negative number to a fractional power has no real result")
    try:
        return _check(math.pow(base, exponent))
    except OverflowError:
        raise CalculatorError("overflow: result is too large") from None


def _binary(op: str, left: Number, right: Number) -> Number:
    try:
        if op == "+":
            return left + right
        if op == "-":
            return left - right
        if op == "*":
            return left * right
        if op == "/":
            return left / right
        if op == "//":
            return left // right
        if op == "%":
            return left % right
        return _power(left, right)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("overflow: result is too large") from None
    except ValueError:
        raise CalculatorError(f"{op}: math domain error") from None


def _as_int(value: Number, what: str) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise CalculatorError(f"{what} must be a whole number")
        return int(value)
    return value


# Beyond 2**53 every float is already a whole number, and turning it into an int would print
# digits (floor(1e300) -> 1000000000000000052504760...) that the float never had.
_FLOAT_EXACT_INT_LIMIT = 2**53


def _integral(value: Number, to_int: Callable[[float], int]) -> Number:
    if isinstance(value, float) and abs(value) >= _FLOAT_EXACT_INT_LIMIT:
        return value
    return to_int(value)


def _round(args: Sequence[Number]) -> Number:
    if len(args) == 1:
        return _integral(args[0], round)
    digits = _as_int(args[1], "round's second argument")
    # round(5, -10**9) builds 10**(10**9) internally; a sane bound keeps it instant.
    if abs(digits) > MAX_ROUND_DIGITS:
        raise CalculatorError(
            f"round: digits must be between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}"
        )
    return round(args[0], digits)


def _log(args: Sequence[Number]) -> Number:
    if len(args) == 1:
        return math.log10(args[0])
    return math.log(args[0], args[1])


# name -> (min args, max args or None for any, implementation)
_FUNCTIONS: Mapping[str, tuple[int, int | None, Callable[[Sequence[Number]], Number]]] = {
    "sqrt": (1, 1, lambda a: math.sqrt(a[0])),
    "abs": (1, 1, lambda a: abs(a[0])),
    "round": (1, 2, _round),
    "min": (1, None, min),
    "max": (1, None, max),
    "log": (1, 2, _log),
    "ln": (1, 1, lambda a: math.log(a[0])),
    "exp": (1, 1, lambda a: math.exp(a[0])),
    "sin": (1, 1, lambda a: math.sin(a[0])),
    "cos": (1, 1, lambda a: math.cos(a[0])),
    "tan": (1, 1, lambda a: math.tan(a[0])),
    "floor": (1, 1, lambda a: _integral(a[0], math.floor)),
    "ceil": (1, 1, lambda a: _integral(a[0], math.ceil)),
}
_CONSTANTS: Mapping[str, float] = {"pi": math.pi, "e": math.e}


class _Parser:
    def __init__(self, source: str) -> None:
        self.tokens = _tokenize(source)
        self.index = 0
        self.depth = 0

    @property
    def current(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def at_op(self, *ops: str) -> bool:
        return self.current.kind == "op" and self.current.text in ops

    def unexpected(self) -> CalculatorError:
        token = self.current
        if token.kind == "end":
            return CalculatorError("syntax error: unexpected end of expression")
        return CalculatorError(
            f"syntax error: unexpected {token.text!r} at position {token.pos + 1}"
        )

    def expect(self, op: str) -> None:
        if not self.at_op(op):
            if self.current.kind == "end":
                raise CalculatorError(
                    f"syntax error: expected {op!r} before the end of the expression"
                )
            raise CalculatorError(
                f"syntax error: expected {op!r} at position {self.current.pos + 1}, "
                f"found {self.current.text!r}"
            )
        self.advance()

    def parse(self) -> Number:
        if self.current.kind == "end":
            raise CalculatorError("empty expression")
        value = self.expression()
        if self.current.kind != "end":
            raise self.unexpected()
        return value

    def nested(self) -> None:
        # Python's own recursion limit would surface as RecursionError; a clear message is better.
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise CalculatorError(
                f"expression is nested too deeply (more than {MAX_NESTING} levels)"
            )

    def expression(self) -> Number:
        self.nested()
        value = self.term()
        while self.at_op("+", "-"):
            op = self.advance().text
            value = _check(_binary(op, value, self.term()))
        self.depth -= 1
        return value

    def term(self) -> Number:
        value = self.unary()
        while self.at_op("*", "/", "//", "%"):
            op = self.advance().text
            value = _check(_binary(op, value, self.unary()))
        return value

    def unary(self) -> Number:
        if self.at_op("+", "-"):
            op = self.advance().text
            self.nested()
            operand = self.unary()
            self.depth -= 1
            return -operand if op == "-" else operand
        return self.power()

    def power(self) -> Number:
        base = self.primary()
        if self.at_op("**"):
            self.advance()
            self.nested()
            # The exponent is a `unary`, which recurses into `power`: right-associative.
            exponent = self.unary()
            self.depth -= 1
            return _check(_binary("**", base, exponent))
        return base

    def primary(self) -> Number:
        token = self.current
        if token.kind == "number":
            self.advance()
            return self.number(token)
        if token.kind == "name":
            self.advance()
            return self.name(token)
        if self.at_op("("):
            self.advance()
            value = self.expression()
            self.expect(")")
            return value
        raise self.unexpected()

    def number(self, token: _Token) -> Number:
        text = token.text
        if any(c in text for c in ".eE"):
            value: Number = float(text)
        else:
            value = int(text)
        try:
            return _check(value)
        except CalculatorError:
            raise CalculatorError(f"number at position {token.pos + 1} is too large") from None

    def name(self, token: _Token) -> Number:
        name = token.text
        if name in _CONSTANTS:
            if self.at_op("("):
                raise CalculatorError(f"{name} is a constant, not a function")
            return _CONSTANTS[name]
        if name not in _FUNCTIONS:
            known = ", ".join([*_FUNCTIONS, *_CONSTANTS])
            raise CalculatorError(f"unknown name {name!r}; available: {known}")
        if not self.at_op("("):
            raise CalculatorError(f"{name} is a function; call it like {name}(x)")
        self.advance()
        args: list[Number] = []
        if not self.at_op(")"):
            args.append(self.expression())
            while self.at_op(","):
                self.advance()
                args.append(self.expression())
        self.expect(")")
        return self.call(name, args)

    def call(self, name: str, args: list[Number]) -> Number:
        least, most, function = _FUNCTIONS[name]
        if len(args) < least or (most is not None and len(args) > most):
            if most is None:
                wanted = f"at least {least}"
            elif least == most:
                wanted = str(least)
            else:
                wanted = f"{least} or {most}"
            raise CalculatorError(f"{name}() takes {wanted} argument(s), got {len(args)}")
        try:
            return _check(function(args))
        except ZeroDivisionError:
            raise CalculatorError(f"{name}(): division by zero") from None
        except OverflowError:
            raise CalculatorError(f"{name}(): overflow, result is too large") from None
        except ValueError:
            raise CalculatorError(f"{name}(): argument out of the function's domain") from None


def evaluate(expression: str) -> Number:
    """The value of a calculator expression; CalculatorError with a readable message if invalid."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(
            f"expression is too long ({len(expression)} characters; the limit is "
            f"{MAX_EXPRESSION_CHARS})"
        )
    return _Parser(expression).parse()


def format_number(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"  # also for -0.0
    return format(value, ".15g")


async def _calculator(input: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    expression = input.get("expression")
    if not isinstance(expression, str):
        return _error("calculator: 'expression' must be a string")
    try:
        return ToolResult(format_number(evaluate(expression)))
    except CalculatorError as exc:
        return _error(f"calculator: {exc}")


# --- current time ------------------------------------------------------------------------------


def _now(tz: dt.tzinfo) -> dt.datetime:
    return dt.datetime.now(tz)


async def _current_time(input: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    name = input.get("timezone") or "UTC"
    if not isinstance(name, str) or len(name) > 64:
        return _error(
            "current_time: 'timezone' must be an IANA time zone name such as Europe/Paris"
        )
    try:
        tz = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: malformed keys ("../x", absolute paths); OSError: a directory ("America").
        return _error(
            f"current_time: unknown time zone {name!r}; use an IANA name such as Europe/Paris"
        )
    now = _now(tz)
    # First line is RFC 3339; the weekday is spelled out because models are unreliable at
    # deriving it from a date.
    return ToolResult(f"{now.isoformat(timespec='seconds')}\n{now:%A}, time zone {name}")


# --- search my history -------------------------------------------------------------------------

SEARCH_DEFAULT_LIMIT = 5
SEARCH_MAX_LIMIT = 20
SEARCH_MAX_QUERY_CHARS = 500


async def _search_my_history(input: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    query = input.get("query")
    if not isinstance(query, str) or not query.strip():
        return _error("search_my_history: 'query' must be a non-empty string")
    if len(query) > SEARCH_MAX_QUERY_CHARS:
        return _error(
            f"search_my_history: 'query' is longer than {SEARCH_MAX_QUERY_CHARS} characters"
        )
    limit = input.get("limit", SEARCH_DEFAULT_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= SEARCH_MAX_LIMIT:
        return _error(f"search_my_history: 'limit' must be an integer from 1 to {SEARCH_MAX_LIMIT}")
    hits = await ctx.search_history(query.strip(), limit)
    if not hits:
        return ToolResult(f"No past conversations match {query.strip()!r}.")
    lines = []
    for number, hit in enumerate(hits[:limit], start=1):
        title = str(hit.get("title") or "Untitled")
        snippet = " ".join(str(hit.get("snippet") or "").split())
        lines.append(f"{number}. {title} (session {hit.get('session_id')})")
        if snippet:
            lines.append(f"   {snippet}")
    return ToolResult("\n".join(lines))


# --- registry ----------------------------------------------------------------------------------

_ALL: tuple[Tool, ...] = (
    Tool(
        name="calculator",
        description=(
            "Evaluate an arithmetic expression exactly as written and return the number. "
            "Supports + - * / // % ** (power, right-associative; -2**2 is -4), parentheses, "
            "sqrt, abs, round(x[, digits]), min, max, log (base 10; log(x, b) for base b), ln, "
            "exp, sin, cos, tan (radians), floor, ceil and the constants pi and e. Use it for "
            "any arithmetic rather than computing in your head."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "The expression, e.g. (1 + 2) * sqrt(16) / 3",
                    "maxLength": MAX_EXPRESSION_CHARS,
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
        requires_approval=False,
        handler=_calculator,
    ),
    Tool(
        name="current_time",
        description=(
            "The current date and time (RFC 3339) and weekday, in UTC or in the given IANA "
            "time zone."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "timezone": {
                    "type": "string",
                    "description": "IANA time zone name, e.g. Europe/Paris; defaults to UTC",
                }
            },
            "additionalProperties": False,
        },
        requires_approval=False,
        handler=_current_time,
    ),
    Tool(
        name="search_my_history",
        description=(
            "Full-text search over the user's own past conversations; returns matching "
            "sessions with their title and a snippet. The user is asked to approve each search."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "description": "Words to look for",
                    "maxLength": SEARCH_MAX_QUERY_CHARS,
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": SEARCH_MAX_LIMIT,
                    "description": f"How many sessions to return (default {SEARCH_DEFAULT_LIMIT})",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        # It copies the user's stored conversations (possibly from other sessions, on other
        # topics) into this one, where they are sent upstream and kept in this session's
        # history. That is the user's call, not the model's, so each search is confirmed.
        requires_approval=True,
        handler=_search_my_history,
    ),
)

TOOLS: Mapping[str, Tool] = MappingProxyType({tool.name: tool for tool in _ALL})


def get_tool(name: str) -> Tool | None:
    return TOOLS.get(name)


def tool_specs(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The Messages API `tools` parameter: every tool, or the named ones in registry order."""
    return [tool.spec() for tool in TOOLS.values() if names is None or tool.name in names]

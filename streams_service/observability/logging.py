"""Structured logs: JSON lines in production, readable lines in development.

One pipeline serves structlog and the standard library (uvicorn, SQLAlchemy, the SDKs): both end
in the same handler, whose formatter adds the request context, renders exceptions without their
messages and runs every line through a `Redactor` that keeps secrets, tokens and message text out
of the output. `configure_logging` is called by the lifespan (and by `chatops serve` before
uvicorn starts), never at import.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from streams_service.config import Settings
from streams_service.observability.context import add_request_context

REDACTED = "[redacted]"

# Libraries that write SQL parameters, request bodies or headers below WARNING. Their INFO/DEBUG
# lines would put message text (and credentials) in the log, so they never go below WARNING,
# whatever LOG_LEVEL says.
LEAKY_LOGGERS = (
    "sqlalchemy.engine",  # statements with their parameters
    "sqlalchemy.pool",
    "anthropic",  # request options, the whole conversation, at DEBUG
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "hpack",
    "urllib3",
    "requests",
    "posthog",  # queued events at DEBUG
    "sentry_sdk",
    "aiosqlite",
    "psycopg",
    "multipart",
)

# Keys whose values are credentials.
SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "cookie",
        "cookies",
        "set_cookie",
        "password",
        "passwd",
        "secret",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "api_key",
        "apikey",
        "x_api_key",
        "jwt",
        "bearer",
        "credentials",
        "dsn",
        "private_key",
        "client_secret",
    }
)
SECRET_SUFFIXES = ("_token", "_secret", "_password", "_api_key", "_dsn")
# Keys whose values are (or may hold) what people wrote or Claude answered: never logged.
TEXT_KEYS = frozenset(
    {
        "content",
        "text",
        "message",
        "messages",
        "message_text",
        "delta",
        "chunk",
        "prompt",
        "system",
        "body",
        "data",
        "input",
        "output",
        "result",
        "arguments",
        "thinking",
        "query",
        "q",
        "title",
        "first_text",
        "first_user_text",
        "parts",
        "history",
        "completion",
        "response",
    }
)

# Credential shapes, found anywhere inside a string (an event, an exception, a URL).
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{4,}"), r"\1 " + REDACTED),
    (re.compile(r"\b(Basic)\s+[A-Za-z0-9+/]{8,}={0,2}"), r"\1 " + REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"\b(?:sk-ant-|sk-|cho_|phc_|phx_)[A-Za-z0-9_-]{12,}"), REDACTED),
    # user:password@ in URLs (DATABASE_URL, REDIS_URL, a DSN's key)
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*):[^@/\s]+@"), r"\1:" + REDACTED + "@"),
    (
        re.compile(
            r"(?i)([?&](?:token|access_token|api_key|apikey|key|secret|password|jwt|auth|sig)=)"
            r"[^&\s\"']+"
        ),
        r"\1" + REDACTED,
    ),
)

# A fragment of every match of _PATTERNS, lower-cased: "bearer", "basic", "eyj" (a JWT),
# the token prefixes, "@" (URL credentials) and "=" (secrets in a query string).
_PATTERN_MARKERS = ("bearer", "basic", "eyj", "sk-", "cho_", "phc_", "phx_", "@", "=")


_URL_CREDENTIALS = re.compile(r"://([^:/@\s]*)(?::([^@/\s]*))?@")


@lru_cache(maxsize=4096)
def _withheld_key(key: str) -> bool:
    name = key.lower().replace("-", "_")
    return name in SECRET_KEYS or name in TEXT_KEYS or name.endswith(SECRET_SUFFIXES)


class Redactor:
    """structlog processor (and a helper for Sentry): withholds values under secret or text
    keys, scrubs credential shapes and the service's own configured secrets from every string,
    and never lets an exception's message through (only its type)."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        known = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)
        self._exact = re.compile("|".join(re.escape(s) for s in known)) if known else None

    def text(self, value: str) -> str:
        # Every log line's every string comes through here (an access line per request): the
        # six patterns run only on strings holding a fragment one of them needs.
        lowered = value.lower()
        if any(marker in lowered for marker in _PATTERN_MARKERS):
            for pattern, replacement in _PATTERNS:
                value = pattern.sub(replacement, value)
        if self._exact is not None:
            value = self._exact.sub(REDACTED, value)
        return value

    def value(self, key: str | None, value: Any, depth: int = 0) -> Any:
        if key is not None and _withheld_key(key):
            # Saying that nothing was there is fine; anything else is withheld.
            return value if value is None or (isinstance(value, str) and not value) else REDACTED
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, BaseException):
            return type(value).__name__  # its message may quote anything
        if depth > 6:
            return REDACTED
        if isinstance(value, Mapping):
            return {str(k): self.value(str(k), v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(None, v, depth + 1) for v in value]
        if isinstance(value, bytes | bytearray | memoryview):
            return f"<{len(value)} bytes>"
        return self.text(repr(value))

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        return {key: self.value(key, value) for key, value in event_dict.items()}


def secrets_of(settings: Settings) -> list[str | None]:
    """The configured secrets, withheld by value wherever they turn up."""
    values: list[str | None] = [
        settings.streams_secret,
        settings.anthropic_api_key,
        settings.posthog_api_key,
    ]
    for url in (settings.database_url, settings.redis_url):
        match = _URL_CREDENTIALS.search(url or "")
        if match is not None:
            values.append(match.group(2))
    dsn = _URL_CREDENTIALS.search(settings.sentry_dsn_streams or "")
    if dsn is not None:
        values.append(dsn.group(1))  # a Sentry DSN's key is its user part
    return values


def safe_traceback(exc: BaseException) -> str:
    """The traceback of an exception and its causes, with types but without messages: a message
    can quote a user's text or a SQL parameter."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    parts: list[str] = []
    for i, item in enumerate(reversed(chain)):
        if i:
            parts.append("\nwhich led to:\n")
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_list(traceback.extract_tb(item.__traceback__)))
        parts.append(f"{qualified_name(type(item))} (message withheld)\n")
    return "".join(parts).rstrip("\n")


def qualified_name(cls: type) -> str:
    module = cls.__module__
    if module in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def exc_info_of(value: Any) -> BaseException | None:
    """The exception an `exc_info` value refers to (True means the one being handled)."""
    if isinstance(value, BaseException):
        return value
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return value[1]
    if value:
        return sys.exc_info()[1]
    return None


def first_line_of_asyncio(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """asyncio's own error lines ("Task exception was never retrieved") go on to print the
    task, whose repr quotes the exception's message: keep their first line only."""
    record = event_dict.get("_record")
    if record is not None and record.name == "asyncio":
        event = event_dict.get("event")
        if isinstance(event, str):
            event_dict["event"] = event.split("\n", 1)[0]
    return event_dict


def render_exception_safely(
    _logger: WrappedLogger, _method: str, event_dict: EventDict
) -> EventDict:
    exc = exc_info_of(event_dict.pop("exc_info", None))
    if exc is not None:
        event_dict["exception"] = safe_traceback(exc)
    return event_dict


class ChatopsHandler(logging.StreamHandler[IO[str]]):
    """The one handler of the root logger. Without an explicit stream it writes to whatever
    `sys.stderr` is when a line is written (a test's capture, a redirected stream)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self._fixed = stream is not None

    def emit(self, record: logging.LogRecord) -> None:
        if not self._fixed:
            self.stream = sys.stderr
        super().emit(record)


def log_format(settings: Settings) -> str:
    if settings.log_format != "auto":
        return settings.log_format
    return "json" if settings.env == "production" else "console"


def log_level(settings: Settings) -> int:
    return logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> None:
    """Route structlog and the standard library through one redacting handler on the root
    logger. Safe to call again (a second app, `chatops serve` then the lifespan): it replaces
    its own handler and leaves other handlers (pytest's, for one) alone."""
    level = log_level(settings)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_request_context,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if log_format(settings) == "json":
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
    else:
        target = stream or sys.stderr
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(target))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            first_line_of_asyncio,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            render_exception_safely,
            Redactor(secrets_of(settings)),
            renderer,
        ],
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached: a later configure_logging (another app in the same process) must apply
        # to loggers that already logged.
        cache_logger_on_first_use=False,
    )
    handler = ChatopsHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, ChatopsHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn configures handlers of its own; its lines go through ours instead.
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # Except its access log: the `request` line (streams_service.access) already records every
    # request, with its id, status and duration. A uvicorn protocol logs access lines whenever
    # this logger has handlers, counting the root's, so it must not propagate: otherwise each
    # request is logged twice (and formatted twice, on the event loop).
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    for name in LEAKY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

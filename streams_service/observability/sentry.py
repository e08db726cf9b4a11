"""Sentry, when SENTRY_DSN_STREAMS is set: unhandled errors and generation failures, tagged with
the request, session and user ids, and never with message text.

What keeps text out: no request bodies (`max_request_body_size="never"`), no local variables in
frames, no cookies or authorization headers, no query strings (`q=` searches message content),
exception messages replaced by their type, and breadcrumbs reduced to what happened (a log
line's event name, an HTTP call's method, URL and status), not what was said. Every string
left is scrubbed of credential shapes and the configured secrets like a log line.

The SDK is process-global; the lifespan initialises it at start and closes it at exit. It is
imported only then, when a DSN is set: loaded, it and its HTTP stack (urllib3, httpcore) cost
~4 MB of memory in every process, reporting or not.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any, cast

from streams_service.config import Settings
from streams_service.observability import context
from streams_service.observability.logging import Redactor, exc_info_of, secrets_of

if TYPE_CHECKING:
    from sentry_sdk._types import Event, EventProcessor, Hint

WITHHELD = "(message withheld)"
# Request headers worth seeing in an error and carrying nothing secret.
SAFE_HEADERS = frozenset(
    {"content-type", "content-length", "accept", "user-agent", "x-request-id", "origin", "host"}
)
# What an HTTP breadcrumb keeps (the URL without its query string).
HTTP_CRUMB_KEYS = ("method", "status_code", "reason", "url")


def init_sentry(settings: Settings) -> bool:
    """Start the SDK if a DSN is configured. Returns whether it did."""
    if not settings.sentry_dsn_streams:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.anthropic import AnthropicIntegration
    from sentry_sdk.integrations.asyncio import AsyncioIntegration
    from sentry_sdk.integrations.fastapi import FastApiIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.integrations.starlette import StarletteIntegration

    redactor = Redactor(secrets_of(settings))
    sentry_sdk.init(
        dsn=settings.sentry_dsn_streams,
        environment=settings.env,
        traces_sample_rate=settings.sentry_traces_sample_rate,
        include_local_variables=False,  # a frame's locals hold the conversation
        max_request_body_size="never",
        before_send=_scrubber(redactor),
        before_send_transaction=_scrubber(redactor),
        before_breadcrumb=scrub_breadcrumb,
        integrations=[
            StarletteIntegration(),
            FastApiIntegration(),
            # Each task gets its own scope (a generation's tags stay its own). Task spans would
            # open one per task (every stream read). Its eager reports are dropped in
            # scrub_event: see there.
            AsyncioIntegration(task_spans=False),
            # Log lines become breadcrumbs only; errors are reported by ExceptionReporter below,
            # so a logged exception is one event, with its traceback.
            LoggingIntegration(level=logging.INFO, event_level=None),
        ],
        # Its spans can carry prompts and answers.
        disabled_integrations=[AnthropicIntegration()],
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, ExceptionReporter)]:
        root.removeHandler(old)
    root.addHandler(ExceptionReporter())
    return True


async def close_sentry() -> None:
    """Send what is queued (bounded) and stop the SDK."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ExceptionReporter)]:
        root.removeHandler(handler)
    if "sentry_sdk" not in sys.modules:
        return  # never started
    import sentry_sdk

    client = sentry_sdk.get_client()
    if client.is_active():
        await asyncio.to_thread(client.close, 5.0)
    sentry_sdk.get_global_scope().set_client(None)


def enabled() -> bool:
    if "sentry_sdk" not in sys.modules:
        return False  # not imported, so never initialised
    import sentry_sdk

    return sentry_sdk.get_client().is_active()


def report_generation_failure(
    error: BaseException, *, session_id: str, generation_id: str, model: str
) -> None:
    """A generation that failed for a reason of our own (code "internal")."""
    if not enabled():
        return
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        scope.set_tag("session_id", session_id)
        scope.set_tag("generation_id", generation_id)
        scope.set_tag("model", model)
        scope.set_tag("error_code", "internal")
        sentry_sdk.capture_exception(error)


def tag_request_scope(ctx: context.RequestContext) -> None:
    """Put the request's ids on Sentry's per-request scope before an unhandled error leaves the
    request middleware (the SDK reports it further out, after the request context is gone)."""
    if not enabled():
        return
    import sentry_sdk

    scope = sentry_sdk.get_isolation_scope()
    for key, value in ctx.ids().items():
        scope.set_tag(key, value)


class ExceptionReporter(logging.Handler):
    """Reports exceptions that were logged (`log.exception(...)`, uvicorn's "Exception in ASGI
    application") with the logger and event name as tags. Plain error lines stay logs."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("sentry_sdk"):
            return
        exc = record.exc_info[1] if record.exc_info else None
        event_name: object = None
        if isinstance(record.msg, dict):  # a structlog line: the event dict
            event_name = record.msg.get("event")
            if exc is None:
                exc = exc_info_of(record.msg.get("exc_info"))
        if exc is None:
            return
        import sentry_sdk  # installed only by init_sentry, which imported it

        with sentry_sdk.new_scope() as scope:
            scope.set_tag("logger", record.name)
            if isinstance(event_name, str):
                scope.set_tag("log_event", event_name[:200])
            sentry_sdk.capture_exception(exc)


def _scrubber(redactor: Redactor) -> EventProcessor:
    def before_send(event: Event, hint: Hint) -> Event | None:
        return cast("Event | None", scrub_event(redactor, cast(dict[str, Any], event), hint))

    return before_send


def scrub_event(
    redactor: Redactor, event: dict[str, Any], _hint: dict[str, Any]
) -> dict[str, Any] | None:
    """before_send / before_send_transaction."""
    exceptions = (event.get("exception") or {}).get("values") or []
    if any((e.get("mechanism") or {}).get("type") == "asyncio" for e in exceptions):
        # The asyncio integration reports every exception that leaves a task, also those the
        # awaiting code handles (a generation's failed upstream call is classified and shown
        # to the user; a rate limit is no bug). A task exception nobody handles is still
        # reported: asyncio logs "Task exception was never retrieved" with it, and
        # ExceptionReporter sends that.
        return None
    request = event.get("request")
    if isinstance(request, dict):
        for key in ("data", "cookies", "query_string", "env"):
            request.pop(key, None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {k: v for k, v in headers.items() if k.lower() in SAFE_HEADERS}
        url = request.get("url")
        if isinstance(url, str):
            request["url"] = url.split("?", 1)[0]
    event.pop("logentry", None)
    event.pop("message", None)
    for exception in exceptions:
        if isinstance(exception, dict):
            exception["value"] = WITHHELD
            for frame in (exception.get("stacktrace") or {}).get("frames") or []:
                if isinstance(frame, dict):
                    frame.pop("vars", None)
    crumbs = event.get("breadcrumbs")
    values = crumbs.get("values") if isinstance(crumbs, dict) else crumbs
    if isinstance(values, list):
        for crumb in values:
            if isinstance(crumb, dict):
                _reduce_crumb(crumb, None)
    if isinstance(event.get("extra"), dict):
        event["extra"] = redactor.value(None, event["extra"])
    user = event.get("user")
    if isinstance(user, dict):
        event["user"] = {"id": user["id"]} if "id" in user else {}
    tags = event.get("tags")
    if not isinstance(tags, dict):
        tags = event["tags"] = {}
    ctx = context.current()
    if ctx is not None:
        for key, value in ctx.ids().items():
            tags.setdefault(key, value)
    for span in event.get("spans") or []:
        if isinstance(span, dict) and isinstance(span.get("data"), dict):
            span["data"] = redactor.value(None, span["data"])
    scrubbed: dict[str, Any] = _scrub_strings(redactor, event)
    return scrubbed


def scrub_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any] | None) -> dict[str, Any] | None:
    """before_breadcrumb: a log line keeps its event name, an HTTP call its method, URL and
    status; every other message and all other data are dropped."""
    _reduce_crumb(crumb, (hint or {}).get("log_record"))
    return crumb


def _reduce_crumb(crumb: dict[str, Any], record: logging.LogRecord | None) -> None:
    if record is not None:
        name = record.msg.get("event") if isinstance(record.msg, dict) else None
        crumb["message"] = name if isinstance(name, str) else f"{record.name} {record.levelname}"
        crumb.pop("data", None)
        return
    if crumb.get("type") == "http" or crumb.get("category") in ("httplib", "http"):
        data = crumb.get("data")
        if isinstance(data, dict):
            kept = {k: data[k] for k in HTTP_CRUMB_KEYS if k in data}
            if isinstance(kept.get("url"), str):
                kept["url"] = kept["url"].split("?", 1)[0]
            crumb["data"] = kept
        crumb.pop("message", None)
        return
    if crumb.get("category") != "log" and crumb.get("type") != "log":
        crumb.pop("message", None)
    crumb.pop("data", None)


def _scrub_strings(redactor: Redactor, value: Any) -> Any:
    """Every string of the event through the log redactor (credential shapes, our secrets),
    keeping the event's structure."""
    if isinstance(value, str):
        return redactor.text(value)
    if isinstance(value, dict):
        return {k: _scrub_strings(redactor, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_strings(redactor, v) for v in value]
    return value

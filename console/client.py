"""Typed HTTP client of the Streams service (DESIGN §3): the console's only way to the data.

Every failure becomes a `ServiceError` carrying the service's `{"error", "detail"}`, so a page can
show one clear sentence. A route the service does not have (yet) raises `NotAvailable`, which the
pages turn into a "this needs …" notice instead of a crash.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import durable_streams
import httpx
from pydantic import BaseModel, ConfigDict, Field

TokenProvider = Callable[[], str | None]


# ---------------------------------------------------------------------------------- errors


class ServiceError(Exception):
    """The service answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, code: str, detail: str, *, retry_after: str | None = None):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.detail


class Unreachable(ServiceError):
    """No answer at all: the service is down, or STREAMS_URL points elsewhere."""


class NotAvailable(ServiceError):
    """The service has no such route: an older service, or a feature not built yet."""


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    pass


class Unauthorized(ServiceError):
    pass


class Forbidden(ServiceError):
    pass


class RateLimited(ServiceError):
    pass


_BY_STATUS: dict[int, type[ServiceError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
}

# What the framework answers for a route it does not know (our typed 404s say more than this).
_ROUTE_MISSING_DETAILS = {"Not Found", "Method Not Allowed"}


def error_from_response(response: httpx.Response) -> ServiceError:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        code = str(body.get("error") or "error")
        detail = body["detail"]
    else:
        code = "error"
        detail = f"the service answered {status} {response.reason_phrase}".strip()
    if status in (404, 405) and detail in _ROUTE_MISSING_DETAILS:
        path = response.request.url.path
        return NotAvailable(
            status, "not_available", f"{response.request.method} {path} is not available"
        )
    cls = _BY_STATUS.get(status, ServiceError)
    return cls(status, code, detail, retry_after=response.headers.get("retry-after"))


# ---------------------------------------------------------------------------------- models


class _Loose(BaseModel):
    # Newer services may add fields; the console must keep working with them.
    model_config = ConfigDict(extra="allow")


class PriceBand(_Loose):
    max_total_input_tokens: int | None = None
    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal


class ModelInfo(_Loose):
    id: str
    display_name: str
    default: bool = False
    cheap: bool = False
    capabilities: dict[str, Any] = Field(default_factory=dict)
    prices: dict[str, Any] = Field(default_factory=dict)

    @property
    def base_price(self) -> PriceBand | None:
        """The first (smallest-context) price band: what a typical request costs."""
        bands = self.prices.get("bands") or []
        return PriceBand.model_validate(bands[0]) if bands else None


class Models(_Loose):
    simulated: bool = False
    models: list[ModelInfo]

    @property
    def default(self) -> ModelInfo | None:
        return next((m for m in self.models if m.default), self.models[0] if self.models else None)

    def get(self, model_id: str | None) -> ModelInfo | None:
        return next((m for m in self.models if m.id == model_id), None)


class MessageInfo(_Loose):
    id: str
    role: str
    parts: list[dict[str, Any]] = Field(default_factory=list)
    status: str = "complete"
    generation_id: str | None = None
    created_at: datetime | None = None


class SessionInfo(_Loose):
    id: str
    title: str | None = None
    model: str = ""
    simulated: bool = False
    message_count: int = 0
    cost_usd: Decimal = Decimal(0)
    budget_usd: Decimal | None = None
    active_generation_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    ended_at: datetime | None = None
    deleted_at: datetime | None = None
    user: Any = None
    messages: list[MessageInfo] | None = None

    @property
    def budget_left(self) -> Decimal | None:
        if self.budget_usd is None or self.budget_usd <= 0:
            return None
        return max(Decimal(0), self.budget_usd - self.cost_usd)


class SessionPage(_Loose):
    items: list[SessionInfo]
    next_cursor: str | None = None


class SendAccepted(_Loose):
    message_id: str
    generation_id: str
    offset: str


class Me(_Loose):
    id: str | None = None
    email: str
    name: str | None = None
    role: str = "member"
    dev_mode: bool = False
    daily_budget_usd: Decimal | None = None
    spent_today_usd: Decimal | None = None
    budget_left_today_usd: Decimal | None = None


@dataclass(frozen=True, slots=True)
class StreamPage:
    """What one catch-up read of a session stream returned."""

    records: list[dict[str, Any]]
    next_offset: str
    up_to_date: bool
    closed: bool


@dataclass(frozen=True, slots=True)
class Download:
    data: bytes
    filename: str
    mime: str


# ---------------------------------------------------------------------------------- client


def rows_of(body: Any) -> list[dict[str, Any]]:
    """The list in an answer: the body itself, or its `items`/`rows`/… member."""
    if isinstance(body, list):
        return [r for r in body if isinstance(r, dict)]
    if isinstance(body, dict):
        for key in ("items", "rows", "events", "users", "tokens", "entries", "data"):
            value = body.get(key)
            if isinstance(value, list):
                return [r for r in value if isinstance(r, dict)]
    return []


def _day(value: date | datetime | str | None) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, date | datetime) else value


class ServiceClient:
    """One signed-in user's view of the service. Cheap to build per script run: the pooled
    `httpx.Client` is shared, the bearer token comes from `token` on every request."""

    def __init__(
        self, base_url: str, *, http: httpx.Client, token: TokenProvider | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._token = token

    # -- plumbing

    def headers(self) -> dict[str, str]:
        token = self._token() if self._token is not None else None
        return {"Authorization": f"Bearer {token}"} if token else {}

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        clean = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        try:
            response = self._http.request(
                method,
                f"{self.base_url}{path}",
                params=clean,
                json=json,
                headers=self.headers(),
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException:
            raise Unreachable(
                0, "timeout", f"the service at {self.base_url} did not answer in time"
            ) from None
        except httpx.HTTPError as exc:
            raise Unreachable(
                0, "unreachable", f"cannot reach the service at {self.base_url} ({exc})"
            ) from None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        return response.json() if response.content else None

    # -- identity and catalog

    def me(self) -> Me:
        return Me.model_validate(self._json("GET", "/v1/me"))

    def models(self) -> Models:
        return Models.model_validate(self._json("GET", "/v1/models"))

    # -- sessions

    def create_session(self, *, title: str | None = None, model: str | None = None) -> SessionInfo:
        body = {k: v for k, v in {"title": title, "model": model}.items() if v is not None}
        return SessionInfo.model_validate(self._json("POST", "/v1/sessions", json=body))

    def get_session(self, session_id: str) -> SessionInfo:
        return SessionInfo.model_validate(self._json("GET", f"/v1/sessions/{session_id}"))

    def send_message(
        self,
        session_id: str,
        content: str,
        *,
        model: str | None = None,
        client_message_id: str | None = None,
        attachments: list[dict[str, Any]] | None = None,
    ) -> SendAccepted:
        body: dict[str, Any] = {"content": content}
        if model:
            body["model"] = model
        if client_message_id:
            body["client_message_id"] = client_message_id
        if attachments:
            body["attachments"] = attachments
        return SendAccepted.model_validate(
            self._json("POST", f"/v1/sessions/{session_id}/messages", json=body)
        )

    def stop(self, session_id: str) -> None:
        self.request("POST", f"/v1/sessions/{session_id}/stop", timeout=60)

    def regenerate(self, session_id: str) -> SendAccepted:
        return SendAccepted.model_validate(
            self._json("POST", f"/v1/sessions/{session_id}/regenerate")
        )

    def approve(self, session_id: str, tool_call_id: str, approved: bool) -> None:
        self.request(
            "POST",
            f"/v1/sessions/{session_id}/approvals/{tool_call_id}",
            json={"approved": approved},
        )

    def fork(self, session_id: str, at_message_id: str) -> SessionInfo:
        body = self._json(
            "POST", f"/v1/sessions/{session_id}/fork", json={"at_message_id": at_message_id}
        )
        return SessionInfo.model_validate(body)

    def end(self, session_id: str) -> SessionInfo:
        return SessionInfo.model_validate(self._json("POST", f"/v1/sessions/{session_id}/end"))

    # -- history (issue 4)

    def list_sessions(
        self,
        *,
        q: str | None = None,
        model: str | None = None,
        date_from: date | None = None,
        date_to: date | None = None,
        trash: bool = False,
        user: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> SessionPage:
        params = {
            "q": q,
            "model": model,
            "from": _day(date_from),
            "to": _day(date_to),
            "trash": "true" if trash else None,
            "user": user,
            "cursor": cursor,
            "limit": limit,
        }
        return SessionPage.model_validate(self._json("GET", "/v1/sessions", params=params))

    def rename(self, session_id: str, title: str) -> SessionInfo:
        body = self._json("PATCH", f"/v1/sessions/{session_id}", json={"title": title})
        return SessionInfo.model_validate(body)

    def delete(self, session_id: str) -> None:
        self.request("DELETE", f"/v1/sessions/{session_id}")

    def purge(self, session_id: str) -> None:
        self.request("DELETE", f"/v1/sessions/{session_id}", params={"purge": "true"})

    def restore(self, session_id: str) -> SessionInfo:
        return SessionInfo.model_validate(self._json("POST", f"/v1/sessions/{session_id}/restore"))

    def export(self, session_id: str, fmt: str) -> Download:
        response = self.request("GET", f"/v1/sessions/{session_id}/export", params={"format": fmt})
        mime = "text/markdown" if fmt == "md" else "application/json"
        return Download(response.content, f"session-{session_id}.{fmt}", mime)

    def import_session(self, exported: Any) -> SessionInfo:
        return SessionInfo.model_validate(self._json("POST", "/v1/sessions/import", json=exported))

    # -- ops (issue 4)

    def usage(
        self, date_from: date, date_to: date, group_by: str, **filters: Any
    ) -> list[dict[str, Any]]:
        params = {"from": _day(date_from), "to": _day(date_to), "group_by": group_by, **filters}
        return rows_of(self._json("GET", "/v1/usage", params=params))

    def ratelimits(self, date_from: date, date_to: date, bucket: str = "hour") -> dict[str, Any]:
        params = {"from": _day(date_from), "to": _day(date_to), "bucket": bucket}
        body = self._json("GET", "/v1/ratelimits", params=params)
        return body if isinstance(body, dict) else {"items": body}

    def errors(self, date_from: date, date_to: date, **params: Any) -> dict[str, Any]:
        """`{items, next_cursor, counts}`: error events newest first, and counts per type."""
        params = {"from": _day(date_from), "to": _day(date_to), **params}
        body = self._json("GET", "/v1/errors", params=params)
        return body if isinstance(body, dict) else {"items": rows_of(body)}

    def audit(self, date_from: date, date_to: date, **params: Any) -> dict[str, Any]:
        """`{items, next_cursor}`: audit entries newest first."""
        params = {"from": _day(date_from), "to": _day(date_to), **params}
        body = self._json("GET", "/v1/audit", params=params)
        return body if isinstance(body, dict) else {"items": rows_of(body)}

    # -- admin (issue 5)

    def users(self) -> list[dict[str, Any]]:
        return rows_of(self._json("GET", "/v1/users"))

    def create_user(self, email: str, role: str, name: str | None = None) -> dict[str, Any]:
        body = self._json("POST", "/v1/users", json={"email": email, "role": role, "name": name})
        return body if isinstance(body, dict) else {}

    def update_user(self, user_id: str, **changes: Any) -> dict[str, Any]:
        body = self._json("PATCH", f"/v1/users/{user_id}", json=changes)
        return body if isinstance(body, dict) else {}

    def tokens(self, user_id: str) -> list[dict[str, Any]]:
        return rows_of(self._json("GET", f"/v1/users/{user_id}/tokens"))

    def create_token(
        self, user_id: str, name: str | None, expires_in_days: int | None = None
    ) -> dict[str, Any]:
        """The new token, with its secret under `token`: the only time it is ever shown."""
        body: dict[str, Any] = {"name": name or None}
        if expires_in_days:
            body["expires_in_days"] = expires_in_days
        created = self._json("POST", f"/v1/users/{user_id}/tokens", json=body)
        return created if isinstance(created, dict) else {}

    def revoke_token(self, user_id: str, token_id: str) -> None:
        self.request("DELETE", f"/v1/users/{user_id}/tokens/{token_id}")

    # -- the session stream (Durable Streams, read through the protocol's own client)

    def stream_url(self, session_id: str) -> str:
        return f"{self.base_url}/v1/stream/sessions/{session_id}"

    def read_stream(self, session_id: str, offset: str, *, timeout: float = 5.0) -> StreamPage:
        """Catch up from `offset` to the current end: every page until up-to-date, never a
        long-poll (a Streamlit tick must stay short)."""
        with self._stream_errors():
            res = durable_streams.stream(
                self.stream_url(session_id),
                offset=offset,
                live=False,
                headers=dict(self.headers()),
                client=self._http,
                timeout=timeout,
            )
            with res:
                records: list[dict[str, Any]] = []
                for event in res.iter_events(mode="json_batches"):
                    records.extend(r for r in event.data if isinstance(r, dict))
                closed = str(res.headers.get("stream-closed", "")).lower() == "true"
                page = StreamPage(records, res.offset or offset, res.up_to_date, closed)
        return page

    def poll_stream(self, session_id: str, offset: str, *, timeout: float = 75.0) -> StreamPage:
        """One long-poll round from `offset`: the records after it as soon as there are any
        (or none when the service's wait runs out), then control comes back.

        The protocol client's own live iteration hides its 204s and, at the tail of a closed
        stream (a 204 with `Stream-Closed: true`), asks again at once forever; a bounded round
        lets the caller see `closed` and resume from its own offset after any failure."""
        with self._stream_errors():
            try:
                res = durable_streams.stream(
                    self.stream_url(session_id),
                    offset=offset,
                    # Catch-up mode ends at the first up-to-date answer; the `live` parameter
                    # makes the service hold that answer until there is something new.
                    live=False,
                    params={"live": "long-poll"},
                    headers=dict(self.headers()),
                    client=self._http,
                    timeout=timeout,
                )
                with res:
                    records: list[dict[str, Any]] = []
                    for event in res.iter_events(mode="json_batches"):
                        records.extend(r for r in event.data if isinstance(r, dict))
                    closed = str(res.headers.get("stream-closed", "")).lower() == "true"
                    return StreamPage(records, res.offset or offset, res.up_to_date, closed)
            except httpx.TimeoutException:
                # Nothing arrived within our wait: the same as the service's empty answer.
                return StreamPage([], offset, True, False)

    def follow_stream(
        self, session_id: str, offset: str, *, timeout: float = 60.0
    ) -> Iterator[StreamPage]:
        """Catch up from `offset`, then follow live with long-poll rounds, page by page, until
        the stream closes (the page that says so is yielded too). For code that may block
        (CLI, tests); never inside a Streamlit tick."""
        while True:
            page = self.poll_stream(session_id, offset, timeout=timeout)
            offset = page.next_offset
            if page.records or page.closed:
                yield page
            if page.closed:
                return

    @contextlib.contextmanager
    def _stream_errors(self) -> Iterator[None]:
        try:
            yield
        except durable_streams.DurableStreamError as exc:
            status = exc.status or 0
            detail = _detail_of(exc.details) or exc.message
            cls = _BY_STATUS.get(status, ServiceError)
            raise cls(status, (exc.code or "stream_error").lower(), detail) from None
        except durable_streams.FetchError as exc:
            raise ServiceError(exc.status or 0, "stream_error", exc.message) from None
        except httpx.HTTPError as exc:
            raise Unreachable(
                0, "unreachable", f"cannot read the stream at {self.base_url} ({exc})"
            ) from None


def _detail_of(body: Any) -> str | None:
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if isinstance(body, str):
        try:
            parsed = json.loads(body)
        except ValueError:
            return body or None
        if isinstance(parsed, dict) and isinstance(parsed.get("detail"), str):
            return str(parsed["detail"])
    return None

"""The client's HTTP side: the console's typed client plus a bounded long-poll, and the one
line each failure becomes on stderr."""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator

import httpx

from console.client import (
    Forbidden,
    NotAvailable,
    NotFound,
    ServiceClient,
    ServiceError,
    StreamPage,
    Unauthorized,
    Unreachable,
)
from streams_service.client.config import ClientConfig

# Longer than the service's long-poll wait (30 s by default), so an idle poll ends with the
# service's 204, not with our timeout.
POLL_TIMEOUT_S = 75.0
REQUEST_TIMEOUT_S = 30.0
# Worth retrying: the service is restarting, draining or briefly overloaded.
TRANSIENT_STATUSES = frozenset({0, 408, 425, 429, 500, 502, 503, 504})


class CliClient(ServiceClient):
    """The console's client with the CLI's timeouts: a long-poll round outlasts the
    service's own wait, so an idle round ends with the service's empty answer."""

    def poll_stream(
        self, session_id: str, offset: str, *, timeout: float = POLL_TIMEOUT_S
    ) -> StreamPage:
        return super().poll_stream(session_id, offset, timeout=timeout)


@contextlib.contextmanager
def connect(config: ClientConfig) -> Iterator[CliClient]:
    token = config.token
    headers = {"User-Agent": f"chatops-cli/{_version()}"}
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, headers=headers) as http:
        yield CliClient(config.url, http=http, token=lambda: token)


def _version() -> str:
    try:
        return importlib.metadata.version("chatops")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


def transient(exc: ServiceError) -> bool:
    return exc.status in TRANSIENT_STATUSES


def describe(exc: ServiceError, config: ClientConfig, session_id: str | None = None) -> str:
    """The one line (without the `chatops: ` prefix) a failure prints."""
    if isinstance(exc, Unreachable):
        reason = exc.detail
        # The console's sentence already names the URL; add what to check.
        return (
            f"{reason} — is the service running? (URL from {config.url_source}; "
            "set --url or STREAMS_URL)"
        )
    if isinstance(exc, Unauthorized):
        if config.token is None:
            return (
                f"the service at {config.url} needs a token (401): set --token, STREAMS_TOKEN, "
                ".env or ~/.config/chatops/config.toml"
            )
        return (
            f"the service at {config.url} rejected the token from {config.token_source} "
            f"(401: {exc.detail})"
        )
    if isinstance(exc, Forbidden):
        return f"not allowed (403): {exc.detail}"
    if isinstance(exc, NotFound) and not isinstance(exc, NotAvailable) and session_id:
        return f"session {session_id} does not exist (or is not yours)"
    status = f" ({exc.status})" if exc.status else ""
    return f"{exc.detail}{status}"

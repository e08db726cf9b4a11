"""The console's few settings, read from the environment at the moment they are needed."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_STREAMS_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    # Where the Streams service listens; the console reaches it over HTTP only.
    streams_url: str
    # The service's STREAMS_SECRET: with it the console signs short-lived JWTs for its
    # signed-in user; without it the service is in dev mode and takes calls as they are.
    streams_secret: str | None
    # How often a live answer is polled (the fragment timer). Below 0.25 s costs too much CPU
    # per open tab for no visible gain (reference/streamlit.md §1, timings).
    live_interval_s: float
    # How often an idle chat checks its stream, so an answer started in another tab shows up.
    idle_interval_s: float
    # Seconds one HTTP call to the service may take before the console gives up on it.
    http_timeout_s: float

    @classmethod
    def from_env(cls) -> ConsoleConfig:
        secret = os.environ.get("STREAMS_SECRET") or None
        return cls(
            streams_url=(os.environ.get("STREAMS_URL") or DEFAULT_STREAMS_URL).rstrip("/"),
            streams_secret=secret,
            live_interval_s=max(0.25, _float("CONSOLE_LIVE_INTERVAL_S", 0.5)),
            idle_interval_s=max(1.0, _float("CONSOLE_IDLE_INTERVAL_S", 3.0)),
            http_timeout_s=max(1.0, _float("CONSOLE_HTTP_TIMEOUT_S", 15.0)),
        )


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {raw!r}") from None

"""Streamlit glue shared by the pages: the signed-in context, the HTTP client, notices.

`app.py` builds the `Context` once per run (sign-in, who am I, role) and the pages read it with
`context()`; pages never build clients or read secrets themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import streamlit as st

from console.auth import Identity, TokenSource
from console.client import Me, Models, NotAvailable, ServiceClient, ServiceError, Unreachable
from console.config import ConsoleConfig

T = TypeVar("T")

ROLES = ("member", "ops", "admin")
_CTX = "_console_ctx"
_FLASH = "_console_flash"
ME_TTL_S = 30.0
MODELS_TTL_S = 300.0


@dataclass
class Context:
    config: ConsoleConfig
    identity: Identity
    client: ServiceClient
    me: Me | None
    role: str
    # Why `me` is missing, when it is (an older service without GET /v1/me, or an error).
    me_problem: str | None = None

    @property
    def reads_all(self) -> bool:
        return self.role in ("ops", "admin")

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@st.cache_resource
def _http(timeout_s: float) -> httpx.Client:
    # One pooled client per process, shared by every browser session (httpx.Client is
    # thread-safe); each request carries its own user's token.
    return httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=50))


def build_context(identity: Identity) -> Context:
    config = ConsoleConfig.from_env()
    state = st.session_state
    tokens = state.get("_console_tokens")
    if not isinstance(tokens, TokenSource) or tokens.identity != identity:
        tokens = TokenSource(config.streams_secret, identity)
        state["_console_tokens"] = tokens
    client = ServiceClient(config.streams_url, http=_http(config.http_timeout_s), token=tokens)
    me, problem = _me(client, identity)
    if me is not None:
        role = me.role if me.role in ROLES else "member"
    else:
        # No GET /v1/me: a dev-mode service treats every caller as its local admin; with a
        # secret we cannot know, so show the least.
        role = "admin" if config.streams_secret is None else "member"
    ctx = Context(config, identity, client, me, role, problem)
    state[_CTX] = ctx
    return ctx


def _me(client: ServiceClient, identity: Identity) -> tuple[Me | None, str | None]:
    state = st.session_state
    cached = state.get("_console_me")
    if cached and cached[0] == identity.email and time.monotonic() - cached[1] < ME_TTL_S:
        return cached[2], cached[3]
    me: Me | None = None
    problem: str | None = None
    try:
        me = client.me()
    except NotAvailable:
        problem = "This service has no GET /v1/me yet: roles and daily budgets are not shown."
    except ServiceError as exc:
        problem = str(exc)
    state["_console_me"] = (identity.email, time.monotonic(), me, problem)
    return me, problem


def context() -> Context:
    ctx = st.session_state.get(_CTX)
    if not isinstance(ctx, Context):
        st.error("The console context is missing: open the console through app.py.")
        st.stop()
    return ctx


def models(client: ServiceClient) -> Models | None:
    """The model catalog (cached a few minutes per browser session)."""
    cached = st.session_state.get("_console_models")
    if cached and time.monotonic() - cached[0] < MODELS_TTL_S:
        result: Models = cached[1]
        return result
    try:
        catalog = client.models()
    except ServiceError as exc:
        show_error(exc)
        return None
    st.session_state["_console_models"] = (time.monotonic(), catalog)
    return catalog


# ---------------------------------------------------------------------------------- notices


def show_error(exc: ServiceError, *, feature: str | None = None) -> None:
    if isinstance(exc, NotAvailable):
        what = feature or "This part of the console"
        st.info(f"{what} needs a newer service: {exc.detail}.", icon=":material/construction:")
    elif isinstance(exc, Unreachable):
        st.error(f"{exc.detail}. Is the service running?", icon=":material/cloud_off:")
    else:
        st.error(exc.detail, icon=":material/error:")


def call(fn: Callable[[], T], *, feature: str | None = None) -> T | None:
    """Run one service call; on failure show why and return None."""
    try:
        return fn()
    except ServiceError as exc:
        show_error(exc, feature=feature)
        return None


def flash(kind: str, text: str) -> None:
    """A notice for the next run (callbacks run before the page, and reruns clear the page)."""
    st.session_state.setdefault(_FLASH, []).append((kind, text))


@contextmanager
def flashing_errors() -> Iterator[None]:
    """For button callbacks: a service error becomes a notice on the next run."""
    try:
        yield
    except ServiceError as exc:
        flash("error", exc.detail)


def show_flashes() -> None:
    for kind, text in st.session_state.pop(_FLASH, []):
        if kind == "error":
            st.error(text, icon=":material/error:")
        elif kind == "success":
            st.success(text)
        else:
            st.info(text)


def sidebar_identity(ctx: Context) -> None:
    with st.sidebar:
        if ctx.identity.dev:
            st.warning(
                "**Development mode** — no sign-in is configured; you are the local user "
                f"`{ctx.identity.email}`.",
                icon=":material/science:",
            )
        else:
            st.caption(f"Signed in as **{ctx.identity.name}** ({ctx.identity.email})")
        st.caption(f"Role: **{ctx.role}** · service: `{ctx.config.streams_url}`")
        if ctx.me_problem:
            st.caption(ctx.me_problem)


def rows_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows flattened for display (nested values as short text)."""
    flat: list[dict[str, Any]] = []
    for row in rows:
        flat.append(
            {
                k: (v if isinstance(v, str | int | float | bool) or v is None else str(v))
                for k, v in row.items()
            }
        )
    return flat

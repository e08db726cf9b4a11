"""Who uses the console, and the bearer token the service gets for them (DESIGN §4).

Production: Streamlit's native OIDC (`st.login`, configured under `[auth]` in
`.streamlit/secrets.toml`); `st.user` holds the ID-token claims. Dev (no `[auth]`): a clearly
marked local user, no sign-in.

With `STREAMS_SECRET` the console signs a short-lived HS256 JWT for the signed-in user (subject:
their email) and the service provisions and authorizes them from it. Without a secret the service
is in dev mode and takes calls without a token.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import jwt
import streamlit as st

# Well under the service's 10-minute ceiling; a token is re-minted a minute before it expires,
# so a request never leaves with one about to lapse.
TOKEN_LIFETIME_S = 300
RENEW_BEFORE_S = 60
ISSUER = "chatops-console"


@dataclass(frozen=True, slots=True)
class Identity:
    email: str
    name: str
    # The local user of a console without sign-in configured (development only).
    dev: bool = False


LOCAL_USER = Identity(email="local@localhost", name="Local user (dev)", dev=True)


def mint_jwt(
    secret: str, identity: Identity, *, lifetime_s: int = TOKEN_LIFETIME_S, now: float | None = None
) -> str:
    """The console JWT the service accepts: HS256 over STREAMS_SECRET, `sub` = the email."""
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": identity.email,
        "email": identity.email,
        "name": identity.name,
        "iss": ISSUER,
        "iat": issued,
        "exp": issued + lifetime_s,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


class TokenSource:
    """Bearer tokens for one identity: minted on demand, reused until close to expiry."""

    def __init__(self, secret: str | None, identity: Identity) -> None:
        self._secret = secret
        self.identity = identity
        self._token: str | None = None
        self._expires = 0.0

    def __call__(self) -> str | None:
        if self._secret is None:
            return None  # dev-mode service: no token
        now = time.time()
        if self._token is None or now > self._expires - RENEW_BEFORE_S:
            self._token = mint_jwt(self._secret, self.identity, now=now)
            self._expires = now + TOKEN_LIFETIME_S
        return self._token


# ---------------------------------------------------------------------------------- Streamlit


def auth_settings() -> Mapping[str, Any] | None:
    """The `[auth]` section of the secrets, or None when sign-in is not configured."""
    try:
        section = st.secrets.get("auth")
    except (FileNotFoundError, KeyError):
        return None
    except Exception:  # Streamlit raises its own error type for an unreadable secrets file
        return None
    return section if isinstance(section, Mapping) and section else None


def providers(section: Mapping[str, Any]) -> list[str | None]:
    """Sign-in choices: named `[auth.NAME]` providers, or the default one (None)."""
    named = [key for key, value in section.items() if isinstance(value, Mapping)]
    if "client_id" in section or not named:
        return [None, *named]
    return list(named)


def sign_in() -> Identity:
    """The signed-in user. When there is none, the sign-in screen is the only page registered
    (so no URL reaches another page), and the run stops."""
    section = auth_settings()
    if section is None:
        if os.environ.get("STREAMS_SECRET"):
            # The service authenticates, so an unauthenticated local user would be an open door
            # into it (as whoever the console signs for): refuse instead.
            _only_page(_no_sign_in_screen, "Sign-in not configured")
        return LOCAL_USER
    user = st.user
    if not user.get("is_logged_in"):
        _only_page(lambda: _login_screen(section), "Sign in")
    expires = user.get("exp")
    # Streamlit does not enforce the ID token's expiry (reference/streamlit.md §3).
    if isinstance(expires, int | float) and expires < time.time():
        st.logout()
        st.stop()
    email = user.get("email")
    if not isinstance(email, str) or not email:
        _only_page(_no_email_screen, "Sign-in problem")
    name = user.get("name")
    return Identity(email=email, name=name if isinstance(name, str) and name else email)


def _only_page(render: Callable[[], None], title: str) -> NoReturn:
    st.navigation([st.Page(render, title=title, url_path="signin")], position="hidden").run()
    st.stop()


def _login_screen(section: Mapping[str, Any]) -> None:
    st.title("chatops")
    st.write("Sign in with your company account to use the console.")
    for provider in providers(section):
        label = "Sign in" if provider is None else f"Sign in with {provider}"
        if st.button(label, type="primary", key=f"login-{provider or 'default'}"):
            if provider is None:
                st.login()
            else:
                st.login(provider)


def _no_sign_in_screen() -> None:
    st.error(
        "Sign-in is not configured: STREAMS_SECRET is set, so the console needs an `[auth]` "
        "section in .streamlit/secrets.toml (see .streamlit/secrets.toml.example). Without "
        "STREAMS_SECRET the console runs as a local development user."
    )


def _no_email_screen() -> None:
    st.error(
        "Your identity provider did not send an email address, which the console needs "
        "to know who you are. Ask an admin to add the `email` scope."
    )
    st.button("Sign out", on_click=sign_out)


def sign_out() -> None:
    st.logout()

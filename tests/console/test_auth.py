"""Console sign-in and the JWT it mints, checked by the service's own verifier and by a real
service with STREAMS_SECRET: the signed-in user becomes who the service sees, and the pages
follow the role the service gives them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import jwt
import pytest
from streamlit.testing.v1 import AppTest

from console.auth import LOCAL_USER, RENEW_BEFORE_S, TOKEN_LIFETIME_S, Identity, TokenSource
from console.auth import mint_jwt as mint
from streams_service.access.tokens import InvalidJWT, verify_jwt
from tests.console.support import APP
from tests.support import ServerProcess

SECRET = "console-test-secret-0123456789abcdef"
AUTH = {
    "redirect_uri": "http://127.0.0.1:8501/oauth2callback",
    "cookie_secret": "cookie-secret",
    "client_id": "console",
    "client_secret": "client-secret",
    "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration",
}
ALICE = Identity(email="alice@example.com", name="Alice")


def test_minted_jwt_is_what_the_service_accepts() -> None:
    claims = verify_jwt(SECRET, mint(SECRET, ALICE))
    assert claims.email == "alice@example.com" and claims.name == "Alice"
    decoded = jwt.decode(mint(SECRET, ALICE), SECRET, algorithms=["HS256"])
    assert decoded["exp"] - decoded["iat"] == TOKEN_LIFETIME_S <= 600
    with pytest.raises(InvalidJWT):
        verify_jwt(SECRET, mint("another-secret-of-enough-length!!", ALICE))
    with pytest.raises(InvalidJWT):
        verify_jwt(SECRET, mint(SECRET, ALICE, now=0))  # long expired


def test_token_source_reuses_then_renews_before_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr("console.auth.time.time", lambda: clock[0])
    source = TokenSource(SECRET, ALICE)
    first = source()
    clock[0] += TOKEN_LIFETIME_S - RENEW_BEFORE_S - 1
    assert source() == first
    clock[0] += 2
    renewed = source()
    assert renewed != first
    claims = jwt.decode(renewed, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["iat"] == int(clock[0])
    assert TokenSource(None, LOCAL_USER)() is None  # dev-mode service: no token at all


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("secured")
    server = ServerProcess(
        f"sqlite:///{root / 'db.sqlite'}",
        root,
        "secured",
        STREAMS_SECRET=SECRET,
        ADMIN_EMAILS="boss@example.com",
        SIMULATOR_TOKENS_PER_S="0",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def signed_in(secured: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("STREAMS_URL", secured.base_url)
    monkeypatch.setenv("STREAMS_SECRET", SECRET)
    at = AppTest.from_file(APP, default_timeout=30)
    at.secrets["auth"] = AUTH
    return at


def known_pages(at: AppTest, probe: str) -> str:
    """The pages st.navigation registered, from AppTest's refusal to switch to `probe`."""
    with pytest.raises(ValueError, match="Known pages") as raised:
        at.switch_page(probe)
    return str(raised.value).split("Known pages")[1]


def test_without_a_signed_in_user_only_the_sign_in_screen_shows(signed_in: AppTest) -> None:
    at = signed_in
    at.run()
    assert not at.exception
    assert [b.label for b in at.button] == ["Sign in"]
    assert not at.chat_input
    # The sign-in screen is the only page there is: no URL reaches another one.
    assert known_pages(at, "views/admin.py") == ": ['Sign in']."


def test_member_sees_chat_history_usage_and_acts_as_themselves(
    signed_in: AppTest, secured: ServerProcess
) -> None:
    at = signed_in
    at.user = {"is_logged_in": True, "email": "alice@example.com", "name": "Alice"}
    at.run()
    assert not at.exception
    captions = [c.value for c in at.sidebar.caption]
    assert "Signed in as **Alice** (alice@example.com)" in captions
    assert any("Role: **member**" in c for c in captions)
    pages = known_pages(at, "views/admin.py")
    assert "chat.py" in pages and "history.py" in pages and "usage.py" in pages
    assert "admin.py" not in pages and "errors.py" not in pages and "limits.py" not in pages
    at.chat_input[0].set_value("hi [[tokens:3]]").run()
    assert not at.exception
    assert not at.error
    session_id = str(at.query_params["session"])
    # The session belongs to Alice: the service saw the console's JWT, not a local admin.
    listed = httpx.get(
        f"{secured.base_url}/v1/sessions",
        params={"user": "all"},
        headers={"Authorization": f"Bearer {SECRET}"},
    ).json()["items"]
    owner = next(item["user"] for item in listed if item["id"] == session_id)
    assert owner["email"] == "alice@example.com"


def test_admin_email_gets_every_page(signed_in: AppTest) -> None:
    at = signed_in
    at.user = {"is_logged_in": True, "email": "boss@example.com", "name": "Boss"}
    at.run()
    assert not at.exception
    at.switch_page("views/admin.py").run()
    assert not at.exception
    assert at.title[0].value == "Admin"
    emails = [str(v) for v in at.dataframe[0].value["Email"]]
    assert "boss@example.com" in emails


def test_secret_without_sign_in_configured_is_refused(
    secured: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An authenticating service behind a console nobody signs in to would be open to anyone.
    monkeypatch.setenv("STREAMS_URL", secured.base_url)
    monkeypatch.setenv("STREAMS_SECRET", SECRET)
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert "Sign-in is not configured" in at.error[0].value
    assert not at.chat_input and not at.button


def test_provider_without_email_is_refused_clearly(signed_in: AppTest) -> None:
    at = signed_in
    at.user = {"is_logged_in": True, "sub": "someone"}
    at.run()
    assert "did not send an email address" in at.error[0].value
    assert not at.chat_input

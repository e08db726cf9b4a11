"""Sign-in end to end in Chromium: the console with `[auth]` configured sends the browser to an
OpenID Connect provider (oidc-provider-mock, a real OIDC server on loopback), comes back signed
in, and calls a service that has STREAMS_SECRET with a JWT for that user: the service's role
decides the pages, and the chat is the user's own."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.console.support import ConsoleProcess
from tests.support import REPO_ROOT, ServerProcess, free_port, tail, terminate

SECRET = "browser-sign-in-secret-0123456789abcdef"
ALICE = {"sub": "alice", "email": "alice@example.com", "name": "Alice Example"}


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("oidc") / "oidc.log"
    binary = shutil.which("oidc-provider-mock", path=str(Path(REPO_ROOT / ".venv" / "bin")))
    assert binary, "oidc-provider-mock is a dev dependency: run `make install`"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--user-claims", json.dumps(ALICE)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/.well-known/openid-configuration", timeout=2):
                break
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                terminate(proc)
                pytest.fail(f"oidc-provider-mock did not start:\n{tail(log)}", pytrace=False)
            time.sleep(0.2)
    try:
        yield url
    finally:
        terminate(proc)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("secured-browser")
    server = ServerProcess(
        f"sqlite:///{root / 'db.sqlite'}",
        root,
        "secured",
        STREAMS_SECRET=SECRET,
        SIMULATOR_TOKENS_PER_S="200",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def signed_console(
    provider: str, secured: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    home = tmp_path_factory.mktemp("console-auth")
    (home / ".streamlit").mkdir()
    shutil.copy(REPO_ROOT / ".streamlit" / "config.toml", home / ".streamlit" / "config.toml")
    process = ConsoleProcess(secured.base_url, home, cwd=home, STREAMS_SECRET=SECRET)
    (home / ".streamlit" / "secrets.toml").write_text(
        "[auth]\n"
        f'redirect_uri = "{process.url}/oauth2callback"\n'
        'cookie_secret = "console-cookie-secret-for-tests"\n'
        'client_id = "console"\n'
        'client_secret = "console-secret"\n'
        f'server_metadata_url = "{provider}/.well-known/openid-configuration"\n'
    )
    process.start()
    try:
        yield process.url
    finally:
        process.stop()


def test_sign_in_then_chat_as_that_user(
    page: Page, signed_console: str, secured: ServerProcess
) -> None:
    page.goto(signed_console + "/admin")
    # Not signed in: the sign-in screen, whatever page was asked for.
    expect(page.get_by_text("Sign in with your company account")).to_be_visible()
    expect(page.get_by_role("dialog")).to_contain_text("Page not found")
    page.keyboard.press("Escape")
    assert page.get_by_placeholder("Message Claude").count() == 0
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("button", name="alice").click()
    expect(page.get_by_text("Signed in as Alice Example (alice@example.com)")).to_be_visible(
        timeout=20_000
    )
    expect(page.get_by_text("Role: member")).to_be_visible()
    nav = page.get_by_test_id("stSidebarNav")
    expect(nav.get_by_role("link", name="History")).to_be_visible()
    assert nav.get_by_role("link", name="Admin").count() == 0
    box = page.get_by_placeholder("Message Claude")
    box.fill("Hello from Alice [[tokens:20]]")
    box.press("Enter")
    expect(page.get_by_role("button", name="Regenerate")).to_be_visible(timeout=20_000)
    listed = httpx.get(
        f"{secured.base_url}/v1/sessions",
        params={"user": "all"},
        headers={"Authorization": f"Bearer {SECRET}"},
    ).json()["items"]
    assert [item["user"]["email"] for item in listed] == ["alice@example.com"]

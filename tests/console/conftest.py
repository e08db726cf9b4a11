"""Console tests: the console (AppTest in-process, or `streamlit run` for the browser tests)
against a real `chatops serve` process running on its built-in simulator, over HTTP only.

One service per test run (SQLite; the console never sees the database): each test makes its
own sessions, and reads only what it made.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserType, Playwright, sync_playwright
from streamlit.testing.v1 import AppTest

from tests.console.support import APP, CHROMIUM_ARGS, ConsoleProcess
from tests.support import ServerProcess

# Paced so an answer of N tokens takes N/60 s: tests choose short answers, the reload test a
# long one. Short long-polls keep shutdown quick.
SERVICE_ENV = {
    "SIMULATOR_TTFT_MS": "100",
    "SIMULATOR_TOKENS_PER_S": "60",
    "STREAMS_LONG_POLL_TIMEOUT_MS": "2000",
    "STREAM_FLUSH_INTERVAL_MS": "40",
}


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("console-service")
    server = ServerProcess(f"sqlite:///{root / 'chatops.db'}", root, "service", **SERVICE_ENV)
    server.env.pop("STREAMS_SECRET", None)
    server.env.pop("ANTHROPIC_API_KEY", None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api(service: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        yield client


@pytest.fixture
def console_env(service: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    """The environment an in-process console (AppTest) reads: the service, dev mode."""
    monkeypatch.setenv("STREAMS_URL", service.base_url)
    monkeypatch.delenv("STREAMS_SECRET", raising=False)
    return service.base_url


AppFactory = Callable[..., AppTest]


@pytest.fixture
def app(console_env: str) -> AppFactory:
    def make(session: str | None = None, **query: str) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=30)
        if session is not None:
            at.query_params["session"] = session
        for key, value in query.items():
            at.query_params[key] = value
        return at

    return make


def run_until(at: AppTest, done: Callable[[AppTest], bool], timeout_s: float = 30) -> AppTest:
    """Rerun the app until `done` holds (AppTest never fires fragment timers: each run is a
    full run that catches up from the kept offset). Bounded, so a hang fails."""
    deadline = time.monotonic() + timeout_s
    while True:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if done(at):
            return at
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.15)


def texts(at: AppTest, role: str | None = None) -> list[str]:
    """The message text of each chat bubble (of `role`): its own markdown, not what sits in
    expanders (thinking, tool calls)."""
    out = []
    for bubble in at.chat_message:
        if role is None or bubble.name == role:
            own = [c for c in bubble.children.values() if c.type == "markdown"]
            out.append("".join(str(m.value) for m in own))
    return out


def new_session(api: httpx.Client, **body: Any) -> str:
    response = api.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["id"]
    return session_id


def wait_idle(api: httpx.Client, session_id: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = api.get(f"/v1/sessions/{session_id}").json()
        if body["active_generation_id"] is None:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"generation still running after {timeout_s}s")
        time.sleep(0.05)


def chat(api: httpx.Client, session_id: str, content: str) -> dict[str, Any]:
    response = api.post(f"/v1/sessions/{session_id}/messages", json={"content": content})
    assert response.status_code == 202, response.text
    return wait_idle(api, session_id)


# ---------------------------------------------------------------------------------- browser


@pytest.fixture(scope="session")
def console(service: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process = ConsoleProcess(service.base_url, tmp_path_factory.mktemp("console")).start()
    try:
        yield process.url
    finally:
        process.stop()


# pytest-playwright keeps Playwright (and its event loop, running in this thread) for the whole
# session; every async test after it would then fail with "cannot be called from a running event
# loop". Here it lives for the browser-test module only.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser_type(playwright: Playwright, browser_name: str) -> BrowserType:
    chosen: BrowserType = getattr(playwright, browser_name or "chromium")
    return chosen


@pytest.fixture(scope="module")
def launch_browser(
    browser_type_launch_args: dict[str, Any], browser_type: BrowserType
) -> Callable[..., Browser]:
    def launch(**kwargs: Any) -> Browser:
        return browser_type.launch(**{**browser_type_launch_args, **kwargs})

    return launch


@pytest.fixture(scope="module")
def browser(launch_browser: Callable[..., Browser]) -> Iterator[Browser]:
    launched = launch_browser()
    yield launched
    launched.close()


@pytest.fixture(scope="module")
def browser_context_args() -> dict[str, Any]:
    return {"viewport": {"width": 1280, "height": 900}}


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict[str, Any]:
    """pytest-playwright launches Debian's Chromium (Playwright's own download cannot run
    here); `make test` installs it (scripts/ensure-chromium.sh)."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "chromium is not installed: run `make test` (or scripts/ensure-chromium.sh)",
            pytrace=False,
        )
    return {"executable_path": executable, "args": CHROMIUM_ARGS}

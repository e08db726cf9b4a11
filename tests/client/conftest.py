"""Terminal client tests: the real `chatops` console script, as a subprocess (on a pseudo
terminal for `chat`), against a real `chatops serve` on its built-in simulator. HTTP only.

One dev-mode service per test run (SQLite); tests make their own sessions and read only those.
Every subprocess gets a clean configuration: its own HOME and working directory, no
STREAMS_URL/STREAMS_TOKEN/XDG_CONFIG_HOME unless the test sets them.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.client.support import CliRun, run_cli
from tests.support import ServerProcess

# Answers are paced (N tokens take N/60 s): tests pick short answers, or long ones to catch
# them running. Short long-polls keep the service's shutdown quick.
SERVICE_ENV = {
    "SIMULATOR_TTFT_MS": "50",
    "SIMULATOR_TOKENS_PER_S": "60",
    "STREAMS_LONG_POLL_TIMEOUT_MS": "2000",
    "APPROVAL_TIMEOUT_S": "60",
}


def service_env(server: ServerProcess) -> ServerProcess:
    for name in ("STREAMS_SECRET", "ANTHROPIC_API_KEY", "STREAMS_URL", "STREAMS_TOKEN"):
        server.env.pop(name, None)
    return server


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("client-service")
    server = service_env(
        ServerProcess(f"sqlite:///{root / 'chatops.db'}", root, "service", **SERVICE_ENV)
    )
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
def home(tmp_path: Path) -> Path:
    """An empty HOME and working directory: no config file, no .env."""
    path = tmp_path / "home"
    (path / "work").mkdir(parents=True)
    return path


@pytest.fixture
def clean_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("STREAMS_URL", "STREAMS_TOKEN", "XDG_CONFIG_HOME", "STREAMS_SECRET")
    }
    env["HOME"] = str(home)
    env["NO_COLOR"] = "1"
    return env


@pytest.fixture
def cli(service: ServerProcess, clean_env: dict[str, str], home: Path) -> Callable[..., CliRun]:
    """`chatops ...` against the dev service (STREAMS_URL in the environment)."""

    def run(*args: str, **env: str) -> CliRun:
        return run_cli(
            list(args), env={**clean_env, "STREAMS_URL": service.base_url, **env}, cwd=home / "work"
        )

    return run


def new_session(api: httpx.Client, **body: Any) -> str:
    response = api.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["id"]
    return session_id


def send(api: httpx.Client, session_id: str, content: str) -> dict[str, Any]:
    response = api.post(f"/v1/sessions/{session_id}/messages", json={"content": content})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_idle(api: httpx.Client, session_id: str, timeout_s: float = 30) -> dict[str, Any]:
    """The session once no answer runs (bounded, so a hang fails instead of blocking)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = api.get(f"/v1/sessions/{session_id}").json()
        if body["active_generation_id"] is None:
            return body
        assert time.monotonic() < deadline, f"session {session_id} still busy"
        time.sleep(0.05)


def exchange(api: httpx.Client, content: str) -> tuple[str, dict[str, Any]]:
    """A new session holding one finished exchange."""
    session_id = new_session(api)
    send(api, session_id, content)
    return session_id, wait_idle(api, session_id)


def stored_text(message: dict[str, Any]) -> str:
    return "".join(p.get("content", "") for p in message["parts"] if p.get("type") == "text")


def kill_quietly(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)

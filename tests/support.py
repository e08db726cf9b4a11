"""Helpers shared by the test suites: fresh databases and real `chatops serve` processes."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
# Maintenance database used to create and drop per-test databases.
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
STARTUP_TIMEOUT_S = 30.0
# Suites that create many sessions quickly are not about rate limits; the tests that are set
# their own limits.
GENEROUS_LIMITS = {
    "RATE_LIMIT_SESSION_CREATE": "100000/minute",
    "RATE_LIMIT_MESSAGES": "100000/minute",
}


def chatops_bin() -> Path:
    """The `chatops` console script of the project's virtualenv."""
    for candidate in (
        REPO_ROOT / ".venv" / "bin" / "chatops",
        Path(sys.executable).parent / "chatops",
    ):
        if candidate.exists():
            return candidate
    pytest.fail("chatops console script not found; run `make install`", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def postgres_database(prefix: str = "chatops_test") -> Iterator[str]:
    """An empty database on the local server, dropped (forcibly) afterwards. Yields its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = conninfo_to_dict(PG_ADMIN_URL)
    try:
        conn = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}", pytrace=False)
    with conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            user = admin.get("user", "postgres")
            host = admin.get("host", "127.0.0.1")
            port = admin.get("port", "5432")
            yield f"postgresql://{user}@{host}:{port}/{name}"
        finally:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def migrate(database_url: str) -> None:
    """Run `chatops db upgrade` on the URL, as a deploy's release command does."""
    result = subprocess.run(
        [str(chatops_bin()), "db", "upgrade"],
        cwd=REPO_ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"`chatops db upgrade` failed (exit {result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}",
            pytrace=False,
        )


def tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no output>"


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with_kill(proc)


def with_kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=10)


class ServerProcess:
    """A real `chatops serve` on a free loopback port, its output in log files."""

    def __init__(self, database_url: str, log_dir: Path, name: str = "server", **env: str) -> None:
        self.database_url = database_url
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.stdout_path = log_dir / f"{name}.stdout.log"
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self.env = {**os.environ, **GENEROUS_LIMITS, "DATABASE_URL": database_url, **env}
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        cmd = [str(chatops_bin()), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready.\n"
                    f"--- stderr ---\n{tail(self.stderr_path)}",
                    pytrace=False,
                )
            if self.healthy():
                return
            time.sleep(0.1)
        pytest.fail(
            f"{self.name} was not ready within {STARTUP_TIMEOUT_S:.0f}s.\n"
            f"--- stderr ---\n{tail(self.stderr_path)}",
            pytrace=False,
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                status: int = response.status
                return status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)

    def kill(self) -> None:
        """SIGKILL: the crash case. Nothing gets a chance to flush or clean up."""
        if self.proc is not None:
            with_kill(self.proc)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class SseEvent:
    kind: str
    data: str


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """A text/event-stream body as events (WHATWG SSE framing)."""
    kind = ""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data or kind:
                yield SseEvent(kind or "message", "\n".join(data))
            kind, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)

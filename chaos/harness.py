"""Processes a scenario starts and breaks: the service, the simulator, a private Redis, and the
shared Postgres' restart. Every start and stop has a bound; nothing here waits forever."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from benchmarks import servers
from benchmarks.servers import PG_ADMIN_URL, REPO, free_port

CHATOPS = REPO / ".venv" / "bin" / "chatops"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
PG_CLUSTER = ("15", "main")
PG_RESTART_TIMEOUT_S = 60.0

# The service as every scenario runs it: dev mode, no limits to trip over (the Redis scenario
# sets its own), no budget caps (chaos sends many messages per session), crashed generations
# recovered within seconds rather than a minute, and no third-party telemetry.
BASE_ENV: dict[str, str] = {
    "ENV": "development",
    "RATE_LIMIT_SESSION_CREATE": "1000000/minute",
    "RATE_LIMIT_MESSAGES": "1000000/minute",
    "RATE_LIMIT_AUTH_FAILURES": "1000000/minute",
    "SESSION_BUDGET_USD": "0",
    "USER_DAILY_BUDGET_USD": "0",
    "GENERATION_STALE_AFTER_S": "4",
    "STREAMS_LONG_POLL_TIMEOUT_MS": "3000",
    "STREAMS_SSE_MAX_DURATION_S": "20",
    "STREAMS_SWEEP_INTERVAL_S": "3600",
    "RETENTION_SWEEP_INTERVAL_S": "3600",
    "SESSION_IDLE_TIMEOUT": "0",
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "console",
}
# Variables of the caller's environment that would change what the service does.
_SCRUBBED = (
    "STREAMS_SECRET",
    "REDIS_URL",
    "SENTRY_DSN_STREAMS",
    "POSTHOG_API_KEY",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "WORKERS",
)


class HarnessError(RuntimeError):
    """A process or database a scenario needs could not be prepared; not an invariant failure."""


# --- databases ------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(prefix: str = "chatops_chaos") -> Iterator[str]:
    """A fresh, migrated Postgres database, dropped (forcibly) afterwards. Yields its URL."""
    name = servers.create_database(prefix)
    url = servers.database_url(name)
    try:
        try:
            servers.migrate(url)
        except servers.ServerError as exc:
            raise HarnessError(str(exc)) from exc
        yield url
    finally:
        # The Postgres scenario may leave the server coming back up: give it a moment.
        wait_postgres(PG_RESTART_TIMEOUT_S)
        servers.drop_database(name)


def wait_postgres(timeout_s: float) -> bool:
    """True once Postgres accepts connections again (within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            time.sleep(0.3)
    return False


def restart_postgres() -> float:
    """Restart the shared cluster (pg_ctlcluster stops in fast mode: every connection is cut).
    Returns how long the command took; HarnessError if Postgres is not back in time."""
    started = time.monotonic()
    done = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "restart"],
        capture_output=True,
        text=True,
        timeout=PG_RESTART_TIMEOUT_S,
        check=False,
    )
    took = time.monotonic() - started
    if done.returncode != 0:
        ensure_postgres_up()
        raise HarnessError(f"pg_ctlcluster restart failed: {done.stderr.strip()[-500:]}")
    if not wait_postgres(PG_RESTART_TIMEOUT_S):
        ensure_postgres_up()
        raise HarnessError("Postgres did not come back after the restart")
    return took


def ensure_postgres_up() -> None:
    """Whatever happened, leave the shared Postgres running for everyone else."""
    if wait_postgres(5):
        return
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "start"],
        capture_output=True,
        timeout=PG_RESTART_TIMEOUT_S,
        check=False,
    )
    wait_postgres(PG_RESTART_TIMEOUT_S)


# --- processes ------------------------------------------------------------------------------


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = STOP_TIMEOUT_S) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
    else:
        # The leader is gone; nothing it spawned may outlive it.
        _signal_group(proc, signal.SIGKILL)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Service:
    """`chatops serve` on one database and one fixed port, so clients keep their URL across the
    kills and restarts a scenario does."""

    database_url: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    name: str = "service"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-{self.port}.log"

    def start(self) -> None:
        environ = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        environ.update(BASE_ENV)
        environ.update(self.env)
        environ["DATABASE_URL"] = self.database_url
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n=== chaos: start #{self.starts} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(CHATOPS), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds until /health answered 200; HarnessError if the process died or timed out."""
        assert self.proc is not None
        started = time.monotonic()
        deadline = started + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise HarnessError(
                        f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                        f"{_log_tail(self.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return time.monotonic() - started
                time.sleep(0.1)
        raise HarnessError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """The crash: SIGKILL to the whole process group; nothing gets to flush or clean up."""
        assert self.proc is not None
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def sigterm(self, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM (what a platform sends on deploy) and wait up to `timeout_s` for the exit.
        Returns (exit code or None if it did not exit in time, seconds waited)."""
        assert self.proc is not None
        started = time.monotonic()
        # The leader only: uvicorn's own handler and the drain chained before it run there.
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        _stop(self.proc)

    def log_tail(self, lines: int = 30) -> str:
        return _log_tail(self.log_path, lines)

    def log_count(self, needle: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(needle)
        except OSError:
            return 0


@dataclass
class Simulator:
    """A standalone `chatops simulator` on a fixed port, so it can be killed and brought back."""

    workdir: Path
    ttft_ms: int = 100
    tokens_per_s: int = 100
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log_path = self.workdir / "simulator.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(str(CHATOPS), "simulator", "--host", "127.0.0.1", "--port", str(self.port)),
                    *("--ttft-ms", str(self.ttft_ms), "--tokens-per-s", str(self.tokens_per_s)),
                ],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise HarnessError(f"simulator exited:\n{_log_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    got = client.get(f"{self.base_url}/v1/models", headers={"x-api-key": "sk"})
                    if got.status_code == 200:
                        return
                time.sleep(0.1)
        raise HarnessError(f"simulator not ready:\n{_log_tail(log_path)}")

    def kill9(self) -> None:
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        _stop(self.proc, 10)


def redis_available() -> str | None:
    return None if shutil.which("redis-server") else "redis-server is not installed"


@dataclass
class RedisServer:
    """A private redis-server (never the shared one on 6379), to kill, freeze and restart."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise HarnessError("redis-server is not installed (apt-get install redis-server)")
        log_path = self.workdir / f"redis-{self.port}.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(exe, "--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"redis-server exited:\n{_log_tail(log_path)}")
            if self.ping():
                return
            time.sleep(0.1)
        raise HarnessError("redis-server did not answer PING")

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill9(self) -> None:
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a network black hole)."""
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
        _stop(self.proc, 10)

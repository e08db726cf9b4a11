"""Start, probe, measure and stop the servers under test, each as a subprocess on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE = REPO / "conformance"
REFERENCE_SCRIPT = CONFORMANCE / "reference-server.mjs"
REFERENCE_PACKAGE = CONFORMANCE / "node_modules" / "@durable-streams" / "server"
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
LONG_POLL_TIMEOUT_MS = 30_000
STREAM_PREFIX = "/v1/stream/"

ServerName = Literal["ours", "reference"]
SERVER_NAMES: tuple[ServerName, ...] = ("ours", "reference")
SERVER_LABELS: dict[ServerName, str] = {
    "ours": "ours (chatops, Postgres)",
    "reference": "reference (@durable-streams/server, file-backed)",
}


class ServerError(RuntimeError):
    """A server could not be prepared or started; carries the tail of its log."""


@dataclass
class Server:
    """A running server under test."""

    name: ServerName
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    cleanup_dirs: list[Path] = field(default_factory=list)
    database: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stream_url(self, path: str) -> str:
        return f"{self.base_url}{STREAM_PREFIX}{path}"

    def stream_path(self, path: str) -> str:
        return f"{STREAM_PREFIX}{path}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server process and all its descendants."""
        return sum(_vm_rss(pid) for pid in _process_tree(self.pid))

    def cpu_seconds(self) -> float:
        """User + system CPU time consumed so far by the server process tree."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in _process_tree(self.pid):
            fields = _stat_fields(pid)
            if fields:
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def background_cpu(seconds: float = 1.0) -> float:
    """Cores' worth of CPU busy machine-wide over a short sample (other work skews results)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return round((busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1), 2)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is parenthesised and may contain spaces; fields resume after the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _vm_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- Postgres scratch databases -------------------------------------------------------------


def create_database(prefix: str = "chatops_bench") -> str:
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name is generated above, never user input
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url(name: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def migrate(url: str) -> None:
    """`chatops db upgrade` on the database at `url`, as a deploy's release step does."""
    upgrade = subprocess.run(
        [str(REPO / ".venv" / "bin" / "chatops"), "db", "upgrade"],
        env={**os.environ, "DATABASE_URL": url},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if upgrade.returncode != 0:
        raise ServerError(f"`chatops db upgrade` failed:\n{upgrade.stderr[-2000:]}")


# --- Starting servers -----------------------------------------------------------------------


def _ours_env(db_url: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("STREAMS_SECRET", "REDIS_URL", "SENTRY_DSN_STREAMS", "POSTHOG_API_KEY"):
        env.pop(var, None)
    env.update(
        DATABASE_URL=db_url,
        ENV="development",
        STREAMS_LONG_POLL_TIMEOUT_MS=str(LONG_POLL_TIMEOUT_MS),
        # Load generators are not abusers: the limits would measure themselves.
        RATE_LIMIT_SESSION_CREATE="1000000/minute",
        RATE_LIMIT_MESSAGES="1000000/minute",
    )
    return env


def ours_available() -> str | None:
    """None when `chatops serve` looks runnable, else the reason it is not."""
    exe = REPO / ".venv" / "bin" / "chatops"
    if not exe.exists():
        return f"{exe} not found (run `make install`)"
    proc = subprocess.run(
        [str(exe), "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return f"`chatops serve --help` failed: {tail[0]}"
    return None


def start_ours(workdir: Path) -> Server:
    reason = ours_available()
    if reason:
        raise ServerError(reason)
    exe = str(REPO / ".venv" / "bin" / "chatops")
    database = create_database()
    env = _ours_env(database_url(database))
    log_path = workdir / f"ours-{database}.log"
    try:
        migrate(database_url(database))
        port = free_port()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [exe, "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        server = Server("ours", f"http://127.0.0.1:{port}", proc, log_path, database=database)
        _wait_ready(server, lambda c: c.get(f"{server.base_url}/health").status_code == 200)
    except BaseException:
        drop_database(database)
        raise
    return server


def _reference_command(data_dir: Path, port: int) -> list[str]:
    if REFERENCE_SCRIPT.exists():
        return ["node", str(REFERENCE_SCRIPT), str(data_dir), str(port)]
    # The conformance project's launcher is missing: start the package directly.
    entry = REFERENCE_PACKAGE / "dist" / "index.js"
    script = (
        f"const {{ DurableStreamTestServer }} = await import({entry.as_uri()!r});"
        "const s = new DurableStreamTestServer({dataDir: process.argv[1], host: '127.0.0.1',"
        " port: Number(process.argv[2]),"
        " longPollTimeout: Number(process.env.STREAMS_LONG_POLL_TIMEOUT_MS)});"
        "console.log(await s.start());"
        "const stop = async () => { await s.stop(); process.exit(0); };"
        "process.on('SIGTERM', stop); process.on('SIGINT', stop);"
    )
    return ["node", "--input-type=module", "-e", script, str(data_dir), str(port)]


def reference_available() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (REFERENCE_PACKAGE / "package.json").exists():
        return f"{REFERENCE_PACKAGE} not installed (run `make node`)"
    return None


def start_reference(workdir: Path) -> Server:
    reason = reference_available()
    if reason:
        raise ServerError(reason)
    data_dir = Path(tempfile.mkdtemp(prefix="reference-data-", dir=workdir))
    port = free_port()
    env = dict(os.environ, STREAMS_LONG_POLL_TIMEOUT_MS=str(LONG_POLL_TIMEOUT_MS))
    log_path = workdir / f"reference-{data_dir.name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            _reference_command(data_dir, port),
            env=env,
            cwd=CONFORMANCE if CONFORMANCE.exists() else REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(
        "reference", f"http://127.0.0.1:{port}", proc, log_path, cleanup_dirs=[data_dir]
    )

    def probe(client: httpx.Client) -> bool:
        url = server.stream_url(f"ready-probe-{secrets.token_hex(4)}")
        created = client.put(url, headers={"Content-Type": "application/octet-stream"})
        return created.status_code in (200, 201)

    _wait_ready(server, probe)
    return server


def _wait_ready(
    server: Server, probe: Callable[[httpx.Client], bool], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if not server.alive():
                stop(server)
                raise ServerError(
                    f"{server.name} server exited with {server.proc.returncode}:\n"
                    f"{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if probe(client):
                    return
            time.sleep(0.2)
    log = server.log_tail()
    stop(server)
    raise ServerError(f"{server.name} server not ready after {timeout:.0f}s:\n{log}")


def start(name: ServerName, workdir: Path) -> Server:
    return start_ours(workdir) if name == "ours" else start_reference(workdir)


def stop(server: Server) -> None:
    if server.alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)
    else:
        # The leader is gone; make sure no worker it spawned outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)
    if server.database:
        drop_database(server.database)
        server.database = None
    for directory in server.cleanup_dirs:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def running(name: ServerName, workdir: Path) -> Iterator[Server]:
    server = start(name, workdir)
    try:
        yield server
    finally:
        stop(server)

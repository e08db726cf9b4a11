"""Service shell: health, readiness, CORS and security headers, CLI errors, migrations."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, inspect

from db.engine import normalize_database_url, sync_url
from streams_service.app import create_app
from streams_service.config import Settings
from streams_service.heap import GC_YOUNG_THRESHOLD, GIL_SWITCH_INTERVAL_S
from tests.support import REPO_ROOT, chatops_bin, free_port, migrate, postgres_database, terminate


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert health.headers["x-content-type-options"] == "nosniff"
    ready = await client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_ready_is_503_when_the_database_does_not_answer() -> None:
    # Nothing listens on port 1: the service starts, says it is alive, and not ready.
    settings = Settings(database_url="postgresql://postgres@127.0.0.1:1/none")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/health")).status_code == 200
            ready = await client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["status"] == "unavailable"
            append = await client.post(
                "/v1/stream/x", headers={"Content-Type": "text/plain"}, content=b"hi"
            )
            assert append.status_code == 503
            assert set(append.json()) == {"error", "detail"}


async def test_cors_preflight_allows_protocol_headers(client: httpx.AsyncClient) -> None:
    response = await client.options(
        "/v1/stream/anything",
        headers={
            "Origin": "https://console.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "producer-id, stream-seq, if-none-match",
        },
    )
    assert response.status_code == 200
    allowed = response.headers["access-control-allow-headers"].lower()
    for header in ("producer-id", "stream-seq", "if-none-match"):
        assert header in allowed


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:////abs/x.db", "sqlite+aiosqlite:////abs/x.db"),
    ],
)
def test_database_urls_are_normalised(raw: str, expected: str) -> None:
    assert normalize_database_url(raw) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "mysql://x/y"}, "unsupported database 'mysql'"),
        ({"STREAMS_LONG_POLL_TIMEOUT_MS": "soon"}, "STREAMS_LONG_POLL_TIMEOUT_MS"),
    ],
)
def test_cli_reports_bad_settings_in_one_line(env: dict[str, str], message: str) -> None:
    result = subprocess.run(
        [str(chatops_bin()), "db", "upgrade"],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_db_upgrade_creates_the_schema_and_is_idempotent() -> None:
    with postgres_database() as url:
        migrate(url)
        migrate(url)
        engine = create_engine(sync_url(normalize_database_url(url)))
        try:
            tables = set(inspect(engine).get_table_names())
        finally:
            engine.dispose()
        assert {"ds_streams", "ds_messages", "ds_producers", "alembic_version"} <= tables


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in readme]
    assert not missing, f"settings missing from README.md: {missing}"


async def test_a_served_app_freezes_its_startup_heap(tmp_path: Path) -> None:
    """`chatops serve` (handle_signals) hides its start-up objects from the cyclic collector
    and collects its young generation less often (see freeze_startup_heap):
    full collections stopped the loop for 200+ ms at 100 generations otherwise. An app that
    does not own its process (tests, embedding) leaves the collector alone."""
    import gc

    gc.unfreeze()
    thresholds = gc.get_threshold()
    switch = sys.getswitchinterval()
    settings = Settings(database_url=f"sqlite:///{tmp_path}/gc.db")
    try:
        plain = create_app(settings)
        async with plain.router.lifespan_context(plain):
            assert gc.get_freeze_count() == 0
            assert gc.get_threshold() == thresholds
            assert sys.getswitchinterval() == switch
        served = create_app(settings, handle_signals=True)
        async with served.router.lifespan_context(served):
            frozen = gc.get_freeze_count()
            assert frozen > 10_000  # the modules, engines and caches of a started service
            # The young generation is collected less often; the older ones as before.
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *thresholds[1:])
            assert sys.getswitchinterval() == GIL_SWITCH_INTERVAL_S
            transport = httpx.ASGITransport(app=served)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/health")).status_code == 200
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(switch)


@contextlib.contextmanager
def _served(tmp_path: Path, **env: str) -> Iterator[int]:
    """`chatops serve` on the embedded default from `tmp_path`, ready; yields its port."""
    port = free_port()
    environ = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ANTHROPIC_API_KEY")
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(chatops_bin()), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=environ | env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "not ready within 60 s"
                time.sleep(0.2)
        yield port
    finally:
        terminate(proc)
        log.close()


def test_serve_from_a_fresh_directory_creates_its_sqlite_folder(tmp_path: Path) -> None:
    """The embedded default (`./.data/chatops.db`) works wherever `chatops serve` starts: the
    start-up migration creates the folder instead of failing with "unable to open database
    file"."""
    with _served(tmp_path):
        pass
    assert (tmp_path / ".data" / "chatops.db").is_file()


def test_serve_keeps_idle_connections_open_for_http_keep_alive_s(tmp_path: Path) -> None:
    """An idle keep-alive connection outlives the client's own idle limit (httpx: 5 s) by
    default, and closes after HTTP_KEEP_ALIVE_S: here 2 s, to see both sides of it quickly."""
    assert Settings().http_keep_alive_s > 5
    with _served(tmp_path, HTTP_KEEP_ALIVE_S="2") as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            sockets = set()
            for pause in (0.0, 1.0):  # idle, but within the keep-alive: the same connection
                time.sleep(pause)
                conn.request("GET", "/health")
                response = conn.getresponse()
                assert response.status == 200 and response.read() == b'{"status":"ok"}'
                sockets.add(id(conn.sock))
            assert len(sockets) == 1 and conn.sock is not None
            time.sleep(3.0)  # idle past it: the server has closed its end
            assert conn.sock.recv(1, socket.MSG_PEEK) == b""
        finally:
            conn.close()

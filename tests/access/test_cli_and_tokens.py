"""`chatops users|tokens` on a real database, credentials, and the start-up rules of auth."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from db.migrate import upgrade
from streams_service.access.tokens import InvalidJWT, hash_token, mint_jwt, verify_jwt
from streams_service.app import create_app
from streams_service.config import Settings
from tests.access.conftest import bearer
from tests.support import chatops_bin, free_port

SECRET = "cli-secret-" + "y" * 32


def chatops(db_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(chatops_bin()), *args],
        env={**os.environ, "DATABASE_URL": db_url, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_jwt_rules() -> None:
    now = datetime.now(UTC)
    claims = verify_jwt(SECRET, mint_jwt(SECRET, "Ann@Example.com", name="Ann"))
    assert (claims.email, claims.name) == ("ann@example.com", "Ann")
    with pytest.raises(InvalidJWT, match="expired"):
        verify_jwt(SECRET, mint_jwt(SECRET, "a@example.com", now=now - timedelta(minutes=20)))
    with pytest.raises(InvalidJWT, match="10 minutes"):
        verify_jwt(SECRET, mint_jwt(SECRET, "a@example.com", lifetime=timedelta(hours=1)))
    with pytest.raises(InvalidJWT, match="invalid"):
        verify_jwt(SECRET, mint_jwt("another-secret-of-enough-length!", "a@example.com"))
    with pytest.raises(InvalidJWT, match="email"):
        verify_jwt(SECRET, mint_jwt(SECRET, "not-an-email"))
    # Tokens are stored as SHA-256 only.
    assert len(hash_token("cho_x")) == 64 and hash_token("cho_x") != hash_token("cho_y")


async def test_cli_users_and_tokens_work_with_the_service(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    upgrade(url)
    added = chatops(url, "users", "add", "Ops@Example.com", "--role", "ops")
    assert added.returncode == 0 and "ops@example.com (ops)" in added.stdout
    again = chatops(url, "users", "add", "ops@example.com")
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    created = chatops(url, "tokens", "create", "--user", "ops@example.com", "--name", "laptop")
    assert created.returncode == 0
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("cho_") and len(token) > 40
    listed = chatops(url, "tokens", "list")
    assert "ops@example.com" in listed.stdout and token not in listed.stdout
    assert token[:12] in listed.stdout  # the prefix helps tell tokens apart
    users_out = chatops(url, "users", "list").stdout
    assert "ops@example.com" in users_out and " ops " in users_out

    app = create_app(Settings(database_url=url, streams_secret=SECRET))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            me = await client.get("/v1/me", headers=bearer(token))
            assert me.status_code == 200 and me.json()["role"] == "ops"
            assert chatops(url, "users", "role", "ops@example.com", "admin").returncode == 0
            # This process still trusts its cached answer for AUTH_CACHE_S; a fresh app
            # (another replica) sees the new role at once.
    app = create_app(Settings(database_url=url, streams_secret=SECRET, auth_cache_s=0))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/v1/me", headers=bearer(token))).json()["role"] == "admin"
            token_id = chatops(url, "tokens", "list").stdout.splitlines()[1].split()[0]
            revoked = chatops(url, "tokens", "revoke", token_id)
            assert revoked.returncode == 0
            refused = await client.get("/v1/me", headers=bearer(token))
            assert refused.status_code == 401 and refused.json()["detail"] == "token revoked"
            second = chatops(url, "tokens", "create", "--user", "ops@example.com")
            fresh = second.stdout.strip().splitlines()[-1]
            assert chatops(url, "users", "disable", "ops@example.com").returncode == 0
            disabled = await client.get("/v1/me", headers=bearer(fresh))
            assert disabled.status_code == 401 and "disabled" in disabled.json()["detail"]
    missing = chatops(url, "users", "role", "nobody@example.com", "admin")
    assert missing.returncode == 1 and "no user" in missing.stderr


def test_console_users_are_provisioned_on_first_sight_and_admin_emails_are_admins(
    tmp_path: Path,
) -> None:
    import asyncio

    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)

    async def run() -> None:
        settings = Settings(
            database_url=url, streams_secret=SECRET, admin_emails="Boss@Example.com"
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                boss = await client.get(
                    "/v1/me", headers=bearer(mint_jwt(SECRET, "boss@example.com"))
                )
                staff = await client.get(
                    "/v1/me", headers=bearer(mint_jwt(SECRET, "staff@example.com"))
                )
                assert boss.json()["role"] == "admin" and staff.json()["role"] == "member"
                assert boss.json()["id"] != staff.json()["id"]

    asyncio.run(run())
    assert "staff@example.com" in chatops(url, "users", "list").stdout


def test_production_needs_a_secret_and_dev_mode_stays_on_loopback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    prod = chatops(url, "serve", "--port", str(free_port()), ENV="production")
    assert prod.returncode == 2 and "STREAMS_SECRET" in prod.stderr
    assert "Traceback" not in prod.stderr
    public = chatops(url, "serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert public.returncode == 2 and "loopback" in public.stderr
    bad_limit = chatops(url, "serve", "--port", str(free_port()), RATE_LIMIT_MESSAGES="lots")
    assert bad_limit.returncode == 2 and "RATE_LIMIT_MESSAGES" in bad_limit.stderr

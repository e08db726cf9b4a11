"""schemathesis over the service's OpenAPI schema, as a member, ops and an admin: whatever the
input, no 5xx and no response that breaks the documented schema. Runs against a real
`chatops serve` process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from db.migrate import upgrade
from tests.support import ServerProcess

SECRET = "fuzz-secret-" + "z" * 32


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a real service with authentication on."""
    work: Path = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{work / 'fuzz.db'}"
    upgrade(url)
    server = ServerProcess(
        url,
        work,
        "fuzz",
        STREAMS_SECRET=SECRET,
        SIMULATOR_TTFT_MS="0",
        SIMULATOR_TOKENS_PER_S="0",
        RATE_LIMIT_AUTH_FAILURES="100000/minute",
    ).start()
    try:
        yield server.base_url
    finally:
        server.stop()


def token_for(base_url: str, role: str) -> str:
    """A new user of `role` and an API token of theirs, made by the system principal."""
    system = {"Authorization": f"Bearer {SECRET}"}
    email = f"fuzz-{role}-{uuid.uuid4().hex[:8]}@example.com"
    user = httpx.post(f"{base_url}/v1/users", json={"email": email, "role": role}, headers=system)
    assert user.status_code == 201, user.text
    created = httpx.post(f"{base_url}/v1/users/{user.json()['id']}/tokens", json={}, headers=system)
    assert created.status_code == 201, created.text
    token: str = created.json()["token"]
    return token


@pytest.mark.parametrize("role", ["member", "ops", "admin"])
def test_no_role_gets_a_5xx_or_an_off_schema_reply(service: str, role: str) -> None:
    # Driven by hand rather than through schemathesis' pytest plugin, which does not run on
    # pytest 9: every operation, a fixed number of derandomized examples each.
    base_url, token = service, token_for(service, role)
    headers = {"Authorization": f"Bearer {token}"}
    api = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers)
    failures: list[str] = []
    operations = 0
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def exercise(case: schemathesis.Case) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=15)
            case.validate_response(
                response, checks=[not_a_server_error, response_schema_conformance]
            )

        try:
            exercise()
        except Exception as exc:
            failures.append(f"{operation.label}: {str(exc)[:600]}")
    assert operations >= 15
    assert failures == []

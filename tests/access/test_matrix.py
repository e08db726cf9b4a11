"""Every route, every kind of caller → the expected status (issue 5's access matrix).

Callers: no token, a bad token, an expired console JWT, a revoked API token, a member on their
own session, a member on another's, ops, admin and the system principal. Each case runs on a
fresh session owned by the first member, so the cases cannot influence each other.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tests.access.conftest import AuthApp, People, bearer

CALLERS = ("own", "other", "ops", "admin", "system")
REJECTED = ("none", "bad", "expired", "revoked")


@dataclass
class Case:
    name: str
    # Builds the request for a fresh session: (method, url, json body).
    request: Callable[[str, People], tuple[str, str, Any]]
    # Expected status for own, other, ops, admin, system; a str "404:word" also checks the
    # detail, where two reasons share a status.
    expect: tuple[int | str, ...]
    # Whether the fresh session needs a finished exchange first (fork, regenerate).
    needs_exchange: bool = False
    # Whether the owner moves the fresh session to the trash first (restore).
    trashed: bool = False


# Filled by the test before the cases run: an export document to import.
SHARED: dict[str, Any] = {}


def s(path: str) -> Callable[[str, People], str]:
    return lambda sid, _p: f"/v1/sessions/{sid}{path}"


CASES = [
    Case("create", lambda sid, p: ("POST", "/v1/sessions", {}), (201, 201, 201, 201, 201)),
    Case(
        "put existing", lambda sid, p: ("PUT", f"/v1/sessions/{sid}", {}), (200, 404, 404, 404, 404)
    ),
    Case("get", lambda sid, p: ("GET", f"/v1/sessions/{sid}", None), (200, 404, 200, 200, 200)),
    Case(
        "send",
        lambda sid, p: ("POST", f"/v1/sessions/{sid}/messages", {"content": "hi [[tokens:2]]"}),
        (202, 404, 404, 404, 404),
    ),
    Case(
        "stop",
        lambda sid, p: ("POST", f"/v1/sessions/{sid}/stop", None),
        ("409:no generation", 404, 404, "409:no generation", "409:no generation"),
    ),
    Case(
        "regenerate",
        lambda sid, p: ("POST", f"/v1/sessions/{sid}/regenerate", None),
        (202, 404, 404, 404, 404),
        needs_exchange=True,
    ),
    Case(
        "approve",
        lambda sid, p: ("POST", f"/v1/sessions/{sid}/approvals/toolu_x", {"approved": True}),
        ("404:tool call", "404:session", "404:session", "404:session", "404:session"),
    ),
    Case(
        "fork",
        lambda sid, p: ("POST", f"/v1/sessions/{sid}/fork", {"at_message_id": "FIRST"}),
        (201, 404, 201, 201, 201),
        needs_exchange=True,
    ),
    Case(
        "end", lambda sid, p: ("POST", f"/v1/sessions/{sid}/end", None), (200, 404, 404, 200, 200)
    ),
    Case("models", lambda sid, p: ("GET", "/v1/models", None), (200, 200, 200, 200, 200)),
    Case("me", lambda sid, p: ("GET", "/v1/me", None), (200, 200, 200, 200, 200)),
    Case("list users", lambda sid, p: ("GET", "/v1/users", None), (403, 403, 403, 200, 200)),
    Case(
        "create user",
        lambda sid, p: ("POST", "/v1/users", {"email": f"n-{uuid.uuid4().hex[:8]}@example.com"}),
        (403, 403, 403, 201, 201),
    ),
    Case(
        "update user",
        lambda sid, p: ("PATCH", f"/v1/users/{p.owner_id}", {"name": "Owner"}),
        (403, 403, 403, 200, 200),
    ),
    Case(
        "list tokens",
        lambda sid, p: ("GET", f"/v1/users/{p.owner_id}/tokens", None),
        (200, 404, 404, 200, 200),
    ),
    Case(
        "create token",
        lambda sid, p: ("POST", f"/v1/users/{p.owner_id}/tokens", {"name": "t"}),
        (201, 404, 404, 201, 201),
    ),
    Case(
        "stream read",
        lambda sid, p: ("GET", f"/v1/stream/sessions/{sid}?offset=-1", None),
        (200, 404, 200, 200, 200),
    ),
    Case(
        "stream write",
        lambda sid, p: ("POST", f"/v1/stream/sessions/{sid}", [{"type": "note"}]),
        (403, 404, 403, 403, 204),
    ),
    Case("list", lambda sid, p: ("GET", "/v1/sessions", None), (200, 200, 200, 200, 200)),
    Case(
        "list everyone's",
        lambda sid, p: ("GET", "/v1/sessions?user=all", None),
        (403, 403, 200, 200, 200),
    ),
    Case(
        "rename",
        lambda sid, p: ("PATCH", f"/v1/sessions/{sid}", {"title": "renamed"}),
        (200, 404, 403, 200, 200),
    ),
    Case(
        "delete", lambda sid, p: ("DELETE", f"/v1/sessions/{sid}", None), (200, 404, 403, 200, 200)
    ),
    Case(
        "restore",
        lambda sid, p: ("POST", f"/v1/sessions/{sid}/restore", None),
        (200, 404, 403, 200, 200),
        trashed=True,
    ),
    Case(
        "purge",
        lambda sid, p: ("DELETE", f"/v1/sessions/{sid}?purge=true", None),
        (403, 404, 403, 200, 200),
    ),
    Case(
        "export",
        lambda sid, p: ("GET", f"/v1/sessions/{sid}/export?format=json", None),
        (200, 404, 200, 200, 200),
    ),
    Case(
        "import",
        lambda sid, p: ("POST", "/v1/sessions/import", SHARED["doc"]),
        (201, 201, 201, 201, 201),
    ),
    Case("usage", lambda sid, p: ("GET", "/v1/usage", None), (200, 200, 200, 200, 200)),
    Case("errors", lambda sid, p: ("GET", "/v1/errors", None), (403, 403, 200, 200, 200)),
    Case("rate limits", lambda sid, p: ("GET", "/v1/ratelimits", None), (403, 403, 200, 200, 200)),
    Case("audit", lambda sid, p: ("GET", "/v1/audit", None), (403, 403, 403, 200, 200)),
    Case("metrics", lambda sid, p: ("GET", "/metrics", None), (403, 403, 200, 200, 200)),
    Case(
        "raw stream create",
        lambda sid, p: ("PUT", f"/v1/stream/other/{uuid.uuid4()}", None),
        (404, 404, 404, 404, 201),
    ),
]


async def _fresh_session(
    client: httpx.AsyncClient, people: People, exchange: bool, trashed: bool = False
) -> tuple[str, str]:
    """A session of the owner (and, when asked, one finished exchange): (id, first message id)."""
    headers = bearer(people.owner)
    created = await client.post("/v1/sessions", json={}, headers=headers)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    first = ""
    if exchange:
        sent = await client.post(
            f"/v1/sessions/{sid}/messages", json={"content": "q [[tokens:2]]"}, headers=headers
        )
        assert sent.status_code == 202, sent.text
        first = sent.json()["message_id"]
        for _ in range(500):
            body = (await client.get(f"/v1/sessions/{sid}", headers=headers)).json()
            if body["active_generation_id"] is None:
                break
            await asyncio.sleep(0.02)
    if trashed:
        deleted = await client.delete(f"/v1/sessions/{sid}", headers=headers)
        assert deleted.status_code == 200, deleted.text
    return sid, first


async def _call(
    client: httpx.AsyncClient, case: Case, sid: str, first: str, people: People, token: str | None
) -> httpx.Response:
    method, url, body = case.request(sid, people)
    if isinstance(body, dict) and body.get("at_message_id") == "FIRST":
        body = {"at_message_id": first}
    headers = bearer(token)
    if url.startswith("/v1/stream/"):
        headers["Content-Type"] = "application/json"
    return await client.request(method, url, json=body, headers=headers)


def _matches(response: httpx.Response, expected: int | str) -> bool:
    if isinstance(expected, int):
        return response.status_code == expected
    status, word = expected.split(":", 1)
    return response.status_code == int(status) and word in response.json().get("detail", "")


async def _settle(client: httpx.AsyncClient, sid: str, people: People) -> None:
    """Let a generation a case started finish, so the next app shutdown has nothing to drain."""
    for _ in range(500):
        body = (await client.get(f"/v1/sessions/{sid}", headers=bearer(people.admin))).json()
        if body.get("active_generation_id") is None:
            return
        await asyncio.sleep(0.02)


async def test_every_route_answers_every_caller_as_expected(auth_app: AuthApp) -> None:
    failures: list[str] = []
    async with auth_app() as (_app, client, people):
        tokens = {
            "own": people.owner,
            "other": people.other,
            "ops": people.ops,
            "admin": people.admin,
            "system": people.system,
            "none": None,
            "bad": people.bad,
            "expired": people.expired_jwt,
            "revoked": people.revoked,
        }
        source, _ = await _fresh_session(client, people, True)
        exported = await client.get(
            f"/v1/sessions/{source}/export?format=json", headers=bearer(people.owner)
        )
        assert exported.status_code == 200, exported.text
        SHARED["doc"] = exported.json()
        for case in CASES:
            for caller, expected in zip(CALLERS, case.expect, strict=True):
                sid, first = await _fresh_session(client, people, case.needs_exchange, case.trashed)
                response = await _call(client, case, sid, first, people, tokens[caller])
                if not _matches(response, expected):
                    failures.append(
                        f"{case.name} as {caller}: {response.status_code} {response.text[:120]}"
                        f" (expected {expected})"
                    )
                await _settle(client, sid, people)
            sid, first = await _fresh_session(client, people, False)
            for caller in REJECTED:
                response = await _call(client, case, sid, first, people, tokens[caller])
                if response.status_code != 401 or "Bearer" not in response.headers.get(
                    "www-authenticate", ""
                ):
                    failures.append(
                        f"{case.name} as {caller}: {response.status_code} (expected 401)"
                    )
                elif set(response.json()) != {"error", "detail"}:
                    failures.append(f"{case.name} as {caller}: 401 body {response.text}")
    assert failures == []


async def test_health_needs_no_token_and_preflight_passes(auth_app: AuthApp) -> None:
    async with auth_app() as (_app, client, _people):
        assert (await client.get("/health")).status_code == 200
        preflight = await client.options(
            "/v1/sessions",
            headers={"Origin": "https://console.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        unauthorized = await client.get("/v1/me", headers={"Origin": "https://console.example"})
        assert unauthorized.status_code == 401
        # A browser can read why it was refused: the 401 carries CORS headers.
        assert unauthorized.headers.get("access-control-allow-origin") in (
            "*",
            "https://console.example",
        )

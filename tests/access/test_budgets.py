"""Per-user daily budgets: reserved before the upstream call; concurrent sends cannot overspend."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from sqlalchemy import select, update

from db.models import Generation, User
from tests.access.conftest import AuthApp, bearer, services

PROMPT = "a long answer please [[tokens:400]]"


async def test_twenty_concurrent_sends_against_a_budget_that_fits_five(auth_app: AuthApp) -> None:
    # Paced so nothing finishes (and releases its reservation) during the burst.
    async with auth_app(simulator_tokens_per_s=20, user_daily_budget_usd=0) as (
        app,
        client,
        people,
    ):
        svc = services(app).sessions
        model = svc.catalog.default_model
        one = svc.reservation(model, [{"role": "user", "content": PROMPT}], None)
        assert one > 0
        async with svc.sessionmaker.begin() as db:
            await db.execute(
                update(User)
                .where(User.id == people.other_id)
                .values(daily_budget_usd=one * Decimal("5.5"))
            )
        headers = bearer(people.other)
        sids = [
            (await client.post("/v1/sessions", json={}, headers=headers)).json()["id"]
            for _ in range(20)
        ]
        responses = await asyncio.gather(
            *(
                client.post(
                    f"/v1/sessions/{sid}/messages", json={"content": PROMPT}, headers=headers
                )
                for sid in sids
            )
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [202] * 5 + [402] * 15
        refused = next(r for r in responses if r.status_code == 402).json()
        assert refused["error"] == "budget_exhausted" and "daily budget" in refused["detail"]
        async with svc.sessionmaker() as db:
            started = (
                await db.scalars(select(Generation).where(Generation.user_id == people.other_id))
            ).all()
        assert len(started) == 5
        assert sum(g.reserved_usd for g in started) <= one * Decimal("5.5")
        me = (await client.get("/v1/me", headers=headers)).json()
        assert Decimal(me["daily_budget_usd"]) == one * Decimal("5.5")
        assert Decimal(me["spent_today_usd"]) == sum(g.reserved_usd for g in started)
        for r, sid in zip(responses, sids, strict=True):
            if r.status_code == 202:
                assert (
                    await client.post(f"/v1/sessions/{sid}/stop", headers=headers)
                ).status_code == 200


async def test_the_default_cap_applies_and_admins_set_one_per_user(auth_app: AuthApp) -> None:
    async with auth_app(user_daily_budget_usd=0.000001) as (_app, client, people):
        headers = bearer(people.other)
        sid = (await client.post("/v1/sessions", json={}, headers=headers)).json()["id"]
        sent = await client.post(
            f"/v1/sessions/{sid}/messages", json={"content": "hi [[tokens:2]]"}, headers=headers
        )
        assert sent.status_code == 402
        me = (await client.get("/v1/me", headers=headers)).json()
        assert me["role"] == "member" and me["dev_mode"] is False
        assert Decimal(me["daily_budget_usd"]) == Decimal("0.000001")
        # An admin raises this user's own cap; the send goes through.
        patched = await client.patch(
            f"/v1/users/{people.other_id}",
            json={"daily_budget_usd": "50"},
            headers=bearer(people.admin),
        )
        assert patched.status_code == 200 and patched.json()["daily_budget_usd"] == "50"
        sent = await client.post(
            f"/v1/sessions/{sid}/messages", json={"content": "hi [[tokens:2]]"}, headers=headers
        )
        assert sent.status_code == 202
        # Nothing of the refused send was written.
        body = (await client.get(f"/v1/sessions/{sid}", headers=headers)).json()
        assert [m["role"] for m in body["messages"]][:1] == ["user"]
        assert sum(1 for m in body["messages"] if m["role"] == "user") == 1

"""Identity administration: users, roles, budgets and tokens, each change audited."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import User
from streams_service.access import budgets, users
from streams_service.access.auth import Authenticator
from streams_service.access.principal import LOCAL_ADMIN, Principal
from streams_service.access.schemas import CreateToken, CreateUser, UpdateUser
from streams_service.config import Settings
from streams_service.errors import Forbidden, NotFound
from streams_service.ops.audit import record


class AccessService:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        auth: Authenticator,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.auth = auth

    async def me(self, who: Principal) -> dict[str, Any]:
        now = datetime.now(UTC)
        limit: Decimal | None = None
        spent = Decimal(0)
        if who.user_id is not None and who != LOCAL_ADMIN:
            async with self.sessionmaker() as db:
                limit = await budgets.daily_limit(db, self.settings, who.user_id)
                spent = await budgets.spent_today(db, who.user_id, now)
        return {
            "id": who.user_id,
            "email": who.email,
            "role": who.role,
            "dev_mode": not self.auth.enabled,
            "daily_budget_usd": limit,
            "spent_today_usd": spent,
            "budget_left_today_usd": None if limit is None else max(limit - spent, Decimal(0)),
        }

    async def list_users(self, who: Principal) -> list[dict[str, Any]]:
        _admin(who)
        async with self.sessionmaker() as db:
            rows = await db.scalars(select(User).order_by(User.email))
            return [users.user_out(u) for u in rows]

    async def create_user(self, who: Principal, body: CreateUser) -> dict[str, Any]:
        _admin(who)
        async with self.sessionmaker.begin() as db:
            user = await users.create_user(db, body.email, role=body.role, name=body.name)
            await record(
                db, who, "user.create", "user", user.id, {"email": user.email, "role": user.role}
            )
            return users.user_out(user)

    async def update_user(self, who: Principal, user_id: str, body: UpdateUser) -> dict[str, Any]:
        _admin(who)
        sent = body.model_fields_set
        async with self.sessionmaker.begin() as db:
            user = await _user(db, user_id)
            changes: dict[str, Any] = {}
            if "role" in sent and body.role is not None and body.role != user.role:
                changes["role"] = {"from": user.role, "to": body.role}
                user.role = body.role
            if "disabled" in sent and body.disabled is not None and body.disabled != user.disabled:
                changes["disabled"] = {"from": user.disabled, "to": body.disabled}
                user.disabled = body.disabled
            if "daily_budget_usd" in sent and body.daily_budget_usd != user.daily_budget_usd:
                changes["daily_budget_usd"] = {
                    "from": _str(user.daily_budget_usd),
                    "to": _str(body.daily_budget_usd),
                }
                users.set_budget(user, body.daily_budget_usd)
            if "name" in sent and body.name != user.name:
                user.name = body.name
                changes["name"] = True
            if changes:
                await record(db, who, "user.update", "user", user.id, changes)
            out = users.user_out(user)
        self.auth.forget_user(user_id)
        return out

    async def tokens(self, who: Principal, user_id: str) -> list[dict[str, Any]]:
        _self_or_admin(who, user_id)
        async with self.sessionmaker() as db:
            await _user(db, user_id)
            return [users.token_out(t) for t in await users.tokens_of(db, user_id)]

    async def create_token(self, who: Principal, user_id: str, body: CreateToken) -> dict[str, Any]:
        _self_or_admin(who, user_id)
        async with self.sessionmaker.begin() as db:
            user = await _user(db, user_id)
            issued = await users.issue_token(
                db, user, name=body.name, expires_in_days=body.expires_in_days
            )
            await record(db, who, "token.create", "token", issued.row.id, {"user_id": user.id})
            return {**users.token_out(issued.row), "token": issued.token}

    async def revoke_token(self, who: Principal, user_id: str, token_id: str) -> dict[str, Any]:
        _self_or_admin(who, user_id)
        async with self.sessionmaker.begin() as db:
            row = await users.revoke_token(db, token_id, user_id)
            await record(db, who, "token.revoke", "token", row.id, {"user_id": user_id})
            out = users.token_out(row)
        self.auth.forget_user(user_id)
        return out


def _admin(who: Principal) -> None:
    if not who.is_admin:
        raise Forbidden("this needs the admin role")


def _self_or_admin(who: Principal, user_id: str) -> None:
    if not (who.is_admin or who.user_id == user_id):
        # Whether another user exists is not a member's business.
        raise NotFound("no such user")


async def _user(db: AsyncSession, user_id: str) -> User:
    user = await db.get(User, user_id)
    if user is None:
        raise NotFound("no such user")
    return user


def _str(value: Decimal | None) -> str | None:
    return None if value is None else str(value)

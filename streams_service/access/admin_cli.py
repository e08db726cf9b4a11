"""What `chatops users ...` and `chatops tokens ...` do, straight on DATABASE_URL.

For the first admin and for scripts; everything here is also an admin route. Each change is
written to the audit log with the actor `cli`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.engine import create_engine
from db.models import ApiToken, User
from streams_service.access import users
from streams_service.access.principal import Principal
from streams_service.client.render import table
from streams_service.errors import AppError, NotFound
from streams_service.ops.audit import record

CLI = Principal(user_id=None, email="cli", role="system")


def _run(work: Callable[[AsyncSession], Awaitable[int]]) -> int:
    from streams_service.config import Settings

    async def main() -> int:
        engine = create_engine(Settings().database_url)
        try:
            maker = async_sessionmaker(engine, expire_on_commit=False)
            async with maker.begin() as db:
                return await work(db)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except AppError as exc:
        print(f"chatops: {exc.detail}", file=sys.stderr)
        return 1 if exc.status == 404 else 2


async def _user(db: AsyncSession, ref: str) -> User:
    user = await users.by_id_or_email(db, ref)
    if user is None:
        raise NotFound(f"no user {ref}")
    return user


def _table(rows: list[list[Any]], header: list[str]) -> None:
    # The client's table printer, which also strips terminal escapes from stored values.
    table(sys.stdout, header, [["" if v is None else str(v) for v in row] for row in rows])


def _users_add(args: argparse.Namespace) -> int:
    async def work(db: AsyncSession) -> int:
        user = await users.create_user(db, args.email, role=args.role, name=args.name)
        detail = {"email": user.email, "role": user.role}
        await record(db, CLI, "user.create", "user", user.id, detail)
        print(f"added {user.email} ({user.role}) id={user.id}")
        return 0

    return _run(work)


def _users_list(args: argparse.Namespace) -> int:
    async def work(db: AsyncSession) -> int:
        rows = (await db.scalars(select(User).order_by(User.email))).all()
        _table(
            [
                [u.email, u.role, "yes" if u.disabled else "", u.daily_budget_usd, u.id]
                for u in rows
            ],
            ["EMAIL", "ROLE", "DISABLED", "DAILY_BUDGET_USD", "ID"],
        )
        return 0

    return _run(work)


def _users_role(args: argparse.Namespace) -> int:
    async def work(db: AsyncSession) -> int:
        user = await _user(db, args.user)
        before = user.role
        user.role = users.check_role(args.role)
        await record(db, CLI, "user.role", "user", user.id, {"from": before, "to": user.role})
        print(f"{user.email}: role {before} -> {user.role}")
        return 0

    return _run(work)


def _users_disable(args: argparse.Namespace, disabled: bool = True) -> int:
    async def work(db: AsyncSession) -> int:
        user = await _user(db, args.user)
        user.disabled = disabled
        action = "user.disable" if disabled else "user.enable"
        await record(db, CLI, action, "user", user.id, None)
        print(f"{user.email}: {'disabled' if disabled else 'enabled'}")
        return 0

    return _run(work)


def _users_enable(args: argparse.Namespace) -> int:
    return _users_disable(args, False)


def _users_budget(args: argparse.Namespace) -> int:
    try:
        amount = None if args.usd == "default" else Decimal(args.usd)
    except InvalidOperation:
        print(f"chatops: not an amount: {args.usd!r}", file=sys.stderr)
        return 2

    async def work(db: AsyncSession) -> int:
        user = await _user(db, args.user)
        before = user.daily_budget_usd
        users.set_budget(user, amount)
        await record(
            db,
            CLI,
            "user.budget",
            "user",
            user.id,
            {"from": None if before is None else str(before), "to": args.usd},
        )
        print(f"{user.email}: daily budget {args.usd}")
        return 0

    return _run(work)


def _tokens_create(args: argparse.Namespace) -> int:
    async def work(db: AsyncSession) -> int:
        user = await _user(db, args.user)
        issued = await users.issue_token(
            db, user, name=args.name, expires_in_days=args.expires_days
        )
        await record(db, CLI, "token.create", "token", issued.row.id, {"user": user.email})
        print(f"token {issued.row.id} for {user.email} (shown once; store it now):")
        # Alone on the last line so scripts can take it with `tail -n1`.
        print(issued.token)
        return 0

    return _run(work)


def _tokens_list(args: argparse.Namespace) -> int:
    async def work(db: AsyncSession) -> int:
        owner = await _user(db, args.user) if args.user else None
        query = select(ApiToken, User).join(User, User.id == ApiToken.user_id)
        if owner is not None:
            query = query.where(ApiToken.user_id == owner.id)
        rows = (await db.execute(query.order_by(ApiToken.created_at))).all()
        _table(
            [
                [t.id, u.email, t.prefix + "…", t.name, t.created_at, t.expires_at, t.revoked_at]
                for t, u in rows
            ],
            ["ID", "USER", "PREFIX", "NAME", "CREATED", "EXPIRES", "REVOKED"],
        )
        return 0

    return _run(work)


def _tokens_revoke(args: argparse.Namespace) -> int:
    async def work(db: AsyncSession) -> int:
        row = await users.revoke_token(db, args.token_id)
        await record(db, CLI, "token.revoke", "token", row.id, None)
        print(f"revoked {row.id}")
        return 0

    return _run(work)

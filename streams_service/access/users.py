"""Users and API tokens: the SQL and the rules (who becomes admin, what a token shows)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ApiToken, User
from streams_service.access.principal import ROLES, Principal
from streams_service.access.tokens import hash_token, new_api_token, shown_prefix
from streams_service.errors import BadRequest, Conflict, NotFound


def normalize_email(email: str) -> str:
    value = email.strip().lower()
    if "@" not in value or len(value) > 320 or any(c.isspace() for c in value):
        raise BadRequest(f"not an email address: {email!r}")
    return value


def check_role(role: str) -> str:
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}")
    return role


def principal_of(user: User) -> Principal:
    role = user.role if user.role in ROLES else "member"
    return Principal(user_id=user.id, email=user.email, role=role)  # type: ignore[arg-type]


def user_out(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "role": user.role,
        "disabled": user.disabled,
        "daily_budget_usd": user.daily_budget_usd,
        "created_at": user.created_at,
        "last_seen_at": user.last_seen_at,
    }


def token_out(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "user_id": token.user_id,
        "name": token.name,
        "prefix": token.prefix,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
        "last_used_at": token.last_used_at,
    }


async def by_email(db: AsyncSession, email: str) -> User | None:
    found: User | None = await db.scalar(select(User).where(User.email == email))
    return found


async def by_id_or_email(db: AsyncSession, ref: str) -> User | None:
    if "@" in ref:
        return await by_email(db, ref.strip().lower())
    return await db.get(User, ref)


async def create_user(
    db: AsyncSession, email: str, *, role: str = "member", name: str | None = None
) -> User:
    user = User(
        id=str(uuid.uuid4()),
        email=normalize_email(email),
        name=name,
        role=check_role(role),
        disabled=False,
        created_at=datetime.now(UTC),
    )
    db.add(user)
    try:
        await db.flush()
    except IntegrityError:
        raise Conflict(f"a user with email {user.email} exists") from None
    return user


async def provision(
    sessionmaker: async_sessionmaker[AsyncSession],
    email: str,
    name: str | None,
    admin_emails: frozenset[str],
) -> User:
    """The user behind a console sign-in, created on first sight (ADMIN_EMAILS become admins)."""
    email = normalize_email(email)
    async with sessionmaker.begin() as db:
        user = await by_email(db, email)
        if user is not None:
            return user
    try:
        async with sessionmaker.begin() as db:
            role = "admin" if email in admin_emails else "member"
            return await create_user(db, email, role=role, name=name)
    except Conflict:
        # Two first requests raced; the other one created the row.
        async with sessionmaker.begin() as db:
            user = await by_email(db, email)
            assert user is not None
            return user


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once, never stored
    row: ApiToken


async def issue_token(
    db: AsyncSession, user: User, *, name: str | None = None, expires_in_days: int | None = None
) -> IssuedToken:
    if expires_in_days is not None and not 1 <= expires_in_days <= 3650:
        raise BadRequest("expires_in_days must be between 1 and 3650")
    token = new_api_token()
    now = datetime.now(UTC)
    row = ApiToken(
        id=str(uuid.uuid4()),
        user_id=user.id,
        name=name,
        prefix=shown_prefix(token),
        token_hash=hash_token(token),
        created_at=now,
        expires_at=now + timedelta(days=expires_in_days) if expires_in_days else None,
    )
    db.add(row)
    await db.flush()
    return IssuedToken(token, row)


async def tokens_of(db: AsyncSession, user_id: str) -> list[ApiToken]:
    rows = await db.scalars(
        select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.created_at.desc())
    )
    return list(rows)


async def revoke_token(db: AsyncSession, token_id: str, user_id: str | None = None) -> ApiToken:
    row = await db.get(ApiToken, token_id)
    if row is None or (user_id is not None and row.user_id != user_id):
        raise NotFound("no such token")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
    return row


async def token_owner(db: AsyncSession, token: str) -> tuple[ApiToken, User] | None:
    found = (
        await db.execute(
            select(ApiToken, User)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_hash == hash_token(token))
        )
    ).first()
    return None if found is None else (found[0], found[1])


async def touch_token(db: AsyncSession, token_id: str, now: datetime) -> None:
    await db.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now))


def set_budget(user: User, daily_budget_usd: Decimal | None) -> None:
    if daily_budget_usd is not None and daily_budget_usd < 0:
        raise BadRequest("daily_budget_usd must be >= 0")
    user.daily_budget_usd = daily_budget_usd

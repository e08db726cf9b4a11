"""Request and response bodies of the identity routes."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

RoleName = Literal["member", "ops", "admin"]


def _money(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


class UserOut(BaseModel):
    id: str
    email: str
    name: str | None
    role: str
    disabled: bool
    daily_budget_usd: Decimal | None
    created_at: datetime
    last_seen_at: datetime | None

    @field_serializer("daily_budget_usd")
    def _ser_money(self, value: Decimal | None) -> str | None:
        return _money(value)


class UserList(BaseModel):
    items: list[UserOut]


class CreateUser(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=320)
    role: RoleName = "member"
    name: str | None = Field(default=None, max_length=200)


class UpdateUser(BaseModel):
    """Only the fields sent change; `daily_budget_usd: null` returns to the default cap."""

    model_config = ConfigDict(extra="forbid")

    role: RoleName | None = None
    disabled: bool | None = None
    daily_budget_usd: Decimal | None = Field(default=None, ge=0, le=1_000_000)
    name: str | None = Field(default=None, max_length=200)


class Me(BaseModel):
    id: str | None
    email: str
    role: str
    dev_mode: bool
    daily_budget_usd: Decimal | None
    spent_today_usd: Decimal
    budget_left_today_usd: Decimal | None

    @field_serializer("daily_budget_usd", "spent_today_usd", "budget_left_today_usd")
    def _ser_money(self, value: Decimal | None) -> str | None:
        return _money(value)


class TokenOut(BaseModel):
    id: str
    user_id: str
    name: str | None
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenList(BaseModel):
    items: list[TokenOut]


class CreateToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class TokenCreated(TokenOut):
    # The only time the token is ever shown.
    token: str

"""Request and response bodies of the session routes (kept apart from the ORM models)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    model: str | None = None
    budget_usd: Decimal | None = Field(default=None, ge=0, le=100_000)


class Attachment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image"]
    name: str = Field(default="image", max_length=200)
    media_type: Literal["image/png", "image/jpeg", "image/gif", "image/webp"]
    # Base64 of the image bytes (at most 5 MB decoded).
    data: str = Field(min_length=1, max_length=7_000_000)


class SendMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str
    attachments: list[Attachment] = Field(default_factory=list, max_length=5)
    model: str | None = None
    client_message_id: str | None = Field(default=None, min_length=1, max_length=128)


class Approval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approved: bool


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at_message_id: str = Field(min_length=1, max_length=64)


class MessageOut(BaseModel):
    id: str
    role: str
    parts: list[dict[str, Any]]
    status: str
    generation_id: str | None
    created_at: datetime


class SessionOut(BaseModel):
    id: str
    streamUrl: str
    title: str | None
    model: str
    simulated: bool
    message_count: int
    cost_usd: Decimal
    budget_usd: Decimal | None
    active_generation_id: str | None
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    deleted_at: datetime | None
    messages: list[MessageOut] | None = None

    @field_serializer("cost_usd", "budget_usd")
    def _money(self, value: Decimal | None) -> str | None:
        return None if value is None else format(value.normalize(), "f")


class SendAccepted(BaseModel):
    message_id: str
    generation_id: str
    offset: str


class GenerationRef(BaseModel):
    generation_id: str
    message_id: str

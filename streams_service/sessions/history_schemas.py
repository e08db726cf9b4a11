"""Bodies of the history routes: the session list, updates, and the export/import document."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_serializer

EXPORT_FORMAT = "chatops.session"
EXPORT_VERSION = 1
# An import is one request: bound what it may carry (a long chat is a few hundred messages).
IMPORT_MAX_MESSAGES = 10_000
IMPORT_MAX_PARTS = 1_000
IMPORT_MAX_TEXT = 1_000_000  # characters of one part's text


class UserRef(BaseModel):
    id: str
    email: str | None
    name: str | None


class SessionItem(BaseModel):
    id: str
    title: str | None
    model: str
    message_count: int
    cost_usd: Decimal
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    deleted_at: datetime | None
    user: UserRef | None

    @field_serializer("cost_usd")
    def _money(self, value: Decimal) -> str:
        return format(value.normalize(), "f")


class SessionPage(BaseModel):
    items: list[SessionItem]
    next_cursor: str | None


class UpdateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    model: str | None = Field(default=None, max_length=64)


class Purged(BaseModel):
    id: str
    purged: bool


# ---------------------------------------------------------------------- export / import
# The shapes below are exactly what generation and send store as message parts; anything else
# is refused, so an import never stores a part the rest of the service cannot read.

Text = Annotated[str, Field(max_length=IMPORT_MAX_TEXT)]
Short = Annotated[str, Field(min_length=1, max_length=200)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Part):
    type: Literal["text"]
    content: Text


class ThinkingPart(_Part):
    type: Literal["thinking"]
    content: Text


class ToolCallPart(_Part):
    type: Literal["tool-call"]
    id: Short
    name: Short
    arguments: Text = ""
    state: Short
    output: Text | None = None
    approval: dict[str, Any] | None = None


class ToolResultPart(_Part):
    type: Literal["tool-result"]
    toolCallId: Short
    content: Text
    state: Short


class ImagePart(_Part):
    """An image attached to a user message (streams_service/sessions/attachments.py)."""

    type: Literal["image"]
    name: str = Field(max_length=200)
    mediaType: Literal["image/png", "image/jpeg", "image/gif", "image/webp"]
    data: str = Field(min_length=1, max_length=7_000_000)


Part = Annotated[
    TextPart | ThinkingPart | ToolCallPart | ToolResultPart | ImagePart,
    Field(discriminator="type"),
]


class ExportedMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    role: Literal["user", "assistant"]
    status: Literal["complete", "stopped", "error", "interrupted", "superseded"]
    created_at: AwareDatetime
    parts: list[Part] = Field(max_length=IMPORT_MAX_PARTS)


class ExportedSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=64)
    title: str | None = Field(default=None, max_length=200)
    model: str = Field(max_length=64)
    message_count: int = Field(ge=0)
    cost_usd: Decimal = Field(ge=0)
    created_at: AwareDatetime
    updated_at: AwareDatetime
    ended_at: AwareDatetime | None = None

    @field_serializer("cost_usd")
    def _money(self, value: Decimal) -> str:
        return format(value.normalize(), "f")


class ExportDocument(BaseModel):
    """`GET /v1/sessions/{id}/export?format=json`, and what `POST /v1/sessions/import` takes."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["chatops.session"]
    version: Literal[1]
    exported_at: AwareDatetime
    session: ExportedSession
    messages: list[ExportedMessage] = Field(max_length=IMPORT_MAX_MESSAGES)

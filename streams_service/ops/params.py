"""Query parameters of the ops routes, parsed by hand so bad input is a 400 with a sentence
that says what to send (FastAPI's own validation would answer 422 with a schema path)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Final

from streams_service.errors import BadRequest

GROUPS: Final = ("day", "hour", "model", "user", "session")
# The widest window one request may aggregate: a year and a bit covers year-over-year views,
# and nobody can ask the database for a decade of rows by accident.
MAX_RANGE: Final = timedelta(days=400)


@dataclass(frozen=True, slots=True)
class TimeRange:
    start: datetime  # inclusive
    end: datetime  # exclusive


def parse_range(raw_from: str | None, raw_to: str | None, default: timedelta) -> TimeRange:
    """`from` inclusive, `to` exclusive; a date-only `to` includes that whole day (UTC).
    Without `to` the range ends now; without `from` it spans `default` before `to`."""
    end = _parse_time("to", raw_to, end_of_day=True) if raw_to else datetime.now(UTC)
    start = _parse_time("from", raw_from, end_of_day=False) if raw_from else end - default
    if start >= end:
        raise BadRequest("`from` must be before `to`")
    if end - start > MAX_RANGE:
        raise BadRequest(f"the range may span at most {MAX_RANGE.days} days; narrow `from`/`to`")
    return TimeRange(start, end)


def _parse_time(name: str, raw: str, *, end_of_day: bool) -> datetime:
    text = raw.strip()
    try:
        if len(text) == 10:  # YYYY-MM-DD
            day = date.fromisoformat(text)
            if end_of_day:
                day += timedelta(days=1)
            return datetime.combine(day, time(), tzinfo=UTC)
        if "T" in text:
            # An unencoded "+02:00" in a query string arrives as " 02:00".
            text = text.replace(" ", "+")
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise BadRequest(
            f"`{name}` must be an ISO 8601 date or time, like 2026-11-01 or "
            f"2026-11-01T09:00:00Z; got {raw[:40]!r}"
        ) from None
    # A time without a zone is read as UTC, the zone every stored time is in.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_group_by(raw: str | None) -> tuple[str, ...]:
    """`day`, or a comma list like `day,model`; each name at most once."""
    if raw is None or not raw.strip():
        return ("day",)
    names = tuple(part.strip() for part in raw.split(","))
    unknown = [n for n in names if n not in GROUPS]
    if unknown or "" in names:
        raise BadRequest(f"`group_by` takes a comma list of {', '.join(GROUPS)}; got {raw[:60]!r}")
    if len(set(names)) != len(names):
        raise BadRequest(f"`group_by` names a group twice: {raw[:60]!r}")
    if "day" in names and "hour" in names:
        raise BadRequest("`group_by` takes `day` or `hour`, not both")
    return names


def parse_choice(name: str, raw: str | None, choices: tuple[str, ...], default: str) -> str:
    if raw is None or raw == "":
        return default
    if raw not in choices:
        raise BadRequest(f"`{name}` is one of {', '.join(choices)}; got {raw[:40]!r}")
    return raw


def parse_limit(raw: str | None, default: int, maximum: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"`limit` must be a whole number; got {raw[:20]!r}") from None
    if not 1 <= value <= maximum:
        raise BadRequest(f"`limit` must be between 1 and {maximum}")
    return value


def parse_text(name: str, raw: str | None, max_length: int) -> str | None:
    """An optional exact-match filter: absent or empty means no filter."""
    if raw is None or raw == "":
        return None
    if len(raw) > max_length:
        raise BadRequest(f"`{name}` is at most {max_length} characters")
    return raw


# Keyset cursors: the (time, id) of the last item of a page, newest first. Opaque to clients.


def encode_cursor(at: datetime, row_id: int) -> str:
    raw = f"{at.astimezone(UTC).isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(raw: str | None) -> tuple[datetime, int] | None:
    if raw is None or raw == "":
        return None
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        at_text, id_text = text.split("|")
        at = datetime.fromisoformat(at_text)
        row_id = int(id_text)
        if at.tzinfo is None:
            raise ValueError("cursor time without zone")
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise BadRequest("`cursor` is not one this service issued; start without it") from None
    return at.astimezone(UTC), row_id

"""The roles a user can hold (a module of its own so the CLI can name them without FastAPI)."""

from __future__ import annotations

ROLES: tuple[str, ...] = ("member", "ops", "admin")

"""Errors the command line reports without importing SQLAlchemy (it starts faster that way)."""

from __future__ import annotations


class DatabaseURLError(ValueError):
    """DATABASE_URL is not a URL we know how to use."""

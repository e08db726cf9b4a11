"""The session and auth-enabled app factories, shared with the suites that define them."""

from __future__ import annotations

from tests.access.conftest import auth_app
from tests.sessions.conftest import make_app

__all__ = ["auth_app", "make_app"]

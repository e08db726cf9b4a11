"""Who is calling: the principal every `/v1` route acts for (DESIGN §4).

Roles: `member` sees its own sessions; `ops` reads every session's metadata and stream, usage,
limits and errors; `admin` may do everything; `system` is `STREAMS_SECRET` itself (automation),
with admin rights plus raw stream writes. Authentication puts a Principal on `request.state`;
without `STREAMS_SECRET` (dev mode) every caller is the local admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request

from streams_service.access.roles import ROLES as ROLES

Role = Literal["member", "ops", "admin", "system"]


@dataclass(frozen=True, slots=True)
class Principal:
    # The users.id the caller acts as; the system principal owns no sessions of its own.
    user_id: str | None
    email: str
    role: Role

    @property
    def reads_all(self) -> bool:
        """May read every user's sessions, usage, limits and errors."""
        return self.role in ("ops", "admin", "system")

    @property
    def is_admin(self) -> bool:
        return self.role in ("admin", "system")

    @property
    def is_system(self) -> bool:
        return self.role == "system"

    def can_read(self, owner_id: str | None) -> bool:
        return self.reads_all or (owner_id is not None and owner_id == self.user_id)

    def can_manage(self, owner_id: str | None) -> bool:
        """Rename, delete, restore, stop: the owner or an admin."""
        return self.is_admin or (owner_id is not None and owner_id == self.user_id)

    def owns(self, owner_id: str | None) -> bool:
        return owner_id is not None and owner_id == self.user_id


# Dev mode (no STREAMS_SECRET): the service binds to loopback and everyone is this admin.
LOCAL_ADMIN = Principal(user_id="local", email="local@localhost", role="admin")
SYSTEM = Principal(user_id=None, email="system", role="system")


async def current_principal(request: Request) -> Principal:
    """The caller of this request (set by authentication; the local admin in dev mode).

    `async` although it awaits nothing: FastAPI runs a plain `def` dependency in its thread
    pool, a thread hop (and a wait for the GIL) on every request for a dict lookup."""
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal if principal is not None else LOCAL_ADMIN


# Route parameter type: `who: Caller`.
Caller = Annotated[Principal, Depends(current_principal)]

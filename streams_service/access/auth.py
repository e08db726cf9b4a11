"""Bearer authentication for every `/v1` route and `/metrics`, and who may touch which stream.

A credential is one of: `STREAMS_SECRET` itself (the system principal), a console JWT (HS256,
signed with the secret, ≤ 10 minutes, the user's email as subject; the user is provisioned on
first sight), or a personal API token. All comparisons are constant-time (hmac, or a lookup by
SHA-256). Verified credentials are cached for `AUTH_CACHE_S` so the stream hot path does not pay
a database round trip per request; revoking or disabling in this process takes effect at once,
in other replicas within that many seconds.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import ASGIApp, Receive, Scope, Send

from db.models import ChatSession
from streams_service.access import users
from streams_service.access.limits import AUTH_FAILURE, RateLimiter
from streams_service.access.principal import LOCAL_ADMIN, SYSTEM, Principal
from streams_service.access.tokens import InvalidJWT, hash_token, looks_like_jwt, verify_jwt
from streams_service.config import Settings
from streams_service.errors import (
    AppError,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unauthorized,
    error_response,
)

log = structlog.get_logger(__name__)

# Cache entries: (monotonic deadline, principal). Bounded so a flood of bad tokens cannot grow it.
CACHE_MAX = 10_000
SESSION_STREAM = re.compile(r"^sessions/([0-9a-fA-F-]{36})$")
READ_METHODS = frozenset({"GET", "HEAD"})


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        limiter: RateLimiter,
    ) -> None:
        self.secret = settings.streams_secret
        self.cache_s = settings.auth_cache_s
        self.admin_emails = frozenset(
            e.strip().lower() for e in settings.admin_emails.split(",") if e.strip()
        )
        self.sessionmaker = sessionmaker
        self.limiter = limiter
        self._cache: dict[str, tuple[float, Principal]] = {}
        # Session owners never change: one lookup per session and process.
        self._owners: dict[str, str | None] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.secret)

    def forget_user(self, user_id: str) -> None:
        """After a revoke, disable or role change: the next request checks the database."""
        for key, (_, principal) in list(self._cache.items()):
            if principal.user_id == user_id:
                self._cache.pop(key, None)

    async def authenticate(self, authorization: str | None, client: str) -> Principal:
        if self.secret is None:
            return LOCAL_ADMIN
        token = _bearer(authorization)
        if token is not None and hmac.compare_digest(token.encode(), self.secret.encode()):
            return SYSTEM
        key = hash_token(token) if token else ""
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        blocked = await self.limiter.blocked(AUTH_FAILURE, client)
        if blocked is not None:
            # While an address is over its failure limit no credential is even checked:
            # otherwise the limit would not slow down guessing.
            raise TooManyRequests("too many failed sign-ins from this address", headers=blocked)
        try:
            if token is None:
                raise Unauthorized("missing bearer token")
            principal, valid_for = await self._verify(token, key)
        except Unauthorized:
            await self.limiter.hit(AUTH_FAILURE, client)
            raise
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (time.monotonic() + min(self.cache_s, valid_for), principal)
        return principal

    async def _verify(self, token: str, key: str) -> tuple[Principal, float]:
        assert self.secret is not None
        now = datetime.now(UTC)
        if looks_like_jwt(token):
            try:
                claims = verify_jwt(self.secret, token)
            except InvalidJWT as exc:
                raise Unauthorized(str(exc)) from None
            user = await users.provision(
                self.sessionmaker, claims.email, claims.name, self.admin_emails
            )
            if user.disabled:
                raise Unauthorized("this account is disabled")
            return users.principal_of(user), self.cache_s
        async with self.sessionmaker.begin() as db:
            found = await users.token_owner(db, token)
            if found is None:
                raise Unauthorized("unknown token")
            row, user = found
            if row.revoked_at is not None:
                raise Unauthorized("token revoked")
            if row.expires_at is not None and row.expires_at <= now:
                raise Unauthorized("token expired")
            if user.disabled:
                raise Unauthorized("this account is disabled")
            await users.touch_token(db, row.id, now)
            left = (row.expires_at - now).total_seconds() if row.expires_at else self.cache_s
            return users.principal_of(user), max(0.0, left)

    async def authorize_stream(self, who: Principal, method: str, path: str) -> None:
        """Raw stream access: session streams readable by whoever may read the session; every
        write, and every other stream, only for the system principal."""
        if who.is_system or not self.enabled:
            return
        match = SESSION_STREAM.match(path)
        if match is None:
            raise NotFound("no such stream")
        sid = match.group(1).lower()
        exists, owner = await self._owner(sid)
        if not exists or not who.can_read(owner):
            raise NotFound("no such stream")
        if method not in READ_METHODS and method != "OPTIONS":
            raise Forbidden("session streams are written by the service; use the session API")

    async def _owner(self, sid: str) -> tuple[bool, str | None]:
        """(whether the session exists, its owner)."""
        if sid in self._owners:
            return True, self._owners[sid]
        async with self.sessionmaker() as db:
            found = (
                await db.execute(select(ChatSession.user_id).where(ChatSession.id == sid))
            ).first()
        if found is None:
            return False, None
        if len(self._owners) >= CACHE_MAX:
            self._owners.clear()
        self._owners[sid] = found[0]
        return True, found[0]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def protected(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1" or path == "/metrics"


class AuthMiddleware:
    """Pure ASGI (no per-request task): puts the caller on `scope["state"]["principal"]`.

    `check` runs after authentication with the principal (the stream routes authorize there)."""

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Callable[[], Authenticator | None],
        check: Callable[[Principal, Scope], Awaitable[None]] | None = None,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth = self.authenticator()
        if (
            scope["type"] != "http"
            or auth is None
            or not protected(scope["path"])
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        try:
            principal = await auth.authenticate(_header(scope, b"authorization"), _client(scope))
            if self.check is not None:
                await self.check(principal, scope)
        except AppError as exc:
            await error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

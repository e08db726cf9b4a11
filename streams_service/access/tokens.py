"""Credentials: personal API tokens (random, stored only as SHA-256) and the console's JWTs."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

TOKEN_PREFIX = "cho_"  # noqa: S105 - a marker, not a secret
# How much of a token lists show, so people can tell their tokens apart without the secret.
SHOWN_PREFIX_CHARS = 12
# The console mints short-lived tokens; anything longer-lived must be an API token.
JWT_MAX_LIFETIME = timedelta(minutes=10)
JWT_ALGORITHM = "HS256"


def new_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # A random 256-bit token needs no salt or slow hash: SHA-256 is not reversible at that entropy.
    return hashlib.sha256(token.encode()).hexdigest()


def shown_prefix(token: str) -> str:
    return token[:SHOWN_PREFIX_CHARS]


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def mint_jwt(
    secret: str,
    email: str,
    *,
    name: str | None = None,
    lifetime: timedelta = JWT_MAX_LIFETIME,
    now: datetime | None = None,
) -> str:
    """What the console does for its signed-in user (tests use it too)."""
    issued = now or datetime.now(UTC)
    claims: dict[str, object] = {
        "sub": email,
        "iat": int(issued.timestamp()),
        "exp": int((issued + lifetime).timestamp()),
    }
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


class InvalidJWT(Exception):
    pass


@dataclass(frozen=True)
class JWTClaims:
    email: str
    name: str | None


def verify_jwt(secret: str, token: str) -> JWTClaims:
    """Signature, expiry and the 10-minute lifetime cap; the subject is the user's email."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            options={"require": ["exp", "iat", "sub"]},
            leeway=5,
        )
    except jwt.ExpiredSignatureError:
        raise InvalidJWT("token expired") from None
    except jwt.InvalidTokenError:
        raise InvalidJWT("invalid token") from None
    lifetime = int(claims["exp"]) - int(claims["iat"])
    if lifetime > JWT_MAX_LIFETIME.total_seconds():
        raise InvalidJWT("token lifetime exceeds 10 minutes")
    email = str(claims["sub"]).strip().lower()
    if "@" not in email:
        raise InvalidJWT("token subject is not an email")
    name = claims.get("name")
    return JWTClaims(email=email, name=str(name) if name else None)

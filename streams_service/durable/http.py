"""A response for the stream protocol's hot path: headers encoded once, sent in two messages.

Starlette's Response re-parses and re-encodes its headers on every construction; an append is
answered tens of thousands of times a second, so this one takes them as given. Security headers
are part of every reply here, since the stream path skips the app's middleware chain.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from streams_service.errors import AppError
from streams_service.middleware import SECURITY_HEADERS

SECURITY_HEADER_MAP = {k.decode(): v.decode() for k, v in SECURITY_HEADERS}


class Reply(Response):
    def __init__(
        self,
        content: bytes = b"",
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status_code = status_code
        self.body = content
        self.background = None
        raw = (
            [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            if headers
            else []
        )
        if status_code >= 200 and status_code not in (204, 304):
            raw.append((b"content-length", str(len(content)).encode()))
        raw.extend(SECURITY_HEADERS)
        self.raw_headers = raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self.body})


def error_reply(exc: AppError) -> Reply:
    body = json.dumps({"error": exc.code, "detail": exc.detail}).encode()
    return Reply(body, exc.status, {**exc.headers, "content-type": "application/json"})

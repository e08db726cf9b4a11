"""Image attachments of a user message: checked once here, then kept as message parts.

A part `{"type": "image", "name", "mediaType", "data"}` (base64) is what the stream and the
database hold; `user_blocks` turns a message's parts into Anthropic content blocks, images first
(the API's advice for image questions), then the text.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from streams_service.errors import BadRequest, PayloadTooLarge
from streams_service.sessions.schemas import Attachment

# The Messages API's own limits: at most 5 MB an image; we also cap the count per message.
MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_ATTACHMENTS = 5
# What an image costs in input tokens at most (about 1.15 megapixels), for the reservation.
IMAGE_TOKEN_ESTIMATE = 1600

_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}


def image_parts(attachments: list[Attachment]) -> list[dict[str, Any]]:
    """Validate attachments (count, base64, size, that the bytes are the declared type)."""
    if len(attachments) > MAX_ATTACHMENTS:
        raise BadRequest(f"at most {MAX_ATTACHMENTS} attachments per message")
    parts = []
    for a in attachments:
        try:
            raw = base64.b64decode(a.data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"attachment {a.name!r}: data is not base64") from None
        if len(raw) > MAX_IMAGE_BYTES:
            raise PayloadTooLarge(f"attachment {a.name!r} is larger than 5 MB")
        if not raw.startswith(_SIGNATURES[a.media_type]) or (
            a.media_type == "image/webp" and raw[8:12] != b"WEBP"
        ):
            raise BadRequest(f"attachment {a.name!r} is not a {a.media_type} image")
        parts.append({"type": "image", "name": a.name, "mediaType": a.media_type, "data": a.data})
    return parts


def user_blocks(content: str, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": p["mediaType"], "data": p["data"]},
        }
        for p in parts
        if p.get("type") == "image"
    ]
    if content:
        blocks.append({"type": "text", "text": content})
    return blocks


def estimate_tokens(history: list[dict[str, Any]]) -> int:
    """About three characters a token for text (an over-estimate, fit for a reservation), and
    a fixed amount per image rather than the length of its base64."""
    chars, images = 0, 0
    for message in history:
        content = message["content"]
        if isinstance(content, str):
            chars += len(content)
            continue
        for block in content:
            if block.get("type") == "image":
                images += 1
            else:
                chars += len(str(block))
    return max(1, chars // 3 + images * IMAGE_TOKEN_ESTIMATE)

"""Files attached to a chat message: text files go inline into the message, images as
`attachments` (base64, as the Messages API takes them) for a service that accepts them."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Protocol

from console.render import code_fence

IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
TEXT_EXTENSIONS = {
    "txt", "md", "markdown", "csv", "tsv", "json", "jsonl", "yaml", "yml", "toml", "ini", "cfg",
    "log", "xml", "html", "css", "js", "ts", "tsx", "jsx", "py", "rb", "go", "rs", "java", "kt",
    "c", "h", "cpp", "hpp", "cs", "sh", "sql", "r", "swift", "php", "tf", "env", "diff", "patch",
}  # fmt: skip
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "webp"}
ACCEPTED_EXTENSIONS = sorted(TEXT_EXTENSIONS | IMAGE_EXTENSIONS)
# One image may be at most this big (the Messages API's limit for base64 images is 5 MB).
MAX_IMAGE_BYTES = 5 * 1024 * 1024


class Upload(Protocol):
    """What Streamlit's UploadedFile offers (and a test double can)."""

    name: str
    type: str | None

    def getvalue(self) -> bytes: ...


@dataclass
class Outgoing:
    content: str
    attachments: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _extension(name: str) -> str:
    return PurePath(name).suffix.lower().lstrip(".")


def build(text: str, files: list[Upload]) -> Outgoing:
    """The message to send: the typed text, each text file inlined under its name in a code
    block, each image as an attachment. Files that are neither are reported, not sent."""
    pieces = [text.strip()] if text.strip() else []
    out = Outgoing(content="")
    for upload in files:
        data = upload.getvalue()
        ext = _extension(upload.name)
        mime = (upload.type or "").lower()
        if mime in IMAGE_TYPES or ext in IMAGE_EXTENSIONS:
            if len(data) > MAX_IMAGE_BYTES:
                out.problems.append(f"{upload.name} is larger than 5 MB and was not attached.")
                continue
            media_type = mime if mime in IMAGE_TYPES else f"image/{'jpeg' if ext == 'jpg' else ext}"
            out.attachments.append(
                {
                    "type": "image",
                    "name": upload.name,
                    "media_type": media_type,
                    "data": base64.b64encode(data).decode(),
                }
            )
            continue
        try:
            body = data.decode("utf-8")
        except UnicodeDecodeError:
            out.problems.append(f"{upload.name} is not a text file and was not attached.")
            continue
        fence = code_fence(body)
        language = ext if ext in TEXT_EXTENSIONS and ext not in ("txt", "log") else ""
        name = upload.name.replace("`", "'")
        pieces.append(f"Attached file `{name}`:\n\n{fence}{language}\n{body}\n{fence}")
    out.content = "\n\n".join(pieces)
    return out

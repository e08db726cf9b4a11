"""Image attachments: validated, kept as message parts on the stream and in the database, and
sent upstream as image blocks on this turn and every later one."""

from __future__ import annotations

import base64
import json
from typing import Any

from sqlalchemy import select

from db.models import Generation
from tests.sessions.conftest import (
    PNG,
    AppFactory,
    new_session,
    services,
    stream_records,
    wait_idle,
)


def image(data: str = PNG, media_type: str = "image/png") -> dict[str, Any]:
    return {"type": "image", "name": "dot.png", "media_type": media_type, "data": data}


async def _input_tokens(app: Any, generation_id: str) -> int:
    async with services(app).sessions.sessionmaker() as db:
        row = await db.scalar(select(Generation).where(Generation.id == generation_id))
        assert row is not None
        return row.input_tokens + row.cache_read_tokens + row.cache_write_5m_tokens


async def test_an_image_reaches_the_model_and_stays_in_the_conversation(
    make_app: AppFactory,
) -> None:
    async with make_app() as (app, client):
        plain, pictured = await new_session(client), await new_session(client)
        text = "what is this? [[tokens:2]]"
        first = await client.post(f"/v1/sessions/{plain}/messages", json={"content": text})
        with_image = await client.post(
            f"/v1/sessions/{pictured}/messages",
            json={"content": text, "attachments": [image()]},
        )
        assert first.status_code == 202 and with_image.status_code == 202, with_image.text
        await wait_idle(client, plain)
        session = await wait_idle(client, pictured)
        # The simulator counts an image block as a sizeable input; the plain turn has none.
        extra = await _input_tokens(app, with_image.json()["generation_id"]) - await _input_tokens(
            app, first.json()["generation_id"]
        )
        assert extra > 1000
        user = session["messages"][0]
        assert user["parts"] == [
            {"type": "text", "content": text},
            {"type": "image", "name": "dot.png", "mediaType": "image/png", "data": PNG},
        ]
        whole = [
            json.loads(r["value"]["chunk"])
            for r in await stream_records(client, pictured)
            if r.get("type") == "chunk" and r["value"]["messageId"] == user["id"]
        ]
        assert whole[0]["message"]["parts"] == user["parts"]
        # The next turn sends the whole conversation again, the image included.
        again = await client.post(
            f"/v1/sessions/{pictured}/messages", json={"content": "and now? [[tokens:2]]"}
        )
        await wait_idle(client, pictured)
        follow_up = await _input_tokens(app, again.json()["generation_id"])
        assert follow_up > await _input_tokens(app, with_image.json()["generation_id"])
        # An image alone, without words, is a message too.
        alone = await client.post(
            f"/v1/sessions/{plain}/messages", json={"content": "", "attachments": [image()]}
        )
        assert alone.status_code == 202
        await wait_idle(client, plain)


async def test_bad_attachments_are_refused_and_nothing_is_kept(make_app: AppFactory) -> None:
    async with make_app() as (_app, client):
        sid = await new_session(client)
        cases = [
            (image(data="not base64!!"), 400, "base64"),
            (image(data=base64.b64encode(b"GIF89a....").decode()), 400, "not a image/png"),
            (image(media_type="image/tiff"), 422, "media_type"),
            (
                image(
                    data=base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * (5 * 1024 * 1024)).decode()
                ),
                413,
                "5 MB",
            ),
        ]
        for attachment, status, word in cases:
            response = await client.post(
                f"/v1/sessions/{sid}/messages", json={"content": "x", "attachments": [attachment]}
            )
            assert response.status_code == status, response.text
            assert word in response.json()["detail"]
        six = await client.post(
            f"/v1/sessions/{sid}/messages", json={"content": "x", "attachments": [image()] * 6}
        )
        assert six.status_code == 422
        session = (await client.get(f"/v1/sessions/{sid}")).json()
        assert session["messages"] == [] and session["message_count"] == 0
        assert [r for r in await stream_records(client, sid) if r.get("type") == "chunk"] == []

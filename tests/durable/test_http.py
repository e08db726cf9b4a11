"""Bad input at the protocol surface: the protocol's 4xx, a JSON error body, nothing written."""

from __future__ import annotations

import httpx
import pytest

JSON = {"Content-Type": "application/json"}


async def _snapshot(client: httpx.AsyncClient, url: str) -> tuple[int, str | None, bytes]:
    """What a reader can observe of a stream: status, tail offset, whole content."""
    response = await client.get(url, params={"offset": "-1"})
    return response.status_code, response.headers.get("stream-next-offset"), response.content


def _assert_json_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert isinstance(body["detail"], str) and body["detail"]
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.fixture
async def json_stream(client: httpx.AsyncClient, stream_url: str) -> str:
    created = await client.put(stream_url, headers=JSON, content=b'[{"n":1},{"n":2}]')
    assert created.status_code == 201
    return stream_url


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Type": "application/json"}, b"{not json", 400),
        ({"Content-Type": "application/json"}, b"[]", 400),
        ({"Content-Type": "application/json"}, b"NaN", 400),
        ({"Content-Type": "application/json"}, b'{"a": Infinity}', 400),
        ({"Content-Type": "application/json"}, b"\xff\xfe\xfa", 400),
        ({"Content-Type": "application/json"}, b"", 400),
        ({}, b'{"n":3}', 400),
        ({"Content-Type": "text/plain"}, b"hello", 409),
        ({**JSON, "Producer-Id": "p"}, b'{"n":3}', 400),
        ({**JSON, "Producer-Id": "", "Producer-Epoch": "0", "Producer-Seq": "0"}, b"{}", 400),
        ({**JSON, "Producer-Id": "p", "Producer-Epoch": "1e3", "Producer-Seq": "0"}, b"{}", 400),
        ({**JSON, "Producer-Id": "p", "Producer-Epoch": "0", "Producer-Seq": "-1"}, b"{}", 400),
        (
            {**JSON, "Producer-Id": "p", "Producer-Epoch": "0", "Producer-Seq": str(2**53)},
            b"{}",
            400,
        ),
        ({**JSON, "Producer-Id": "p", "Producer-Epoch": "0", "Producer-Seq": "5"}, b"{}", 409),
    ],
    ids=[
        "invalid-json",
        "empty-array",
        "nan",
        "infinity",
        "not-utf8",
        "empty-body",
        "no-content-type",
        "content-type-mismatch",
        "partial-producer-headers",
        "empty-producer-id",
        "producer-epoch-not-integer",
        "producer-seq-negative",
        "producer-seq-too-large",
        "producer-seq-gap",
    ],
)
async def test_bad_append_is_rejected_and_writes_nothing(
    client: httpx.AsyncClient,
    json_stream: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    before = await _snapshot(client, json_stream)
    response = await client.post(json_stream, headers=headers, content=body)
    _assert_json_error(response, status)
    assert await _snapshot(client, json_stream) == before


async def test_oversized_append_gets_413_and_writes_nothing(
    client: httpx.AsyncClient, json_stream: str, app: object
) -> None:
    before = await _snapshot(client, json_stream)
    limit = 8 * 1024 * 1024
    payload = b'"' + b"x" * limit + b'"'
    response = await client.post(json_stream, headers=JSON, content=payload)
    _assert_json_error(response, 413)
    assert await _snapshot(client, json_stream) == before


async def test_stream_seq_regression_is_409_and_writes_nothing(
    client: httpx.AsyncClient, json_stream: str
) -> None:
    ok = await client.post(json_stream, headers={**JSON, "Stream-Seq": "b"}, content=b"1")
    assert ok.status_code == 204
    before = await _snapshot(client, json_stream)
    for seq in ("a", "b"):
        response = await client.post(json_stream, headers={**JSON, "Stream-Seq": seq}, content=b"2")
        _assert_json_error(response, 409)
    assert await _snapshot(client, json_stream) == before


async def test_stale_producer_epoch_is_fenced_with_current_epoch(
    client: httpx.AsyncClient, json_stream: str
) -> None:
    def producer(epoch: int, seq: int) -> dict[str, str]:
        return {**JSON, "Producer-Id": "w", "Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}

    assert (await client.post(json_stream, headers=producer(3, 0), content=b"1")).status_code == 200
    before = await _snapshot(client, json_stream)
    stale = await client.post(json_stream, headers=producer(2, 1), content=b"2")
    _assert_json_error(stale, 403)
    assert stale.headers["producer-epoch"] == "3"
    bad_new_epoch = await client.post(json_stream, headers=producer(4, 1), content=b"2")
    _assert_json_error(bad_new_epoch, 400)
    gap = await client.post(json_stream, headers=producer(3, 7), content=b"2")
    _assert_json_error(gap, 409)
    assert gap.headers["producer-expected-seq"] == "1"
    assert gap.headers["producer-received-seq"] == "7"
    assert await _snapshot(client, json_stream) == before


@pytest.mark.parametrize(
    "params",
    [
        {"offset": "abc"},
        {"offset": ""},
        {"offset": "1,2"},
        {"offset": "0_0 "},
        {"offset": "../etc"},
        [("offset", "-1"), ("offset", "now")],
        {"live": "sse"},
        {"live": "long-poll"},
        {"offset": "-1", "live": "websocket"},
    ],
    ids=[
        "letters",
        "empty",
        "comma",
        "trailing-space",
        "traversal",
        "repeated",
        "sse-without-offset",
        "long-poll-without-offset",
        "unknown-live-mode",
    ],
)
async def test_bad_read_parameters_get_400(
    client: httpx.AsyncClient, json_stream: str, params: dict[str, str] | list[tuple[str, str]]
) -> None:
    response = await client.get(json_stream, params=params)
    _assert_json_error(response, 400)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Stream-TTL": "60", "Stream-Expires-At": "2030-01-01T00:00:00Z"}, 400),
        ({"Stream-TTL": "-1"}, 400),
        ({"Stream-TTL": "01"}, 400),
        ({"Stream-TTL": "1.5"}, 400),
        ({"Stream-Expires-At": "tomorrow"}, 400),
        ({"Stream-Forked-From": "/v1/stream/nope"}, 404),
        ({"Stream-Fork-Sub-Offset": "1"}, 400),
        ({"Stream-Forked-From": "/v1/stream/nope", "Stream-Fork-Offset": "zz"}, 400),
    ],
    ids=[
        "ttl-and-expires",
        "negative-ttl",
        "leading-zero-ttl",
        "fractional-ttl",
        "bad-expires",
        "missing-fork-source",
        "sub-offset-without-fork",
        "bad-fork-offset",
    ],
)
async def test_bad_create_is_rejected_and_creates_nothing(
    client: httpx.AsyncClient, stream_url: str, headers: dict[str, str], status: int
) -> None:
    response = await client.put(stream_url, headers={**JSON, **headers}, content=b"[]")
    _assert_json_error(response, status)
    assert (await client.head(stream_url)).status_code == 404


async def test_fork_beyond_source_tail_is_400(client: httpx.AsyncClient, json_stream: str) -> None:
    fork_url = json_stream + "-fork"
    tail = (await client.head(json_stream)).headers["stream-next-offset"]
    beyond = tail[:-1] + str(int(tail[-1]) + 1)
    response = await client.put(
        fork_url, headers={"Stream-Forked-From": json_stream, "Stream-Fork-Offset": beyond}
    )
    _assert_json_error(response, 400)
    assert (await client.head(fork_url)).status_code == 404


async def test_recreate_with_other_config_is_409(
    client: httpx.AsyncClient, json_stream: str
) -> None:
    response = await client.put(json_stream, headers={"Content-Type": "text/plain"})
    _assert_json_error(response, 409)
    same = await client.put(
        json_stream, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert same.status_code == 200


async def test_unknown_stream_is_404_on_every_verb(
    client: httpx.AsyncClient, stream_url: str
) -> None:
    for method in ("GET", "POST", "DELETE"):
        response = await client.request(method, stream_url, headers=JSON, content=b"{}")
        _assert_json_error(response, 404)
    head = await client.head(stream_url)
    assert head.status_code == 404
    assert head.headers["x-content-type-options"] == "nosniff"


async def test_unsupported_method_is_405(client: httpx.AsyncClient, json_stream: str) -> None:
    _assert_json_error(await client.patch(json_stream, content=b"{}"), 405)


async def test_append_to_closed_stream_is_409_with_final_offset(
    client: httpx.AsyncClient, json_stream: str
) -> None:
    closed = await client.post(json_stream, headers={"Stream-Closed": "true"})
    assert closed.status_code == 204
    final = closed.headers["stream-next-offset"]
    response = await client.post(json_stream, headers=JSON, content=b"{}")
    _assert_json_error(response, 409)
    assert response.headers["stream-closed"] == "true"
    assert response.headers["stream-next-offset"] == final

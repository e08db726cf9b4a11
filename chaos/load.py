"""The load a scenario runs while it breaks things, and the ledger of what the service
acknowledged (the invariant checks compare the ledger with what the service kept).

- Stream writers append `{"w": writer, "n": n}` one at a time (n+1 only after n was answered).
  Producer writers send idempotent-producer headers and retry a failed append with the same
  seq until it is acknowledged (exactly once). Plain writers never retry: an append whose answer
  was lost is "in flight" (it may or may not be there, but at most once).
- Chatters each own a session: send a message (with a `client_message_id`, retried through
  outages until the 202), wait for its generation to end, send the next.

Every request has a timeout and every retry loop a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

JSON = {"Content-Type": "application/json"}
REQUEST_TIMEOUT_S = 15.0
# How long one append or send keeps being retried through an outage before it is given up on
# (a service that does not come back within this is a failure of its own).
RETRY_WINDOW_S = 120.0
# How long a generation may take to end after it was acknowledged (its own length included).
GENERATION_WINDOW_S = 180.0
BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)
# Statuses that mean "not now": the outage (5xx), a drain (503) or a running generation (409).
RETRYABLE = frozenset({409, 429, 500, 502, 503, 504})


def make_client(connections: int = 64) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits)


def status_key(outcome: int | BaseException) -> str:
    if isinstance(outcome, BaseException):
        return type(outcome).__name__
    return str(outcome)


# --- streams --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    n: int
    offset: str | None  # Stream-Next-Offset of the acknowledgement (absent on some duplicates)
    status: int


@dataclass
class WriterLedger:
    writer: str
    stream: str  # stream path under /v1/stream/
    producer: bool
    acked: list[Ack] = field(default_factory=list)
    in_flight: set[int] = field(default_factory=set)  # fate unknown (plain writers only)
    given_up: int | None = None  # the seq still unacknowledged when the window ran out
    unexpected: list[str] = field(default_factory=list)


@dataclass
class Tally:
    """Answers that were not acknowledgements, by status (or exception name)."""

    failures: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: int | BaseException) -> None:
        self.failures[status_key(outcome)] += 1

    def brief(self) -> str:
        if not self.failures:
            return "none"
        return ", ".join(f"{n}x{k}" for k, n in self.failures.most_common(4))


@dataclass
class Load:
    """A running load: the ledgers fill while it runs; `stop` ends it after the current
    request of each worker has been answered."""

    base_url: str
    writers: list[WriterLedger] = field(default_factory=list)
    chats: list[ChatLedger] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    acked_total: int = 0

    def acked_appends(self) -> int:
        return sum(len(w.acked) for w in self.writers)

    def acked_sends(self) -> int:
        return sum(len(c.acked) for c in self.chats)

    async def wait_acks(self, count: int, timeout_s: float) -> bool:
        """Until `count` more appends than now are acknowledged (a count, not a time)."""
        target = self.acked_appends() + count
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.acked_appends() < target:
            if loop.time() > deadline or all(t.done() for t in self.tasks):
                return False
            await asyncio.sleep(0.05)
        return True

    async def finish(self, timeout_s: float = RETRY_WINDOW_S + GENERATION_WINDOW_S) -> None:
        self.stop.set()
        if self.tasks:
            _done, pending = await asyncio.wait(self.tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for task in self.tasks:
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    self.tally.failures[f"worker crashed: {type(exc).__name__}: {exc}"] += 1


async def create_stream(client: httpx.AsyncClient, base_url: str, path: str) -> None:
    got = await client.put(f"{base_url}/v1/stream/{path}", headers=JSON)
    if got.status_code not in (200, 201):
        raise RuntimeError(f"PUT /v1/stream/{path}: {got.status_code} {got.text[:200]}")


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])


async def writer_loop(
    client: httpx.AsyncClient,
    load: Load,
    ledger: WriterLedger,
    pace_s: float,
    max_appends: int | None = None,
) -> None:
    url = f"{load.base_url}/v1/stream/{ledger.stream}"
    loop = asyncio.get_running_loop()
    n = 0
    while not load.stop.is_set() and (max_appends is None or n < max_appends):
        body = {"w": ledger.writer, "n": n}
        headers = dict(JSON)
        if ledger.producer:
            headers.update(
                {"Producer-Id": ledger.writer, "Producer-Epoch": "0", "Producer-Seq": str(n)}
            )
        deadline = loop.time() + RETRY_WINDOW_S
        attempt = 0
        while True:
            try:
                got = await client.post(url, json=body, headers=headers)
            except httpx.ConnectError as exc:
                # Never sent (the service is down): safe to send again, with or without a
                # producer, and it must not turn up in the stream unless a retry lands.
                load.tally.add(exc)
                if loop.time() > deadline:
                    ledger.given_up = n
                    return
                await _backoff(attempt)
                attempt += 1
                continue
            except httpx.HTTPError as exc:
                load.tally.add(exc)
            else:
                outcome = got.status_code
                if outcome in (200, 204):
                    ledger.acked.append(Ack(n, got.headers.get("Stream-Next-Offset"), outcome))
                    break
                load.tally.add(outcome)
                if outcome not in RETRYABLE:
                    ledger.unexpected.append(f"n={n}: {outcome} {got.text[:160]}")
                    return
            if not ledger.producer:
                # Without a producer a retry could store it twice: its fate stays unknown.
                ledger.in_flight.add(n)
                await _backoff(attempt)
                break
            if loop.time() > deadline:
                ledger.given_up = n
                return
            await _backoff(attempt)
            attempt += 1
        n += 1
        if pace_s:
            await asyncio.sleep(pace_s)


def start_writers(
    load: Load,
    client: httpx.AsyncClient,
    streams: list[str],
    writers: int,
    pace_s: float,
    prefix: str,
    max_appends: int | None = None,
) -> None:
    """`writers` writers spread over `streams`, alternately producers and plain."""
    for i in range(writers):
        ledger = WriterLedger(f"{prefix}-w{i}", streams[i % len(streams)], producer=i % 2 == 0)
        load.writers.append(ledger)
        load.tasks.append(
            asyncio.create_task(writer_loop(client, load, ledger, pace_s, max_appends))
        )


# --- sessions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendAck:
    client_message_id: str
    message_id: str
    generation_id: str
    offset: str


@dataclass
class ChatLedger:
    session_id: str
    acked: list[SendAck] = field(default_factory=list)
    given_up: str | None = None  # a client_message_id never acknowledged within the window
    unexpected: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)  # generations that never ended in time


async def create_session(client: httpx.AsyncClient, base_url: str, title: str) -> str:
    # A title up front: no title generation (a second upstream call and usage row) follows.
    for attempt in range(20):
        with contextlib.suppress(httpx.TransportError):
            got = await client.post(f"{base_url}/v1/sessions", json={"title": title})
            if got.status_code == 201:
                return str(got.json()["id"])
            if got.status_code not in RETRYABLE:
                raise RuntimeError(f"POST /v1/sessions: {got.status_code} {got.text[:200]}")
        await _backoff(attempt)
    raise RuntimeError("POST /v1/sessions kept failing")


async def send_message(
    client: httpx.AsyncClient,
    load: Load,
    ledger: ChatLedger,
    client_message_id: str,
    content: str,
    window_s: float = RETRY_WINDOW_S,
) -> SendAck | None:
    """POST the message until it is acknowledged (idempotent on `client_message_id`)."""
    url = f"{load.base_url}/v1/sessions/{ledger.session_id}/messages"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window_s
    attempt = 0
    body = {"content": content, "client_message_id": client_message_id}
    while loop.time() < deadline:
        try:
            got = await client.post(url, json=body)
        except httpx.HTTPError as exc:
            load.tally.add(exc)
        else:
            if got.status_code == 202:
                data = got.json()
                ack = SendAck(
                    client_message_id,
                    str(data["message_id"]),
                    str(data["generation_id"]),
                    str(data["offset"]),
                )
                ledger.acked.append(ack)
                return ack
            load.tally.add(got.status_code)
            if got.status_code not in RETRYABLE:
                ledger.unexpected.append(f"send {client_message_id}: {got.status_code} {got.text}")
                return None
        await _backoff(attempt)
        attempt += 1
    ledger.given_up = client_message_id
    return None


async def wait_generation(
    client: httpx.AsyncClient,
    load: Load,
    ledger: ChatLedger,
    generation_id: str,
    window_s: float = GENERATION_WINDOW_S,
) -> dict[str, Any] | None:
    """Poll the session until `generation_id` is no longer its active generation."""
    url = f"{load.base_url}/v1/sessions/{ledger.session_id}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window_s
    while loop.time() < deadline:
        try:
            got = await client.get(url)
        except httpx.HTTPError as exc:
            load.tally.add(exc)
        else:
            if got.status_code == 200:
                data: dict[str, Any] = got.json()
                if data.get("active_generation_id") != generation_id:
                    return data
            else:
                load.tally.add(got.status_code)
        await asyncio.sleep(0.25)
    ledger.stuck.append(generation_id)
    return None


async def chat_loop(
    client: httpx.AsyncClient,
    load: Load,
    ledger: ChatLedger,
    rng: random.Random,
    tokens: tuple[int, int],
    max_messages: int | None = None,
) -> None:
    k = 0
    while not load.stop.is_set() and (max_messages is None or k < max_messages):
        cmid = f"{ledger.session_id[:8]}-{k}"
        content = f"chaos message {k} [[tokens:{rng.randint(*tokens)}]]"
        ack = await send_message(client, load, ledger, cmid, content)
        if ack is None:
            return
        if await wait_generation(client, load, ledger, ack.generation_id) is None:
            return
        k += 1


async def start_chatters(
    load: Load,
    client: httpx.AsyncClient,
    sessions: int,
    tokens: tuple[int, int],
    seed: int,
    max_messages: int | None = None,
) -> None:
    ids = await asyncio.gather(
        *(create_session(client, load.base_url, f"chaos {i}") for i in range(sessions))
    )
    for i, sid in enumerate(ids):
        ledger = ChatLedger(sid)
        load.chats.append(ledger)
        rng = random.Random(seed * 1000 + i)
        load.tasks.append(
            asyncio.create_task(chat_loop(client, load, ledger, rng, tokens, max_messages))
        )

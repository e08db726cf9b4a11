"""Invariant checks, run once a scenario's load has stopped and its generations have settled.

Streams: every acknowledged append is in its stream exactly once, each writer's appends in the
order it sent them, nothing in a stream that nobody sent, and ordering acknowledgements by their
Stream-Next-Offset gives stream order.

Sessions: every acknowledged message is in the session's history and on its stream exactly
once; every acknowledged send has exactly one usage row (`generations`), ended (none left
`running`), with exactly one terminal event on the stream (RUN_FINISHED or RUN_ERROR) that agrees
with the row; every generation has exactly one assistant message whose text equals the text the
stream carries for it; no chunk key appears twice.

Streams are read with the protocol's official client (`durable_streams`), from offset -1.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg
from durable_streams import astream

from chaos.load import ChatLedger, Load, WriterLedger

READ_TIMEOUT_S = 60.0
SETTLE_POLL_S = 0.25


async def read_stream(base_url: str, path: str, offset: str = "-1") -> list[Any]:
    """Every message of a JSON stream from `offset` to its current end (catch-up reads)."""

    async def read() -> list[Any]:
        items: list[Any] = []
        async with astream(
            f"{base_url}/v1/stream/{path}", offset=offset, live=False, timeout=30.0
        ) as response:
            async for event in response.iter_events(mode="json_batches"):
                items.extend(event.data)
        return items

    return await asyncio.wait_for(read(), timeout=READ_TIMEOUT_S)


# --- streams --------------------------------------------------------------------------------


@dataclass
class StreamReport:
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    phantom: int = 0
    in_flight: int = 0
    in_flight_landed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def offsets_ok(self) -> bool:
        return not any(p.startswith("offsets") for p in self.problems)


async def check_streams(base_url: str, writers: list[WriterLedger]) -> StreamReport:
    report = StreamReport()
    by_stream: dict[str, list[WriterLedger]] = defaultdict(list)
    for ledger in writers:
        by_stream[ledger.stream].append(ledger)
    for path, ledgers in sorted(by_stream.items()):
        try:
            items = await read_stream(base_url, path)
        except Exception as exc:
            report.problems.append(f"stream {path}: could not be read: {type(exc).__name__} {exc}")
            continue
        _check_one_stream(path, items, ledgers, report)
    return report


def _check_one_stream(
    path: str, items: list[Any], ledgers: list[WriterLedger], report: StreamReport
) -> None:
    known = {w.writer: w for w in ledgers}
    order: list[tuple[str, int]] = []
    for item in items:
        if not (isinstance(item, dict) and set(item) == {"w", "n"} and item["w"] in known):
            report.phantom += 1
            report.problems.append(f"stream {path}: a message nobody sent: {str(item)[:120]}")
            continue
        order.append((item["w"], item["n"]))
    counts = Counter(order)
    dupes = [k for k, c in counts.items() if c > 1]
    report.duplicated += sum(counts[k] - 1 for k in dupes)
    if dupes:
        report.problems.append(f"stream {path}: stored more than once: {sorted(dupes)[:5]}")
    position = {k: i for i, k in enumerate(order)}
    for ledger in ledgers:
        ns = [n for w, n in order if w == ledger.writer]
        if ns != sorted(set(ns)):
            report.problems.append(f"{ledger.writer}: out of order or doubled: {ns[:20]}")
        acked = {a.n for a in ledger.acked}
        report.acked += len(acked)
        missing = sorted(acked - set(ns))
        report.lost += len(missing)
        if missing:
            report.problems.append(f"{ledger.writer}: acknowledged but missing: {missing[:10]}")
        allowed = acked | ledger.in_flight
        if ledger.given_up is not None:
            allowed.add(ledger.given_up)
        strays = sorted(set(ns) - allowed)
        report.phantom += len(strays)
        if strays:
            report.problems.append(f"{ledger.writer}: never acknowledged nor in flight: {strays}")
        report.in_flight += len(ledger.in_flight)
        report.in_flight_landed += len(ledger.in_flight & set(ns))
        if ledger.given_up is not None:
            report.problems.append(f"{ledger.writer}: n={ledger.given_up} never acknowledged")
        report.problems.extend(f"{ledger.writer}: {u}" for u in ledger.unexpected[:3])
        # A producer's 204 is a duplicate: its offset need not be the original append's.
        offsets = [
            a.offset for a in ledger.acked if a.offset and not (ledger.producer and a.status == 204)
        ]
        if any(b <= a for a, b in itertools.pairwise(offsets)):
            report.problems.append(f"offsets of {ledger.writer}'s acknowledgements not increasing")
    acks = [
        (a.offset, (w.writer, a.n))
        for w in ledgers
        for a in w.acked
        if a.offset and not (w.producer and a.status == 204)
    ]
    acks = [x for x in acks if x[1] in position]
    by_offset = [k for _, k in sorted(acks)]
    if by_offset != sorted(by_offset, key=position.__getitem__):
        report.problems.append(f"offsets: stream {path}: ack offsets disagree with stream order")
    offsets_seen = [o for o, _ in acks]
    if len(set(offsets_seen)) != len(offsets_seen):
        report.problems.append(f"offsets: stream {path}: two acknowledgements share an offset")


# --- sessions -------------------------------------------------------------------------------


@dataclass
class GenerationOutcome:
    id: str
    session_id: str
    status: str
    error_code: str | None
    terminal: list[tuple[str, str | None]]  # terminal events on the stream: (type, code)
    text: str  # what the stream carries for its assistant message
    persisted: str | None  # chat_messages.content of its assistant message
    thinking: str = ""  # thinking deltas on the stream
    persisted_thinking: str = ""  # thinking parts of the persisted message


@dataclass
class SessionReport:
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    usage_rows: int = 0
    outcomes: dict[str, GenerationOutcome] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def codes(self) -> Counter[str]:
        return Counter(
            "completed" if o.status == "completed" else (o.error_code or o.status)
            for o in self.outcomes.values()
        )


def _query(db_url: str, stmt: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url, connect_timeout=10) as conn:
        return list(conn.execute(stmt, params).fetchall())


async def running_generations(db_url: str) -> int:
    rows = await asyncio.to_thread(
        _query, db_url, "SELECT count(*) FROM generations WHERE status = 'running'", ()
    )
    return int(rows[0][0])


async def wait_settled(db_url: str, timeout_s: float) -> bool:
    """True once no generation is `running` (crashed ones are recovered within seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            if await running_generations(db_url) == 0:
                return True
        except psycopg.Error:
            pass  # the Postgres scenario: keep asking until it is back
        await asyncio.sleep(SETTLE_POLL_S)
    return False


def _events(items: list[Any]) -> tuple[Counter[str], Counter[str], dict[str, list[Any]]]:
    """(chunk keys, user message ids, assistant events by message id) of a session stream."""
    keys: Counter[str] = Counter()
    users: Counter[str] = Counter()
    assistant: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        if not isinstance(item, dict) or item.get("type") != "chunk":
            continue
        keys[str(item.get("key"))] += 1
        value = item.get("value") or {}
        chunk = json.loads(value.get("chunk") or "{}")
        if value.get("role") == "user" and chunk.get("type") == "whole-message":
            users[str(chunk["message"]["id"])] += 1
        elif value.get("role") == "assistant":
            assistant[str(value.get("messageId"))].append(chunk)
    return keys, users, assistant


async def check_sessions(base_url: str, db_url: str, chats: list[ChatLedger]) -> SessionReport:
    report = SessionReport()
    if not chats:
        return report
    ids = [c.session_id for c in chats]
    gens, messages, sessions = await asyncio.to_thread(_session_rows, db_url, ids)
    for ledger in chats:
        try:
            items = await read_stream(base_url, f"sessions/{ledger.session_id}")
        except Exception as exc:
            report.problems.append(
                f"session {ledger.session_id}: stream unreadable: {type(exc).__name__} {exc}"
            )
            continue
        _check_one_session(
            ledger,
            items,
            gens.get(ledger.session_id, []),
            messages.get(ledger.session_id, []),
            sessions.get(ledger.session_id),
            report,
        )
    return report


def _session_rows(
    db_url: str, ids: list[str]
) -> tuple[
    dict[str, list[tuple[Any, ...]]], dict[str, list[tuple[Any, ...]]], dict[str, tuple[Any, ...]]
]:
    with psycopg.connect(db_url, connect_timeout=10) as conn:
        gens = conn.execute(
            "SELECT session_id, id, message_id, status, error_code FROM generations"
            " WHERE session_id = ANY(%s) AND message_id <> ''",  # '' = title generations
            (ids,),
        ).fetchall()
        msgs = conn.execute(
            "SELECT session_id, id, role, status, content, client_message_id, generation_id,"
            " parts"
            " FROM chat_messages WHERE session_id = ANY(%s)",
            (ids,),
        ).fetchall()
        sess = conn.execute(
            "SELECT id, active_generation_id, message_count FROM chat_sessions WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
    g: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    m: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in gens:
        g[row[0]].append(row)
    for row in msgs:
        m[row[0]].append(row)
    return g, m, {row[0]: row for row in sess}


# What a generation's row and its assistant message say about the same ending.
_MESSAGE_STATUS = {"completed": {"complete"}, "error": {"error", "interrupted"}}


def _check_one_session(
    ledger: ChatLedger,
    items: list[Any],
    gens: list[tuple[Any, ...]],
    msgs: list[tuple[Any, ...]],
    session: tuple[Any, ...] | None,
    report: SessionReport,
) -> None:
    sid = ledger.session_id
    bad = report.problems.append
    keys, users, assistant = _events(items)
    dup_keys = [k for k, c in keys.items() if c > 1]
    if dup_keys:
        report.duplicated += len(dup_keys)
        bad(f"session {sid}: chunk keys on the stream twice: {dup_keys[:5]}")
    user_rows = {row[1]: row for row in msgs if row[2] == "user"}
    assistant_rows = Counter(row[1] for row in msgs if row[2] == "assistant")
    content = {row[1]: row for row in msgs}
    report.acked += len(ledger.acked)
    for ack in ledger.acked:
        on_stream = users.get(ack.message_id, 0)
        if ack.message_id not in user_rows or on_stream == 0:
            report.lost += 1
            bad(
                f"session {sid}: acknowledged message {ack.message_id} lost "
                f"(history: {ack.message_id in user_rows}, stream: {on_stream})"
            )
        elif on_stream > 1:
            report.duplicated += on_stream - 1
            bad(f"session {sid}: message {ack.message_id} on the stream {on_stream} times")
    acked_cmids = {a.client_message_id for a in ledger.acked} | {ledger.given_up}
    for row in user_rows.values():
        if row[5] not in acked_cmids:
            bad(f"session {sid}: user message {row[1]} ({row[5]}) was never acknowledged")
    stray_users = set(users) - set(user_rows)
    if stray_users:
        bad(f"session {sid}: user messages on the stream but not in history: {stray_users}")
    if ledger.given_up:
        bad(f"session {sid}: send {ledger.given_up} never acknowledged")
    bad_list = [f"session {sid}: {u}" for u in ledger.unexpected[:3]]
    report.problems.extend(bad_list)
    if ledger.stuck:
        bad(f"session {sid}: generations that did not end in time: {ledger.stuck}")

    # Usage rows: exactly one per acknowledged send, each ended, each agreeing with the stream.
    report.usage_rows += len(gens)
    acked_gens = {a.generation_id for a in ledger.acked}
    row_ids = {g[1] for g in gens}
    if row_ids != acked_gens:
        bad(
            f"session {sid}: usage rows {len(row_ids)} != acknowledged sends {len(acked_gens)} "
            f"(extra {sorted(row_ids - acked_gens)[:3]}, "
            f"missing {sorted(acked_gens - row_ids)[:3]})"
        )
    for _sid, gid, message_id, status, error_code in gens:
        events = assistant.get(message_id, [])
        terminal = [
            (str(e.get("type")), (e.get("error") or {}).get("code"))
            for e in events
            if e.get("type") in ("RUN_FINISHED", "RUN_ERROR")
        ]
        text = "".join(
            str(e.get("delta", "")) for e in events if e.get("type") == "TEXT_MESSAGE_CONTENT"
        )
        persisted = content[message_id][4] if message_id in content else None
        thinking = "".join(
            str(e.get("delta", "")) for e in events if e.get("type") == "STEP_FINISHED"
        )
        parts = content[message_id][7] if message_id in content else None
        persisted_thinking = "".join(
            str(p.get("content", ""))
            for p in (parts or [])
            if isinstance(p, dict) and p.get("type") == "thinking"
        )
        report.outcomes[gid] = GenerationOutcome(
            gid, sid, status, error_code, terminal, text, persisted, thinking, persisted_thinking
        )
        if status == "running":
            bad(f"generation {gid}: still running")
            continue
        if len(terminal) != 1:
            bad(
                f"generation {gid} ({status}/{error_code}): {len(terminal)} terminal events "
                f"on the stream: {terminal}"
            )
        elif status == "completed" and terminal[0][0] != "RUN_FINISHED":
            bad(f"generation {gid}: completed but the stream ends it with {terminal[0]}")
        elif status != "completed" and terminal[0] != ("RUN_ERROR", error_code):
            bad(f"generation {gid}: {status}/{error_code} but the stream says {terminal[0]}")
        count = assistant_rows.get(message_id, 0)
        if count != 1:
            bad(f"generation {gid}: {count} assistant messages in the history")
        elif persisted != text:
            bad(
                f"generation {gid}: persisted text ({len(persisted or '')} chars) differs from "
                f"the stream's ({len(text)} chars)"
            )
        else:
            allowed = _MESSAGE_STATUS.get(status, {status})
            if content[message_id][3] not in allowed:
                bad(f"generation {gid}: row {status} but message {content[message_id][3]}")
    if session is None:
        bad(f"session {sid}: missing")
    else:
        if session[1] is not None:
            bad(f"session {sid}: still has an active generation {session[1]}")
        if session[2] != len(msgs):
            bad(f"session {sid}: message_count {session[2]} but {len(msgs)} messages")


def summarize_failures(tally_brief: str, problems: list[str], limit: int = 12) -> list[str]:
    shown = problems[:limit]
    if len(problems) > limit:
        shown.append(f"... and {len(problems) - limit} more")
    return [*shown, f"non-acknowledged answers seen by clients: {tally_brief}"]


__all__ = [
    "GenerationOutcome",
    "Load",
    "SessionReport",
    "StreamReport",
    "check_sessions",
    "check_streams",
    "read_stream",
    "running_generations",
    "wait_settled",
]

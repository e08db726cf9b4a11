"""The scenarios. Each starts its own service on a fresh database, runs load, breaks something,
lets it recover, checks the invariants (chaos/checks.py) and returns one summary line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from durable_streams import astream

from chaos import checks
from chaos.harness import (
    HarnessError,
    RedisServer,
    Service,
    Simulator,
    ensure_postgres_up,
    restart_postgres,
    scratch_database,
    wait_postgres,
)
from chaos.load import (
    JSON,
    Ack,
    ChatLedger,
    Load,
    WriterLedger,
    create_session,
    create_stream,
    make_client,
    send_message,
    start_chatters,
    start_writers,
    wait_generation,
)
from streams_service.access.limits import STORAGE_RETRY_AFTER_S

SETTLE_TIMEOUT_S = 90.0
PHASE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Scale:
    writers: int = 16
    streams: int = 4
    sessions: int = 8
    kills: int = 3
    acks_per_phase: int = 1500
    pace_s: float = 0.02
    disconnects: int = 1000
    disconnect_sessions: int = 10
    concurrency: int = 40
    redis_probes: int = 8
    faults: tuple[str, ...] = ()  # empty: every case

    @classmethod
    def smoke(cls) -> Scale:
        return cls(
            writers=4,
            streams=2,
            sessions=2,
            kills=1,
            acks_per_phase=40,
            disconnects=40,
            disconnect_sessions=2,
            concurrency=10,
            redis_probes=6,
            faults=("midstream_error", "rate_limit*1", "cut"),
        )


@dataclass
class Context:
    workdir: Path
    scale: Scale
    seed: int = 20261126


@dataclass
class Result:
    name: str
    ok: bool
    facts: str  # the middle of the summary line
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return f"chaos {self.name}: {self.facts} — {verdict}"


def n(value: int) -> str:
    return f"{value:,}"


# --- shared pieces --------------------------------------------------------------------------


async def _start(service: Service) -> None:
    # In a thread: the load keeps running (and retrying) while the service boots.
    await asyncio.to_thread(service.start)


async def _standard_load(
    service: Service, client: httpx.AsyncClient, ctx: Context, tag: str, tokens: tuple[int, int]
) -> Load:
    scale = ctx.scale
    load = Load(service.base_url)
    streams = [f"chaos/{tag}-{i}" for i in range(scale.streams)]
    for path in streams:
        await create_stream(client, service.base_url, path)
    start_writers(load, client, streams, scale.writers, scale.pace_s, tag)
    await start_chatters(load, client, scale.sessions, tokens, ctx.seed)
    return load


async def _running_ids(db_url: str) -> set[str]:
    rows = await asyncio.to_thread(
        checks._query, db_url, "SELECT id FROM generations WHERE status = 'running'", ()
    )
    return {str(r[0]) for r in rows}


async def _verify(
    service: Service, db_url: str, load: Load
) -> tuple[checks.StreamReport, checks.SessionReport, list[str]]:
    problems: list[str] = []
    if not await checks.wait_settled(db_url, SETTLE_TIMEOUT_S):
        running = await checks.running_generations(db_url)
        problems.append(f"{running} generations still running {SETTLE_TIMEOUT_S:.0f}s later")
    streams = await checks.check_streams(service.base_url, load.writers)
    sessions = await checks.check_sessions(service.base_url, db_url, load.chats)
    problems += streams.problems + sessions.problems
    return streams, sessions, problems


def _load_facts(s: checks.StreamReport, c: checks.SessionReport) -> str:
    codes = c.codes()
    outcome = ", ".join(f"{n(v)} {k}" for k, v in codes.most_common())
    return (
        f"{n(s.acked)} acked appends, {s.lost} lost, {s.duplicated} duplicated, "
        f"{'offsets increasing' if s.offsets_ok else 'OFFSETS OUT OF ORDER'}, "
        f"{n(c.acked)} acked messages, {c.lost} lost, {c.duplicated} duplicated, "
        f"{n(len(c.outcomes))} generations = {n(c.usage_rows)} usage rows ({outcome or 'none'})"
    )


# --- kill -9 --------------------------------------------------------------------------------


async def kill9(ctx: Context) -> Result:
    scale = ctx.scale
    with scratch_database() as db_url:
        env = {"SIMULATOR_TTFT_MS": "100", "SIMULATOR_TOKENS_PER_S": "60"}
        service = Service(db_url, ctx.workdir, env, name="kill9")
        await _start(service)
        try:
            async with make_client() as client:
                load = await _standard_load(service, client, ctx, "kill9", (60, 240))
                problems: list[str] = []
                doomed: set[str] = set()
                for _ in range(scale.kills):
                    if not await load.wait_acks(scale.acks_per_phase, PHASE_TIMEOUT_S):
                        problems.append("the load stalled before a kill")
                    # A kill that catches no generation mid-answer would test less than it says.
                    running = await _until_any_running(db_url, PHASE_TIMEOUT_S)
                    doomed |= running
                    await asyncio.to_thread(service.kill9)
                    await _start(service)
                if not await load.wait_acks(scale.acks_per_phase, PHASE_TIMEOUT_S):
                    problems.append("the load did not resume after the last restart")
                await load.finish()
                streams, sessions, found = await _verify(service, db_url, load)
        finally:
            service.stop()
    problems += found
    interrupted = 0
    for gid in doomed:
        outcome = sessions.outcomes.get(gid)
        if outcome is None:
            continue
        if outcome.error_code == "interrupted":
            interrupted += 1
        elif outcome.status != "completed":
            # Completed is allowed: it may have ended between the query and the kill.
            problems.append(
                f"generation {gid} running at a kill ended {outcome.status}/"
                f"{outcome.error_code}, not interrupted"
            )
    if doomed and not interrupted:
        problems.append("no generation was interrupted by the kills: the scenario missed")
    facts = (
        f"{scale.writers} writers + {scale.sessions} chatting sessions, {scale.kills} kills "
        f"({len(doomed)} generations running at them, {interrupted} ended interrupted), "
        + _load_facts(streams, sessions)
    )
    return Result("kill9", not problems, facts, [*problems, f"client saw: {load.tally.brief()}"])


# --- SIGTERM --------------------------------------------------------------------------------

DRAIN_TIMEOUT_S = 6
LONG_TOKENS = 3000  # 50 s at 60 tokens/s: cannot fit the drain
EXIT_GRACE_S = 15.0  # on top of the drain timeout: saving the interrupted ones, uvicorn's exit


async def sigterm(ctx: Context) -> Result:
    scale = ctx.scale
    with scratch_database() as db_url:
        env = {
            "SIMULATOR_TTFT_MS": "100",
            "SIMULATOR_TOKENS_PER_S": "60",
            "DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        }
        service = Service(db_url, ctx.workdir, env, name="sigterm")
        await _start(service)
        try:
            async with make_client() as client:
                # Most sessions answer in about a second (they finish within the drain); two
                # write answers far longer than it (they must end interrupted, text kept).
                load = await _standard_load(service, client, ctx, "sigterm", (30, 90))
                await start_chatters(
                    load, client, 2, (LONG_TOKENS, LONG_TOKENS), ctx.seed + 1, max_messages=1
                )
                long_sessions = {c.session_id for c in load.chats[-2:]}
                problems: list[str] = []
                if not await load.wait_acks(scale.acks_per_phase, PHASE_TIMEOUT_S):
                    problems.append("the load stalled before the SIGTERM")
                await _until_running(db_url, long_sessions)
                running = await _running_ids(db_url)
                code, took = await asyncio.to_thread(
                    service.sigterm, DRAIN_TIMEOUT_S + EXIT_GRACE_S
                )
                if code is None:
                    problems.append(f"still running {took:.0f}s after SIGTERM (killed)")
                    await asyncio.to_thread(service.kill9)
                elif code not in (0, -15):
                    problems.append(f"exited with {code} after SIGTERM")
                drained_by_process = await _ended_by_drain(db_url, running)
                await _start(service)
                if not await load.wait_acks(scale.acks_per_phase, PHASE_TIMEOUT_S):
                    problems.append("the load did not resume after the restart")
                await load.finish()
                streams, sessions, found = await _verify(service, db_url, load)
        finally:
            service.stop()
    problems += found
    completed = interrupted = 0
    for gid in running:
        outcome = sessions.outcomes.get(gid)
        if outcome is None:
            continue
        if gid not in drained_by_process:
            problems.append(f"generation {gid} was not saved by the drain (left running)")
        if outcome.status == "completed":
            completed += 1
        elif outcome.status == "interrupted" and outcome.error_code == "interrupted":
            interrupted += 1
            if outcome.session_id in long_sessions and not outcome.text:
                problems.append(f"generation {gid}: interrupted with no partial text kept")
        else:
            problems.append(
                f"generation {gid} running at SIGTERM ended {outcome.status}/{outcome.error_code}"
            )
    long_interrupted = sum(
        1
        for o in sessions.outcomes.values()
        if o.session_id in long_sessions and o.status == "interrupted"
    )
    if long_interrupted != len(long_sessions):
        problems.append(
            f"{long_interrupted}/{len(long_sessions)} long answers ended interrupted by the drain"
        )
    drained_503 = load.tally.failures.get("503", 0)
    exit_text = "did not exit" if code is None else f"exit {code} after {took:.1f}s"
    facts = (
        f"drain {DRAIN_TIMEOUT_S}s, {exit_text}, {len(running)} generations running at SIGTERM: "
        f"{completed} finished, {interrupted} interrupted (partial text kept), "
        f"{drained_503} requests refused 503 while draining, " + _load_facts(streams, sessions)
    )
    return Result("sigterm", not problems, facts, [*problems, f"client saw: {load.tally.brief()}"])


async def _until_running(db_url: str, session_ids: set[str], timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        rows = await asyncio.to_thread(
            checks._query,
            db_url,
            "SELECT count(*) FROM generations WHERE status = 'running' AND session_id = ANY(%s)",
            (list(session_ids),),
        )
        if int(rows[0][0]) == len(session_ids):
            return
        await asyncio.sleep(0.1)


async def _until_any_running(db_url: str, timeout_s: float) -> set[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not (running := await _running_ids(db_url)) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return running


async def _ended_by_drain(db_url: str, ids: set[str]) -> set[str]:
    """Which of `ids` the stopped process itself ended (none left `running` for recovery)."""
    rows = await asyncio.to_thread(
        checks._query,
        db_url,
        "SELECT id FROM generations WHERE id = ANY(%s) AND status <> 'running'",
        (list(ids),),
    )
    return {str(r[0]) for r in rows}


# --- Postgres restart -----------------------------------------------------------------------

RECOVERY_TIMEOUT_S = 60.0


async def postgres(ctx: Context) -> Result:
    scale = ctx.scale
    with scratch_database() as db_url:
        env = {"SIMULATOR_TTFT_MS": "100", "SIMULATOR_TOKENS_PER_S": "60"}
        service = Service(db_url, ctx.workdir, env, name="postgres")
        await _start(service)
        try:
            async with make_client() as client:
                load = await _standard_load(service, client, ctx, "pg", (60, 240))
                problems: list[str] = []
                if not await load.wait_acks(scale.acks_per_phase, PHASE_TIMEOUT_S):
                    problems.append("the load stalled before the restart")
                before = Counter(load.tally.failures)
                try:
                    restart_s = await asyncio.to_thread(restart_postgres)
                finally:
                    await asyncio.to_thread(ensure_postgres_up)
                recovered_s = await _until_ready(client, service.base_url, RECOVERY_TIMEOUT_S)
                if recovered_s is None:
                    problems.append(f"/health/ready not 200 within {RECOVERY_TIMEOUT_S:.0f}s")
                if not await load.wait_acks(scale.acks_per_phase, PHASE_TIMEOUT_S):
                    problems.append("the load did not resume after Postgres came back")
                outage = load.tally.failures - before
                await load.finish()
                if not service.alive():
                    problems.append("the service process died during the Postgres restart")
                streams, sessions, found = await _verify(service, db_url, load)
        finally:
            service.stop()
            await asyncio.to_thread(ensure_postgres_up)
    problems += found
    server_errors = {k: v for k, v in outage.items() if k.isdigit() and int(k) >= 500}
    unhandled = {k: v for k, v in server_errors.items() if k != "503"}
    if unhandled:
        problems.append(
            f"the outage was answered with {unhandled} instead of 503 (see the service log)"
        )
    outage_text = ", ".join(f"{v}x{k}" for k, v in outage.most_common(4)) or "nothing"
    facts = (
        f"restart took {restart_s:.1f}s, ready again {recovered_s or -1:.1f}s later, "
        f"clients saw {outage_text} meanwhile, " + _load_facts(streams, sessions)
    )
    return Result("postgres", not problems, facts, [*problems, f"client saw: {load.tally.brief()}"])


async def _until_ready(client: httpx.AsyncClient, base_url: str, timeout_s: float) -> float | None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < timeout_s:
        try:
            if (await client.get(f"{base_url}/health/ready")).status_code == 200:
                return loop.time() - started
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    return None


# --- Redis down -----------------------------------------------------------------------------

SESSION_CREATE_LIMIT = 4


async def redis_down(ctx: Context) -> Result:
    scale = ctx.scale
    problems: list[str] = []
    private = RedisServer(ctx.workdir)
    await asyncio.to_thread(private.start)
    with scratch_database() as db_url:
        env = {
            "SIMULATOR_TTFT_MS": "50",
            "SIMULATOR_TOKENS_PER_S": "200",
            "REDIS_URL": private.url,
            # Sessions created per user (all of ours are the dev-mode admin's): low enough to
            # see the limit bite, the one the probes below count against.
            "RATE_LIMIT_SESSION_CREATE": f"{SESSION_CREATE_LIMIT}/minute",
        }
        service = Service(db_url, ctx.workdir, env, name="redis")
        await _start(service)
        try:
            async with make_client() as client:
                load = Load(service.base_url)
                paths = [f"chaos/redis-{i}" for i in range(scale.streams)]
                for path in paths:
                    await create_stream(client, service.base_url, path)
                start_writers(load, client, paths, scale.writers, scale.pace_s, "redis")
                # Chatters' sessions are made through the limit too: two, within it.
                await start_chatters(load, client, 2, (20, 60), ctx.seed)
                await load.wait_acks(scale.acks_per_phase // 2, PHASE_TIMEOUT_S)

                up = await _probe_creates(client, service.base_url, scale.redis_probes)
                keys = await asyncio.to_thread(_redis_keys, private.port)
                if up.first_429 is None:
                    problems.append("with Redis up the session-create limit never answered 429")
                if not keys:
                    problems.append("no rate-limit keys in the private Redis: not its storage")

                await asyncio.to_thread(private.kill9)
                sends_before = load.acked_sends()
                down = await _probe_creates(client, service.base_url, scale.redis_probes)
                if not await load.wait_acks(scale.acks_per_phase // 2, PHASE_TIMEOUT_S):
                    problems.append("the load stalled with Redis down")
                await _wait_sends(load, sends_before + 2, PHASE_TIMEOUT_S)
                sends_down = load.acked_sends() - sends_before
                if down.served != down.tries:
                    problems.append(
                        f"Redis down: {down.tries - down.served} creates refused "
                        f"({down.statuses}); limits should fail open"
                    )

                await asyncio.to_thread(private.start)
                await asyncio.to_thread(private.freeze)
                # Past the limiter's pause after the last failure: it asks the frozen Redis.
                await asyncio.sleep(STORAGE_RETRY_AFTER_S + 0.5)
                frozen = await _probe_creates(client, service.base_url, scale.redis_probes)
                if frozen.served != frozen.tries:
                    problems.append(
                        f"Redis frozen: {frozen.tries - frozen.served} creates not served "
                        f"({frozen.statuses}, slowest {frozen.slowest_s:.1f}s)"
                    )
                await asyncio.to_thread(private.thaw)

                # A fresh Redis (nothing persisted): a new window, enforced again once the
                # limiter tries Redis again after its last failure.
                await asyncio.sleep(STORAGE_RETRY_AFTER_S + 0.5)
                back = await _probe_creates(client, service.base_url, scale.redis_probes)
                if back.first_429 is None:
                    problems.append("after Redis came back the limit was not enforced again")
                await load.wait_acks(scale.acks_per_phase // 2, PHASE_TIMEOUT_S)
                await load.finish()
                warnings = service.log_count("rate_limit_storage_unavailable")
                timeouts = service.log_count("error=TimeoutError limit=")
                streams, sessions, found = await _verify(service, db_url, load)
        finally:
            service.stop()
            private.stop()
    problems += found
    if not warnings:
        problems.append("no rate_limit_storage_unavailable warning was logged")
    if not timeouts:
        problems.append("the frozen Redis never timed out a limit check: the phase missed")
    facts = (
        f"limits fail open — Redis up: 429 from create #{up.first_429}; killed: "
        f"{down.served}/{down.tries} creates and {sends_down} sends served (slowest "
        f"{down.slowest_s:.2f}s); frozen: {frozen.served}/{frozen.tries} served (slowest "
        f"{frozen.slowest_s:.2f}s, {timeouts} checks timed out); back: 429 from create "
        f"#{back.first_429}; {warnings} warnings logged; " + _load_facts(streams, sessions)
    )
    return Result("redis", not problems, facts, [*problems, f"client saw: {load.tally.brief()}"])


@dataclass
class Probe:
    tries: int = 0
    served: int = 0
    first_429: int | None = None
    slowest_s: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)


PROBE_TIMEOUT_S = 10.0


async def _probe_creates(client: httpx.AsyncClient, base_url: str, count: int) -> Probe:
    """Create `count` sessions one after another: which were served, which limited."""
    probe = Probe()
    for i in range(1, count + 1):
        probe.tries += 1
        started = time.monotonic()
        try:
            got = await client.post(
                f"{base_url}/v1/sessions", json={"title": "probe"}, timeout=PROBE_TIMEOUT_S
            )
            status = str(got.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        probe.slowest_s = max(probe.slowest_s, time.monotonic() - started)
        probe.statuses[status] += 1
        if status == "201":
            probe.served += 1
        elif status == "429" and probe.first_429 is None:
            probe.first_429 = i
    return probe


def _redis_keys(port: int) -> list[bytes | str]:
    conn = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        return list(conn.keys("*"))
    finally:
        conn.close()


async def _wait_sends(load: Load, count: int, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while load.acked_sends() < count and loop.time() < deadline:
        await asyncio.sleep(0.1)


# --- upstream faults ------------------------------------------------------------------------

# (marker in the message, expected ending: "completed" or the RUN_ERROR code). The service's
# SDK retries 429/5xx twice (ANTHROPIC_MAX_RETRIES=2), so `NAME*N` fails only the first N tries.
FAULT_CASES: tuple[tuple[str, str], ...] = (
    ("rate_limit", "rate_limited"),
    ("overloaded", "overloaded"),
    ("server_error", "overloaded"),
    ("invalid_request", "invalid_request"),
    ("auth", "auth"),
    ("midstream_error", "overloaded"),
    ("cut", "upstream_cut"),
    ("truncate", "upstream_cut"),
    ("stall", "upstream_cut"),
    ("slow", "completed"),
    ("rate_limit*1", "completed"),
    ("overloaded*2", "completed"),
    ("server_error*3", "overloaded"),
)
STALL_TIMEOUT_S = 12  # the service's watchdog; the simulator's `slow` waits 10 s, `stall` 60 s
# A few deltas (thinking: every model thinks first) arrive before these faults.
PARTIAL_FAULTS = ("midstream_error", "cut", "truncate")


async def faults(ctx: Context) -> Result:
    scale = ctx.scale
    cases = [c for c in FAULT_CASES if not scale.faults or c[0] in scale.faults]
    problems: list[str] = []
    sim = Simulator(ctx.workdir, ttft_ms=50, tokens_per_s=100)
    await asyncio.to_thread(sim.start)
    with scratch_database() as db_url:
        env = {
            "ANTHROPIC_API_KEY": "sk-chaos",
            "ANTHROPIC_BASE_URL": sim.base_url,
            "ANTHROPIC_MAX_RETRIES": "2",
            "GENERATION_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S),
        }
        service = Service(db_url, ctx.workdir, env, name="faults")
        await _start(service)
        try:
            async with make_client() as client:
                load = Load(service.base_url)
                expected: dict[str, str] = {}  # generation id -> expected ending
                labels: dict[str, str] = {}

                async def one(label: str, marker: str, want: str) -> float:
                    sid = await create_session(client, service.base_url, f"fault {label}")
                    ledger = ChatLedger(sid)
                    load.chats.append(ledger)
                    started = time.monotonic()
                    ack = await send_message(client, load, ledger, f"{label}-0", marker)
                    if ack is None:
                        return 0.0
                    expected[ack.generation_id] = want
                    labels[ack.generation_id] = label
                    await wait_generation(client, load, ledger, ack.generation_id, 60.0)
                    return time.monotonic() - started

                took = await asyncio.gather(
                    *(
                        one(name, f"fault case [[fault:{name}]] [[tokens:40]]", want)
                        for name, want in cases
                    )
                )
                # The upstream itself goes away: mid-answer, then for a new request.
                cut = asyncio.create_task(
                    one("killed", "long answer [[tokens:2000]]", "upstream_cut")
                )
                await asyncio.sleep(1.5)
                await asyncio.to_thread(sim.kill9)
                took.append(await cut)
                took.append(await one("down", "while down [[tokens:20]]", "upstream_cut"))
                await asyncio.to_thread(sim.start)
                took.append(await one("back", "after the outage [[tokens:20]]", "completed"))
                _streams, sessions, found = await _verify(service, db_url, load)
                events = await asyncio.to_thread(_error_events, db_url, list(expected))
        finally:
            service.stop()
            sim.stop()
    problems += found
    matched = 0
    codes: Counter[str] = Counter()
    for gid, want in expected.items():
        outcome = sessions.outcomes.get(gid)
        label = labels[gid]
        if outcome is None:
            problems.append(f"{label}: no usage row")
            continue
        got = "completed" if outcome.status == "completed" else outcome.error_code
        codes[str(got)] += 1
        if got != want:
            problems.append(f"{label}: ended {outcome.status}/{outcome.error_code}, want {want}")
            continue
        if want != "completed":
            if outcome.status != "error":
                problems.append(f"{label}: row status {outcome.status}, want error")
            if events.get(gid) != 1:
                problems.append(f"{label}: {events.get(gid, 0)} error events, want 1")
            if label in PARTIAL_FAULTS and not (outcome.text or outcome.thinking):
                problems.append(f"{label}: no output streamed before the fault")
            elif label in PARTIAL_FAULTS and outcome.persisted_thinking != outcome.thinking:
                problems.append(f"{label}: the partial output before the fault was not kept")
        matched += 1
    if len(expected) != len(cases) + 3:
        problems.append(f"only {len(expected)} of {len(cases) + 3} cases were acknowledged")
    code_text = ", ".join(f"{v} {k}" for k, v in codes.most_common())
    facts = (
        f"{len(cases)} simulator faults + upstream killed mid-answer, down, back: "
        f"{matched}/{len(expected)} ended as expected ({code_text}), "
        f"{n(len(sessions.outcomes))} generations = {n(sessions.usage_rows)} usage rows, "
        f"{sum(events.values())} error events, none hung (slowest {max(took, default=0):.1f}s)"
    )
    return Result("faults", not problems, facts, [*problems, f"client saw: {load.tally.brief()}"])


def _error_events(db_url: str, ids: list[str]) -> dict[str, int]:
    rows = checks._query(
        db_url,
        "SELECT generation_id, count(*) FROM error_events WHERE generation_id = ANY(%s)"
        " GROUP BY generation_id",
        (ids,),
    )
    return {str(r[0]): int(r[1]) for r in rows}


# --- random client disconnects ---------------------------------------------------------------

KINDS = ("sse", "long-poll", "raw-sse", "append", "send")


@dataclass
class Cuts:
    done: Counter[str] = field(default_factory=Counter)
    target: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.done.values())

    def left(self) -> bool:
        return self.total < self.target


def _raw_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _cut_raw(
    port: int, request: bytes, rng: random.Random, read_bytes: int = 0, linger_s: float = 0.0
) -> None:
    """Send a random prefix of `request` (sometimes all of it, then read a little of the
    answer), then hang up: half the time politely (FIN), half the time with a reset (RST)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        cut = len(request) if rng.random() < 0.4 else rng.randint(1, len(request))
        writer.write(request[:cut])
        await writer.drain()
        if cut == len(request):
            if read_bytes:
                await asyncio.wait_for(reader.read(rng.randint(1, read_bytes)), 10)
            await asyncio.sleep(rng.uniform(0, linger_s))
        elif rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0, 0.2))
    finally:
        sock = writer.get_extra_info("socket")
        if sock is not None and rng.random() < 0.5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def _cut_reader(url: str, live: str, offset: str, rng: random.Random) -> None:
    """An official-client live reader that hangs up after a random time or number of pages."""
    pages = rng.randint(1, 6)

    async def read() -> None:
        nonlocal pages
        async with astream(url, offset=offset, live=live, timeout=15.0) as response:  # type: ignore[arg-type]
            async for _event in response.iter_events(mode="json_batches"):
                pages -= 1
                if pages <= 0:
                    return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), timeout=rng.uniform(0.05, 2.5))


async def disconnects(ctx: Context) -> Result:
    scale = ctx.scale
    rng = random.Random(ctx.seed)
    problems: list[str] = []
    with scratch_database() as db_url:
        env = {"SIMULATOR_TTFT_MS": "100", "SIMULATOR_TOKENS_PER_S": "80"}
        service = Service(db_url, ctx.workdir, env, name="disconnects")
        await _start(service)
        port = service.port
        try:
            async with make_client(128) as client:
                load = Load(service.base_url)
                cuts = Cuts(target=scale.disconnects)
                stream_path = "chaos/disconnects"
                await create_stream(client, service.base_url, stream_path)
                appender = WriterLedger("cut-appender", stream_path, producer=True)
                load.writers.append(appender)
                rss_before = _rss_mb(service)

                async def cut_send(ledger: ChatLedger, cmid: str, content: str) -> None:
                    body = json.dumps({"content": content, "client_message_id": cmid}).encode()
                    path = f"/v1/sessions/{ledger.session_id}/messages"
                    req = _raw_request(port, "POST", path, JSON, body)
                    await _cut_raw(port, req, rng, read_bytes=64)
                    cuts.done["send"] += 1

                async def chatter(ledger: ChatLedger) -> None:
                    k = 0
                    while cuts.left():
                        cmid = f"{ledger.session_id[:8]}-{k}"
                        content = f"disconnect {k} [[tokens:{rng.randint(150, 300)}]]"
                        # The same message, cut at random points first: whichever of these
                        # reached the service, the real send below is acknowledged once.
                        for _ in range(rng.randint(1, 4)):
                            try:
                                await cut_send(ledger, cmid, content)
                            except (OSError, TimeoutError) as exc:
                                cuts.errors[type(exc).__name__] += 1
                        ack = await send_message(client, load, ledger, cmid, content)
                        if ack is None:
                            return
                        await wait_generation(client, load, ledger, ack.generation_id)
                        k += 1

                seq = 0
                # One producer, so one append at a time (its seqs must arrive in order).
                appending = asyncio.Lock()

                async def cut_append() -> None:
                    async with appending:
                        await _cut_append()

                async def _cut_append() -> None:
                    nonlocal seq
                    my = seq
                    seq += 1
                    headers = {
                        **JSON,
                        "Producer-Id": appender.writer,
                        "Producer-Epoch": "0",
                        "Producer-Seq": str(my),
                    }
                    body = json.dumps({"w": appender.writer, "n": my}).encode()
                    req = _raw_request(port, "POST", f"/v1/stream/{stream_path}", headers, body)
                    await _cut_raw(port, req, rng, read_bytes=32)
                    cuts.done["append"] += 1
                    # Then the real one, same seq: it lands once whether the cut one did or not.
                    got = await client.post(
                        f"{service.base_url}/v1/stream/{stream_path}",
                        content=body,
                        headers=headers,
                    )
                    if got.status_code in (200, 204):
                        appender.acked.append(
                            Ack(my, got.headers.get("Stream-Next-Offset"), got.status_code)
                        )
                    else:
                        appender.unexpected.append(f"n={my}: {got.status_code} {got.text[:100]}")

                sessions = await asyncio.gather(
                    *(
                        create_session(client, service.base_url, f"disconnects {i}")
                        for i in range(scale.disconnect_sessions)
                    )
                )
                ledgers = [ChatLedger(sid) for sid in sessions]
                load.chats.extend(ledgers)
                chat_tasks = [asyncio.create_task(chatter(led)) for led in ledgers]

                async def one_cut(kind: str) -> None:
                    ledger = rng.choice(ledgers)
                    url = f"{service.base_url}/v1/stream/sessions/{ledger.session_id}"
                    offset = rng.choice(["-1", "now", "-1"])
                    if kind in ("sse", "long-poll"):
                        await _cut_reader(url, kind, offset, rng)
                        cuts.done[kind] += 1
                    elif kind == "raw-sse":
                        path = f"/v1/stream/sessions/{ledger.session_id}?offset={offset}&live=sse"
                        req = _raw_request(port, "GET", path, {"Accept": "text/event-stream"}, b"")
                        await _cut_raw(port, req, rng, read_bytes=4096, linger_s=1.5)
                        cuts.done["raw-sse"] += 1
                    else:
                        await cut_append()

                sem = asyncio.Semaphore(scale.concurrency)

                async def guarded(kind: str) -> None:
                    async with sem:
                        try:
                            await asyncio.wait_for(one_cut(kind), timeout=30)
                        except (OSError, TimeoutError, httpx.HTTPError) as exc:
                            cuts.errors[type(exc).__name__] += 1
                            cuts.done[kind] += 1  # the hang-up happened, however it went

                pending: set[asyncio.Task[None]] = set()
                started = time.monotonic()
                while cuts.left():
                    # Sends are cut by the chatters; the rest are spread over the other kinds.
                    while len(pending) < scale.concurrency and (
                        cuts.total + len(pending) < cuts.target
                    ):
                        kind = rng.choice(KINDS[:4])
                        pending.add(asyncio.create_task(guarded(kind)))
                    if not pending:
                        await asyncio.sleep(0.05)
                        continue
                    _done, pending = await asyncio.wait(
                        pending, timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                    )
                    if time.monotonic() - started > 600:
                        problems.append("disconnects did not finish within 10 minutes")
                        break
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                cut_s = time.monotonic() - started
                # Every reader has hung up by now: the service must notice and let go of them.
                readers_zero_s = await _live_readers_zero(client, service.base_url, 60.0)
                if readers_zero_s is None:
                    problems.append("chatops_live_readers did not return to 0 after the cuts")
                await asyncio.wait(chat_tasks, timeout=300)
                if not service.alive():
                    problems.append("the service died")
                rss_after = _rss_mb(service)
                streams, sess, found = await _verify(service, db_url, load)
        finally:
            service.stop()
    problems += found
    not_completed = {k: v for k, v in sess.codes().items() if k != "completed"}
    if not_completed:
        problems.append(f"generations that did not complete: {not_completed}")
    kinds = ", ".join(f"{cuts.done[k]} {k}" for k in KINDS)
    facts = (
        f"{n(cuts.total)} disconnects in {cut_s:.0f}s ({kinds}), "
        f"{n(streams.acked)} appends acked after cut attempts, {streams.lost} lost, "
        f"{streams.duplicated} duplicated; {n(sess.acked)} messages acked after cut sends, "
        f"{sess.lost} lost, {sess.duplicated} duplicated; {n(len(sess.outcomes))} generations = "
        f"{n(sess.usage_rows)} usage rows, all completed, final reads match persisted text; "
        f"live readers back to 0 in {readers_zero_s or -1:.1f}s; RSS {rss_before:.0f}→"
        f"{rss_after:.0f} MB"
    )
    extra = [f"client saw: {load.tally.brief()}", f"cut errors: {dict(cuts.errors)}"]
    return Result("disconnects", not problems, facts, problems + extra)


def _rss_mb(service: Service) -> float:
    from benchmarks.servers import _process_tree, _vm_rss

    if service.proc is None:
        return 0.0
    return sum(_vm_rss(pid) for pid in _process_tree(service.proc.pid)) / 2**20


async def _live_readers_zero(
    client: httpx.AsyncClient, base_url: str, timeout_s: float
) -> float | None:
    """Seconds until the service counts no live reader (every cut one noticed and released)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < timeout_s:
        try:
            text = (await client.get(f"{base_url}/metrics")).text
        except httpx.HTTPError:
            text = ""
        for line in text.splitlines():
            if line.startswith("chatops_live_readers ") and float(line.split()[1]) == 0:
                return loop.time() - started
        await asyncio.sleep(0.25)
    return None


# --- the registry ---------------------------------------------------------------------------

Scenario = Callable[[Context], Awaitable[Result]]
# In the order `make chaos` runs them: Postgres last, since every helper on the machine shares it.
SCENARIOS: dict[str, Scenario] = {
    "kill9": kill9,
    "sigterm": sigterm,
    "redis": redis_down,
    "faults": faults,
    "disconnects": disconnects,
    "postgres": postgres,
}


async def run(name: str, ctx: Context) -> Result:
    started = time.monotonic()
    try:
        result = await SCENARIOS[name](ctx)
    except HarnessError as exc:
        result = Result(name, False, f"could not run: {str(exc).splitlines()[0]}", [str(exc)])
    except Exception as exc:
        result = Result(name, False, f"harness crashed: {type(exc).__name__}: {exc}", [repr(exc)])
    finally:
        if name == "postgres":
            await asyncio.to_thread(ensure_postgres_up)
    result.seconds = time.monotonic() - started
    return result


__all__ = ["SCENARIOS", "Context", "Result", "Scale", "run", "wait_postgres"]

"""Chat-session scenarios (ours only): time to first token through the gateway, and scale.

Unlike the protocol scenarios these need our service configured in a particular way (its
upstream, the simulator's pace), so each runner starts its own servers from a work directory:

- `ttft`: a standalone `chatops simulator` (200 ms to first event, 100 tokens/s) and our
  service pointed at it (ANTHROPIC_API_KEY=sk-bench, ANTHROPIC_BASE_URL=the simulator). Rounds of
  50 concurrent requests go straight to the simulator with the Anthropic SDK, then 50 concurrent
  sessions go through the service; the difference of the two TTFT distributions is the
  gateway's overhead. The direct call sends what the service sends for the default model
  (claude-sonnet-5-5): the same system prompt, tool specs, `thinking: {"type": "adaptive"}`
  and `max_tokens`, so the simulator streams the same thinking block before the text.
- `scale`: our service pointed at a standalone simulator (200 ms, 50 tokens/s); N sessions each
  answer `[[tokens:150]] [[clock]]` at once, each with one live SSE reader. `[[clock]]` makes
  the simulator start every text delta with `[t:<ms>]`, the time it sent it; the delivery lag
  of a delta is the reader's receive time minus that (same machine, same clock), so it counts
  everything between Claude and the reader: the wait to be read, the coalescing window, the
  write and the delivery. N steps 50, 100, 150, 200, 300, 400, 500.

Everything talks only to 127.0.0.1, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks import servers
from benchmarks.loadgen import percentiles, quiet_collector
from benchmarks.scenarios import Config, _ChunkedDecoder
from benchmarks.servers import Server

SCENARIOS = ("ttft", "scale")
Result = dict[str, Any]

MODEL = "claude-sonnet-5-5"  # the service's default model
API_KEY = "sk-bench"
TTFT_CONCURRENCY = 50
TTFT_ROUNDS = 4  # burst rounds
TTFT_LOOP_S = 20.0  # measured seconds of the steady (closed-loop) run, per path
TTFT_THINK_S = (0.2, 1.0)  # a session's pause between an answer and its next message
TTFT_TOKENS = 20
TTFT_SIM_TTFT_MS = 200
TTFT_SIM_TOKENS_PER_S = 100
TTFT_TARGET_P50_MS = 5.0
TTFT_TARGET_P99_MS = 20.0
SCALE_STEPS = (50, 100, 150, 200, 300, 400, 500)
SCALE_TOKENS = 150
SCALE_SIM_TTFT_MS = 200
SCALE_SIM_TOKENS_PER_S = 50
SCALE_STEP_TIMEOUT_S = 60.0
SCALE_TARGET_LAG_P99_MS = 250.0
# The steady variant: sessions start at this rate (a start costs the service ~20 ms of CPU, so
# faster would measure the start-up storm again), answers last past the last start by the
# window, and lag counts only for events stamped while every one of the N is generating.
SCALE_STEADY_STARTS_PER_S = 40.0
SCALE_STEADY_WINDOW_S = 6.0
SCALE_STEADY_LEAD_S = 2.0  # time to first text (200 ms + the thinking block) with margin
SCALE_TARGET_RSS_MB = 400.0
# The simulator's `[[clock]]` stamp at the head of each text delta it sends: its send time, ms.
_CLOCK_RE = re.compile(r"\[t:(\d+)\]")
MAX_OUTPUT_TOKENS = 4096  # the service's default GENERATION_MAX_OUTPUT_TOKENS
MB = 1024 * 1024


# --- Starting the servers -------------------------------------------------------------------


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Temporarily set (or, with None, unset) environment variables; servers inherit them."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def _ours(workdir: Path, **env: str | None) -> Iterator[Server]:
    """Our service on a fresh Postgres database, with extra environment for this scenario."""
    with _environ(**env):
        server = servers.start_ours(workdir)  # copies os.environ when it starts the process
    try:
        yield server
    finally:
        servers.stop(server)


@dataclass
class _Simulator:
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def _simulator(workdir: Path, ttft_ms: int, tokens_per_s: int) -> Iterator[_Simulator]:
    exe = str(servers.REPO / ".venv" / "bin" / "chatops")
    port = servers.free_port()
    log_path = workdir / f"simulator-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                *(exe, "simulator", "--host", "127.0.0.1", "--port", str(port)),
                *("--ttft-ms", str(ttft_ms), "--tokens-per-s", str(tokens_per_s)),
            ],
            cwd=servers.REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    sim = _Simulator(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    raise servers.ServerError(f"simulator exited:\n{sim.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    resp = client.get(f"{sim.base_url}/v1/models", headers={"x-api-key": API_KEY})
                    if resp.status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise servers.ServerError(f"simulator not ready:\n{sim.log_tail()}")
                time.sleep(0.2)
        yield sim
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


# --- Session API client ---------------------------------------------------------------------


class _SessionReader:
    """One live SSE reader of a session stream, parsing the generation's AG-UI events."""

    def __init__(self, host: str, port: int, path: str, offset: str) -> None:
        self.host, self.port, self.path, self.offset = host, port, path, offset
        self.opened = asyncio.Event()  # response headers arrived (or the reader failed)
        self.first_text = asyncio.Event()
        self.done = asyncio.Event()  # RUN_FINISHED / RUN_ERROR seen (or the reader failed)
        self.first_text_at = 0.0  # perf_counter of the first TEXT_MESSAGE_CONTENT
        # (send time, receive time minus it), ms, of every text delta the simulator stamped
        # (`[[clock]]`): the delivery lag from the source, the steady run keeping those sent
        # inside its window
        self.source_lags: list[tuple[float, float]] = []
        # (event timestamp, receive time minus it), ms: the same from when the service handled
        # the upstream event, which leaves out the time it spent waiting to be read
        self.stamped_lags: list[tuple[float, float]] = []
        self.run_error: str | None = None
        self.error: str | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        try:
            reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._writer.write(
                f"GET {self.path}?offset={self.offset}&live=sse HTTP/1.1\r\n"
                f"Host: {self.host}:{self.port}\r\nAccept: text/event-stream\r\n"
                "Accept-Encoding: identity\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1]
            if status != b"200":
                self.error = f"SSE status {status.decode()}"
                return
            self.opened.set()
            decoder = _ChunkedDecoder() if b"transfer-encoding: chunked" in head.lower() else None
            text = b""
            while not self.done.is_set():
                data = await reader.read(65536)
                if not data:
                    self.error = "SSE closed before the run finished"
                    return
                now_ms = time.time() * 1000
                now_perf = time.perf_counter()
                text += decoder.feed(data) if decoder else data
                text = text.replace(b"\r\n", b"\n")
                while b"\n\n" in text:
                    frame, text = text.split(b"\n\n", 1)
                    lines = frame.split(b"\n")
                    if b"event: data" not in lines and b"event:data" not in lines:
                        continue
                    payload = b"\n".join(
                        ln[5:].removeprefix(b" ") for ln in lines if ln.startswith(b"data:")
                    )
                    self._on_records(json.loads(payload), now_ms, now_perf)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.error = repr(exc)
        finally:
            self.opened.set()
            self.done.set()

    def _on_records(self, records: Any, now_ms: float, now_perf: float) -> None:
        for record in records if isinstance(records, list) else []:
            value = record.get("value") if isinstance(record, dict) else None
            if record.get("type") != "chunk" or not isinstance(value, dict):
                continue
            if value.get("role") != "assistant":
                continue
            try:
                event = json.loads(value.get("chunk", ""))
            except ValueError:
                continue
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "TEXT_MESSAGE_CONTENT":
                if not self.first_text.is_set():
                    self.first_text_at = now_perf
                    self.first_text.set()
                delta = event.get("delta")
                for stamp in _CLOCK_RE.findall(delta if isinstance(delta, str) else ""):
                    self.source_lags.append((int(stamp), now_ms - int(stamp)))
                if isinstance(event.get("timestamp"), int | float):
                    self.stamped_lags.append((event["timestamp"], now_ms - event["timestamp"]))
            elif kind in ("RUN_FINISHED", "RUN_ERROR"):
                if kind == "RUN_ERROR":
                    self.run_error = _run_error_text(event)
                self.done.set()

    def close(self) -> None:
        if self._writer:
            self._writer.close()


@dataclass
class _Session:
    id: str
    stream_path: str
    reader: _SessionReader | None = None
    task: asyncio.Task[None] | None = None
    post_status: int = 0
    post_error: str | None = None
    post_started: float = 0.0


async def _gather_limited(limit: int, items: list[Any], fn: Callable[[Any], Any]) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(item: Any) -> Any:
        async with sem:
            return await fn(item)

    return await asyncio.gather(*(one(i) for i in items))


async def _open_sessions(client: httpx.AsyncClient, server: Server, n: int) -> list[_Session]:
    """Create n sessions and open a live reader on each at its stream's current tail."""
    host = server.base_url.split("//", 1)[1].split(":")[0]
    port = int(server.base_url.rsplit(":", 1)[1])

    async def retry(fn: Callable[[], Any]) -> httpx.Response:
        # A keep-alive connection the server closes just as it is reused fails with a
        # transport error; one retry on a fresh connection (a spare session is harmless).
        try:
            response: httpx.Response = await fn()
        except httpx.TransportError:
            response = await fn()
        return response

    async def create(_: int) -> _Session:
        resp = await retry(lambda: client.post(f"{server.base_url}/v1/sessions", json={}))
        if resp.status_code != 201:
            raise RuntimeError(f"POST /v1/sessions -> {resp.status_code}: {resp.text[:200]}")
        body = resp.json()
        url = str(body["streamUrl"])
        path = "/" + url.split("//", 1)[1].split("/", 1)[1] if "//" in url else url
        head = await retry(lambda: client.head(f"{server.base_url}{path}"))
        if head.status_code != 200:
            raise RuntimeError(f"HEAD {path} -> {head.status_code}")
        session = _Session(str(body["id"]), path)
        session.reader = _SessionReader(host, port, path, head.headers["Stream-Next-Offset"])
        return session

    sessions: list[_Session] = await _gather_limited(32, list(range(n)), create)
    for i, session in enumerate(sessions):
        assert session.reader is not None
        session.task = asyncio.create_task(session.reader.run())
        if i % 100 == 99:
            await asyncio.sleep(0)
    await asyncio.wait_for(
        asyncio.gather(*(s.reader.opened.wait() for s in sessions if s.reader)), timeout=60
    )
    return sessions


async def _post_message(
    client: httpx.AsyncClient, server: Server, session_id: str, text: str
) -> httpx.Response:
    """Send a message as a careful client does: with a `client_message_id`, so the one retry
    after a transport error (a keep-alive connection the server closed just as it was reused)
    can never send it twice."""
    url = f"{server.base_url}/v1/sessions/{session_id}/messages"
    body = {"content": text, "client_message_id": uuid.uuid4().hex}
    try:
        return await client.post(url, json=body)
    except httpx.TransportError:
        return await client.post(url, json=body)


async def _send(client: httpx.AsyncClient, server: Server, session: _Session, text: str) -> None:
    session.post_started = time.perf_counter()
    try:
        resp = await _post_message(client, server, session.id, text)
        session.post_status = resp.status_code
        if resp.status_code != 202:
            session.post_error = f"{resp.status_code}: {resp.text[:160]}"
    except httpx.HTTPError as exc:
        session.post_error = repr(exc)


async def _close(sessions: list[_Session]) -> None:
    tasks = [s.task for s in sessions if s.task]
    for session in sessions:
        if session.reader:
            session.reader.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _run_error_text(event: dict[str, Any]) -> str:
    """A RUN_ERROR event as `code: message` (its `error` object), short enough to summarize."""
    error = event.get("error")
    if isinstance(error, dict):
        return f"{error.get('code')}: {error.get('message')}"[:200]
    return str(event)[:200]


def _errors(sessions: list[_Session]) -> list[str]:
    errors = []
    for s in sessions:
        if s.post_error:
            errors.append(f"POST message {s.post_error}")
        elif s.reader and s.reader.run_error:
            errors.append(f"RUN_ERROR {s.reader.run_error}")
        elif s.reader and s.reader.error:
            errors.append(f"reader {s.reader.error}")
    return errors


def _summarize_errors(errors: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for error in errors:
        counts[error[:120]] = counts.get(error[:120], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:5])


def _client(n: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(64, n), max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=30.0, limits=limits)


# --- ttft -----------------------------------------------------------------------------------


def _direct_params() -> dict[str, Any]:
    """What the service sends upstream for a first message to the default model."""
    from streams_service.llm.tools import tool_specs
    from streams_service.sessions.runner import SYSTEM_PROMPT

    return {
        "model": MODEL,
        "max_tokens": MAX_OUTPUT_TOKENS,
        "system": SYSTEM_PROMPT,
        "tools": tool_specs(),
        "thinking": {"type": "adaptive"},
        "messages": [{"role": "user", "content": f"hi [[tokens:{TTFT_TOKENS}]]"}],
    }


async def _direct_round(
    sim_url: str, n: int, params: dict[str, Any]
) -> tuple[list[float], list[str]]:
    import anthropic

    client = anthropic.AsyncAnthropic(base_url=sim_url, api_key=API_KEY, max_retries=0)

    async def one(_: int) -> float | str:
        t0 = time.perf_counter()
        try:
            async with client.messages.stream(**params) as stream:
                async for _text in stream.text_stream:
                    ttft = (time.perf_counter() - t0) * 1000
                    break
                else:
                    return "stream ended without text"
                async for _text in stream.text_stream:
                    pass  # drain, as the service does
            return ttft
        except Exception as exc:  # any SDK failure is a finding, not a crash
            return f"{type(exc).__name__}: {exc}"[:200]

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout=60)
    finally:
        await client.close()
    return [r for r in results if isinstance(r, float)], [r for r in results if isinstance(r, str)]


async def _service_round(
    client: httpx.AsyncClient, server: Server, n: int
) -> tuple[list[float], list[str]]:
    sessions = await _open_sessions(client, server, n)
    try:
        text = f"hi [[tokens:{TTFT_TOKENS}]]"
        await asyncio.gather(*(_send(client, server, s, text) for s in sessions))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.reader.done.wait() for s in sessions if s.reader)), timeout=60
            )
        samples = [
            (s.reader.first_text_at - s.post_started) * 1000
            for s in sessions
            if s.reader and s.reader.first_text.is_set() and not s.post_error
        ]
        errors = _errors(sessions)
        errors += ["no text before the deadline"] * (n - len(samples) - len(errors))
        return samples, errors
    finally:
        await _close(sessions)


class _RunReader(_SessionReader):
    """A live reader that stays open across many generations of its session and notes, per
    run (generation id), when its first text arrived and when it ended."""

    def __init__(self, host: str, port: int, path: str, offset: str) -> None:
        super().__init__(host, port, path, offset)
        self.first_text_at_run: dict[str, float] = {}
        self.ended: dict[str, asyncio.Event] = {}
        self.run_errors: dict[str, str] = {}
        self._run: str | None = None

    def ended_event(self, run_id: str) -> asyncio.Event:
        return self.ended.setdefault(run_id, asyncio.Event())

    def _on_records(self, records: Any, now_ms: float, now_perf: float) -> None:
        for record in records if isinstance(records, list) else []:
            value = record.get("value") if isinstance(record, dict) else None
            if record.get("type") != "chunk" or not isinstance(value, dict):
                continue
            try:
                event = json.loads(value.get("chunk", ""))
            except ValueError:
                continue
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "RUN_STARTED":
                self._run = str(event.get("runId"))
            elif kind == "TEXT_MESSAGE_CONTENT" and self._run is not None:
                self.first_text_at_run.setdefault(self._run, now_perf)
            elif kind in ("RUN_FINISHED", "RUN_ERROR") and isinstance(event.get("runId"), str):
                if kind == "RUN_ERROR":
                    self.run_errors[event["runId"]] = _run_error_text(event)
                self.ended_event(event["runId"]).set()


async def _direct_loop(
    sim_url: str, n: int, params: dict[str, Any], seconds: float
) -> tuple[list[float], list[str]]:
    """n concurrent callers, each asking again a moment after its answer ends, for `seconds`."""
    import anthropic

    client = anthropic.AsyncAnthropic(base_url=sim_url, api_key=API_KEY, max_retries=0)
    samples: list[float] = []
    errors: list[str] = []
    end = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        rng = random.Random(i)
        await asyncio.sleep(rng.uniform(0, TTFT_THINK_S[1]))  # arrivals spread from the start
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            ttft: float | None = None
            try:
                async with client.messages.stream(**params) as stream:
                    async for _text in stream.text_stream:
                        if ttft is None:
                            ttft = (time.perf_counter() - t0) * 1000
                if ttft is None:
                    errors.append("stream ended without text")
                else:
                    samples.append(ttft)
            except Exception as exc:  # any SDK failure is a finding, not a crash
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(rng.uniform(*TTFT_THINK_S))

    try:
        await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(n))), seconds + 60)
    finally:
        await client.close()
    return samples, errors


async def _service_loop(
    client: httpx.AsyncClient, server: Server, n: int, seconds: float
) -> tuple[list[float], list[str]]:
    """The same closed loop through the service: n sessions, each with one live reader that
    stays open; TTFT is the reader's first text of the run minus the POST's start."""
    host = server.base_url.split("//", 1)[1].split(":")[0]
    port = int(server.base_url.rsplit(":", 1)[1])
    opened = await _open_sessions(client, server, n)
    sessions: list[tuple[_Session, _RunReader]] = []
    for s in opened:  # swap each one-shot reader for a long-lived one at the same offset
        assert s.reader is not None
        s.reader.close()
        if s.task is not None:
            s.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await s.task
        reader = _RunReader(host, port, s.stream_path, s.reader.offset)
        s.reader, s.task = reader, asyncio.create_task(reader.run())
        sessions.append((s, reader))
    await asyncio.wait_for(asyncio.gather(*(r.opened.wait() for _, r in sessions)), 60)
    samples: list[float] = []
    errors: list[str] = []
    end = time.perf_counter() + seconds
    text = f"hi [[tokens:{TTFT_TOKENS}]]"

    async def user(i: int, session: _Session, reader: _RunReader) -> None:
        rng = random.Random(i)
        await asyncio.sleep(rng.uniform(0, TTFT_THINK_S[1]))
        while time.perf_counter() < end and reader.error is None:
            t0 = time.perf_counter()
            try:
                resp = await _post_message(client, server, session.id, text)
            except httpx.HTTPError as exc:
                errors.append(f"POST message {exc!r}"[:200])
                break
            if resp.status_code != 202:
                errors.append(f"POST message {resp.status_code}: {resp.text[:160]}")
                break
            run = str(resp.json()["generation_id"])
            try:
                await asyncio.wait_for(reader.ended_event(run).wait(), 30)
            except TimeoutError:
                errors.append("run not finished within 30 s")
                break
            if run in reader.run_errors:
                errors.append(f"RUN_ERROR {reader.run_errors[run]}")
            elif run in reader.first_text_at_run:
                samples.append((reader.first_text_at_run[run] - t0) * 1000)
            else:
                errors.append("run ended without text")
            await asyncio.sleep(rng.uniform(*TTFT_THINK_S))
        if reader.error is not None:
            errors.append(f"reader {reader.error}")

    try:
        await asyncio.gather(*(user(i, s, r) for i, (s, r) in enumerate(sessions)))
    finally:
        await _close([s for s, _ in sessions])
    return samples, errors


async def _guarded(what: str, round_: Callable[[], Any], errors: list[str]) -> list[float]:
    """Run one round; a failure is recorded as an error of this round, not the scenario's end."""
    try:
        with quiet_collector():  # the same for both paths: the client's pauses are not theirs
            samples, errs = await round_()
    except Exception as exc:
        errors.append(f"{what}: round failed: {type(exc).__name__}: {exc}"[:200])
        return []
    errors += [f"{what}: {e}" for e in errs]
    return list(samples)


async def _ttft(server: Server, sim: _Simulator) -> Result:
    params = _direct_params()
    direct: list[float] = []
    service: list[float] = []
    errors: list[str] = []
    async with _client(TTFT_CONCURRENCY) as client:
        # A small warm-up round of each (connection pools, first calls), not measured.
        warmup: list[str] = []
        await _guarded("direct", lambda: _direct_round(sim.base_url, 10, params), warmup)
        await _guarded("service", lambda: _service_round(client, server, 10), warmup)
        await asyncio.sleep(1.0)  # let the title calls after first exchanges finish
        for _ in range(TTFT_ROUNDS):
            direct += await _guarded(
                "direct", lambda: _direct_round(sim.base_url, TTFT_CONCURRENCY, params), errors
            )
            await asyncio.sleep(0.5)
            service += await _guarded(
                "service", lambda: _service_round(client, server, TTFT_CONCURRENCY), errors
            )
            await asyncio.sleep(1.0)
        # The steady run: the same 50 sessions' worth of load, arriving as people do.
        steady_direct = await _guarded(
            "direct steady",
            lambda: _direct_loop(sim.base_url, TTFT_CONCURRENCY, params, TTFT_LOOP_S),
            errors,
        )
        await asyncio.sleep(1.0)
        steady_service = await _guarded(
            "service steady",
            lambda: _service_loop(client, server, TTFT_CONCURRENCY, TTFT_LOOP_S),
            errors,
        )
    d, s = percentiles(direct), percentiles(service)
    burst_overhead = {p: round(s[p] - d[p], 3) for p in ("p50", "p90", "p99") if p in d and p in s}
    sd, ss = percentiles(steady_direct), percentiles(steady_service)
    overhead = {p: round(ss[p] - sd[p], 3) for p in ("p50", "p90", "p99") if p in sd and p in ss}
    return {
        "concurrency": TTFT_CONCURRENCY,
        "steady_seconds": TTFT_LOOP_S,
        "think_s": list(TTFT_THINK_S),
        "steady_direct_ttft_ms": sd,
        "steady_service_ttft_ms": ss,
        "steady_direct_samples": len(steady_direct),
        "steady_service_samples": len(steady_service),
        "burst_overhead_ms": burst_overhead,
        "rounds": TTFT_ROUNDS,
        "simulator": {"ttft_ms": TTFT_SIM_TTFT_MS, "tokens_per_s": TTFT_SIM_TOKENS_PER_S},
        "direct_params": {k: v for k, v in params.items() if k not in ("system", "tools")}
        | {"system": "service SYSTEM_PROMPT", "tools": f"{len(params['tools'])} service tools"},
        "direct_ttft_ms": d,
        "service_ttft_ms": s,
        "direct_samples": len(direct),
        "service_samples": len(service),
        "overhead_ms": overhead,
        "targets_ms": {"p50": TTFT_TARGET_P50_MS, "p99": TTFT_TARGET_P99_MS},
        "errors": len(errors),
        "error_kinds": _summarize_errors(errors),
        "warmup_errors": _summarize_errors(warmup),
        "ok": not errors and bool(steady_direct) and bool(steady_service),
    }


def ttft(workdir: Path, cfg: Config) -> Result:
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(_simulator(workdir, TTFT_SIM_TTFT_MS, TTFT_SIM_TOKENS_PER_S))
        server = stack.enter_context(
            _ours(workdir, ANTHROPIC_API_KEY=API_KEY, ANTHROPIC_BASE_URL=sim.base_url)
        )
        try:
            return asyncio.run(_ttft(server, sim))
        except Exception:
            return {
                "error": traceback.format_exc(limit=3),
                "server_log_tail": server.log_tail(),
                "simulator_log_tail": sim.log_tail(),
            }


# --- scale ----------------------------------------------------------------------------------


class _RssPeak:
    """Samples the server's RSS in a thread (reading /proc must not stall the event loop)."""

    def __init__(self, server: Server, interval: float = 0.5) -> None:
        self.server, self.interval = server, interval
        self.peak = server.rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.server.rss_bytes())

    def __enter__(self) -> _RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, self.server.rss_bytes())


async def _wait_for_runs(sessions: list[_Session], timeout: float) -> None:
    """Until every accepted run has ended on its reader, or `timeout` seconds."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(
                *(s.reader.done.wait() for s in sessions if s.reader and not s.post_error)
            ),
            timeout=timeout,
        )


def _unfinished(sessions: list[_Session]) -> list[str]:
    """One error per accepted run whose reader is still waiting for its end."""
    return [
        "run not finished within the step's time limit"
        for s in sessions
        if s.reader and not s.post_error and not s.reader.error and not s.reader.done.is_set()
    ]


async def _scale_step(server: Server, n: int) -> Result:
    async with _client(n) as client:
        t0 = time.perf_counter()
        sessions = await _open_sessions(client, server, n)
        setup_s = time.perf_counter() - t0
        try:
            cpu0 = server.cpu_seconds()
            with quiet_collector(), _RssPeak(server) as rss:
                t1 = time.perf_counter()
                text = f"go [[tokens:{SCALE_TOKENS}]] [[clock]]"
                await _gather_limited(100, sessions, lambda s: _send(client, server, s, text))
                post_s = time.perf_counter() - t1
                remaining = max(1.0, SCALE_STEP_TIMEOUT_S - (time.perf_counter() - t1))
                await _wait_for_runs(sessions, remaining)
                run_s = time.perf_counter() - t1
            cpu_s = server.cpu_seconds() - cpu0
            lags = [lag for s in sessions if s.reader for _, lag in s.reader.source_lags]
            service_lags = [lag for s in sessions if s.reader for _, lag in s.reader.stamped_lags]
            errors = _errors(sessions) + _unfinished(sessions)
            return {
                "sessions": n,
                "setup_s": round(setup_s, 2),
                "post_s": round(post_s, 2),
                "run_s": round(run_s, 2),
                "accepted_202": sum(1 for s in sessions if s.post_status == 202),
                "finished": sum(
                    1
                    for s in sessions
                    if s.reader and s.reader.done.is_set() and not s.reader.error
                ),
                "text_deltas": len(lags),
                "lag_ms": percentiles(lags),
                "service_lag_ms": percentiles(service_lags),
                "rss_peak_mb": round(rss.peak / MB, 1),
                "server_cpu_cores": round(cpu_s / max(run_s, 1e-9), 2),
                "errors": len(errors),
                "error_kinds": _summarize_errors(errors),
            }
        finally:
            await _close(sessions)


async def _scale_steady_step(server: Server, n: int) -> Result:
    """N generations started at SCALE_STEADY_STARTS_PER_S, each long enough to outlast the last
    start by the window; delivery lag of the text events stamped inside the window, when all N
    are generating at once."""
    ramp_s = n / SCALE_STEADY_STARTS_PER_S
    tokens = int(SCALE_SIM_TOKENS_PER_S * (ramp_s + SCALE_STEADY_LEAD_S + SCALE_STEADY_WINDOW_S))
    async with _client(n) as client:
        sessions = await _open_sessions(client, server, n)
        try:
            text = f"go [[tokens:{tokens}]] [[clock]]"
            cpu0 = server.cpu_seconds()
            with quiet_collector(), _RssPeak(server) as rss:
                t0 = time.perf_counter()

                async def start(i: int, session: _Session) -> None:
                    await asyncio.sleep(i / SCALE_STEADY_STARTS_PER_S)
                    await _send(client, server, session, text)

                await asyncio.gather(*(start(i, s) for i, s in enumerate(sessions)))
                await _wait_for_runs(
                    sessions, ramp_s + SCALE_STEADY_LEAD_S + SCALE_STEADY_WINDOW_S + 60
                )
                run_s = time.perf_counter() - t0
            cpu_s = server.cpu_seconds() - cpu0
            sent = [s.reader.source_lags for s in sessions if s.reader]
            errors = _errors(sessions)
            if any(not lags for lags in sent) or len(sent) < n:
                errors.append("a session produced no text")
                window: tuple[float, float] | None = None
                lags: list[float] = []
                service_lags: list[float] = []
            else:
                # All N generate from the last first-token to the first last-token.
                start_ms = max(lags[0][0] for lags in sent)
                end_ms = min(start_ms + SCALE_STEADY_WINDOW_S * 1000, min(x[-1][0] for x in sent))
                window = (start_ms, end_ms)
                lags = [lag for x in sent for ts, lag in x if start_ms <= ts <= end_ms]
                service_lags = [
                    lag
                    for s in sessions
                    if s.reader
                    for ts, lag in s.reader.stamped_lags
                    if start_ms <= ts <= end_ms
                ]
            errors += _unfinished(sessions)
            return {
                "sessions": n,
                "tokens_per_answer": tokens,
                "ramp_s": round(ramp_s, 1),
                "window_s": round((window[1] - window[0]) / 1000, 2) if window else 0.0,
                "run_s": round(run_s, 2),
                "text_deltas": len(lags),
                "lag_ms": percentiles(lags),
                "service_lag_ms": percentiles(service_lags),
                "rss_peak_mb": round(rss.peak / MB, 1),
                "server_cpu_cores": round(cpu_s / max(run_s, 1e-9), 2),
                "errors": len(errors),
                "error_kinds": _summarize_errors(errors),
            }
        finally:
            await _close(sessions)


async def _steady_steps(server: Server) -> Result:
    steps: list[Result] = []
    reached = 0
    stopped = None
    for n in SCALE_STEPS:
        print(f"  scale steady: {n} sessions ...", flush=True)
        step = await _scale_steady_step(server, n)
        steps.append(step)
        lag = step["lag_ms"]
        print(
            f"  scale steady: {n} sessions: lag p50 {lag.get('p50')} ms p99 {lag.get('p99')} ms "
            f"over {step['window_s']} s, {step['errors']} errors, RSS peak "
            f"{step['rss_peak_mb']} MB, server CPU {step['server_cpu_cores']} cores",
            flush=True,
        )
        if step["errors"]:
            stopped = f"{step['errors']} errors at {n} sessions"
            break
        if step["window_s"] < SCALE_STEADY_WINDOW_S / 2 or not lag:
            stopped = f"all {n} never generated together for {SCALE_STEADY_WINDOW_S / 2:g} s"
            break
        if lag.get("p99", 0) > SCALE_TARGET_LAG_P99_MS:
            stopped = f"lag p99 {lag['p99']} ms > {SCALE_TARGET_LAG_P99_MS:g} ms at {n}"
            break
        reached = n
        await asyncio.sleep(2.0)
    return {
        "steps": steps,
        "max_sessions": reached,
        "lag_ms": next((s["lag_ms"] for s in reversed(steps) if s["sessions"] == reached), {}),
        "rss_peak_mb": max(s["rss_peak_mb"] for s in steps),
        "errors": sum(s["errors"] for s in steps),
        "stopped_early": stopped,
        "starts_per_s": SCALE_STEADY_STARTS_PER_S,
        "window_s": SCALE_STEADY_WINDOW_S,
    }


async def _scale(server: Server) -> Result:
    steps: list[Result] = []
    stopped_early = None
    rss_start = server.rss_bytes()
    for n in SCALE_STEPS:
        print(f"  scale: {n} sessions ...", flush=True)
        step = await _scale_step(server, n)
        steps.append(step)
        lag = step["lag_ms"]
        print(
            f"  scale: {n} sessions: lag p50 {lag.get('p50')} ms p99 {lag.get('p99')} ms, "
            f"{step['errors']} errors, RSS peak {step['rss_peak_mb']} MB, "
            f"server CPU {step['server_cpu_cores']} cores",
            flush=True,
        )
        if step["errors"]:
            stopped_early = f"{step['errors']} errors at {n} sessions"
            break
        if lag.get("p99", 0) > SCALE_TARGET_LAG_P99_MS:
            stopped_early = f"lag p99 {lag['p99']} ms > {SCALE_TARGET_LAG_P99_MS:g} ms at {n}"
            break
        await asyncio.sleep(2.0)  # let title calls and writes from this step settle
    last = steps[-1]
    await asyncio.sleep(2.0)
    steady = await _steady_steps(server)
    return {
        "steady": steady,
        "steps": steps,
        "max_sessions": last["sessions"],
        "lag_ms": last["lag_ms"],
        "rss_peak_mb": max(s["rss_peak_mb"] for s in steps),
        "rss_start_mb": round(rss_start / MB, 1),
        "errors": sum(s["errors"] for s in steps),
        "stopped_early": stopped_early,
        "simulator": {"ttft_ms": SCALE_SIM_TTFT_MS, "tokens_per_s": SCALE_SIM_TOKENS_PER_S},
        "tokens_per_answer": SCALE_TOKENS,
        "targets": {
            "sessions": SCALE_STEPS[-1],
            "lag_p99_ms": SCALE_TARGET_LAG_P99_MS,
            "rss_mb": SCALE_TARGET_RSS_MB,
        },
        "ok": all(s["errors"] == 0 for s in steps) and steady["errors"] == 0,
    }


def scale(workdir: Path, cfg: Config) -> Result:
    # Claude is a separate process, as in production: the simulator's own work (25,000 SSE
    # events a second at 500 sessions) must not be charged to the service's event loop.
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(_simulator(workdir, SCALE_SIM_TTFT_MS, SCALE_SIM_TOKENS_PER_S))
        server = stack.enter_context(
            _ours(workdir, ANTHROPIC_API_KEY=API_KEY, ANTHROPIC_BASE_URL=sim.base_url)
        )
        try:
            return asyncio.run(_scale(server))
        except Exception:
            return {
                "error": traceback.format_exc(limit=3),
                "server_log_tail": server.log_tail(),
                "simulator_log_tail": sim.log_tail(),
            }


RUNNERS: dict[str, Callable[[Path, Config], Result]] = {"ttft": ttft, "scale": scale}

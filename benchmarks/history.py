"""History scenario (ours only): a big history on Postgres, then list/search/usage latency.

`seed()` fills a fresh, migrated Postgres database with 1,000 users, 100,000 sessions,
1,000,000 messages and one generation row per assistant message (models, tokens and costs from
the price catalog), spread over the last 90 days — fast: COPY through psycopg, with the
secondary indexes dropped during the load and rebuilt after it, exactly as the migrations
defined them. `BENCH_HISTORY_SCALE` (or `--history-scale`) scales every count (0.01 = 1/100).

Then, through the HTTP API of a real `chatops serve` process (dev mode, so the caller is the
local admin and may ask for any user's sessions), one request at a time:

- list: the first page (50) of one user's sessions, and of everyone's (`user=all`), and
  pages further down (`cursor`);
- search: `q=<word>` for words that occur in message bodies (domain words, not stop words),
  in one user's sessions and in everyone's; the most frequent words are reported apart;
- usage: `GET /v1/usage?from=<90 days ago>&to=<now>&group_by=day,model`, when the route exists,
  once the server's sweeper has rolled up the hours the load marked (see benchmarks/usage.py).

Targets (issue 4): list p95 ≤ 20 ms, search p95 ≤ 100 ms, 90-day usage by day and model ≤ 300 ms.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg

from benchmarks import servers
from benchmarks.loadgen import percentiles
from benchmarks.scenarios import Config
from benchmarks.servers import Server
from benchmarks.usage import wait_for_rollup

SCENARIOS = ("history",)
Result = dict[str, Any]

SCALE_ENV = "BENCH_HISTORY_SCALE"
USERS, SESSIONS, MESSAGES = 1_000, 100_000, 1_000_000
DAYS = 90
TARGET_LIST_P95_MS = 20.0
TARGET_SEARCH_P95_MS = 100.0
TARGET_USAGE_MS = 300.0
LIST_SAMPLES, SEARCH_SAMPLES, USAGE_SAMPLES, WARMUP = 300, 200, 20, 30
# (model, share of sessions): the default model most, then the cheap one, then the big one.
MODEL_MIX = (
    ("claude-sonnet-5-5", 0.55),
    ("claude-haiku-5-5", 0.25),
    ("claude-opus-5-5", 0.12),
    ("claude-sonnet-4-6", 0.08),
)
TAIL_TERMS = 20_000
TABLES = ("users", "chat_sessions", "chat_messages", "generations")
GENERATION_COLUMNS = (
    *("id", "session_id", "user_id", "user_message_id", "message_id", "model", "simulated"),
    *("status", "finish_reason", "error_code", "error_message", "input_tokens"),
    *("output_tokens", "cache_read_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens"),
    *("cost_usd", "reserved_usd", "upstream_calls", "ttft_ms", "duration_ms", "started_at"),
    "finished_at",
)


def _split(text: str) -> list[str]:
    return text.split()


# English text with a Zipf-like word frequency: function words are the most common (Postgres'
# 'english' configuration drops them, as a search box would), then work vocabulary.
STOP_WORDS = _split(
    "the of and to a in is it you that for on with as this are be or at by from we can "
    "if not have will your but an was all so there they what about which when would do "
    "more how then should into than just also use like need here some out our one it's "
    "make sure each other these two only new first because them its most may any up"
)
WORK_WORDS = _split(
    "deploy deployment service server cluster kubernetes docker container image registry "
    "pipeline build release version branch merge commit review test tests coverage lint "
    "python typescript javascript golang rust java sql postgres redis kafka queue worker "
    "cron schedule latency throughput memory cpu disk network timeout retry backoff error "
    "exception stack trace log logs metric metrics dashboard alert incident outage pager "
    "oncall runbook postmortem customer invoice billing payment refund subscription plan "
    "pricing contract renewal churn revenue forecast budget quarter roadmap milestone "
    "feature request bug ticket sprint estimate priority backlog design document spec "
    "proposal meeting agenda notes summary decision owner deadline launch marketing "
    "campaign email newsletter audience segment conversion funnel signup onboarding "
    "trial retention survey feedback interview persona research analysis report chart "
    "table column row query index schema migration backup restore replica failover "
    "security vulnerability patch credential secret token rotation audit compliance gdpr "
    "soc2 policy access permission role admin user account password login session cookie "
    "browser mobile android ios api endpoint webhook integration slack jira github "
    "terraform ansible helm nginx cdn cache dns certificate tls domain region zone cost "
    "spend savings reserved instance autoscaling capacity load benchmark profile optimize "
    "refactor cleanup deprecate rewrite prototype experiment hypothesis result metric "
    "dataset model training inference embedding vector prompt evaluation accuracy "
    "precision recall regression classification cluster pandas notebook spreadsheet "
    "excel formula pivot translate translation spanish german french japanese contract "
    "legal vendor procurement hiring candidate interview offer onboarding payroll "
    "expense travel reimbursement office laptop monitor keyboard license renewal"
)


@dataclass
class SeedStats:
    users: int
    sessions: int
    messages: int
    generations: int
    seconds: float
    load_seconds: float
    index_seconds: float
    database_mb: float


def scale_from_env() -> float:
    raw = os.environ.get(SCALE_ENV, "1")
    try:
        scale = float(raw)
    except ValueError:
        raise SystemExit(f"{SCALE_ENV} must be a number, got {raw!r}") from None
    if not 0 < scale <= 1:
        raise SystemExit(f"{SCALE_ENV} must be in (0, 1], got {raw!r}")
    return scale


# --- Seeding --------------------------------------------------------------------------------


class _Words:
    """Word sampling with Zipf weights, in bulk (numpy), for speed.

    Besides plain English and work vocabulary, about a third of the messages name something
    specific (a project, customer, error code...): terms from a long tail of TAIL_TERMS
    made-up words, most of them rare — what people usually search for."""

    def __init__(self, rng: np.random.Generator) -> None:
        work = list(WORK_WORDS)
        rng.shuffle(work)  # which work words are common is arbitrary
        self.vocab = np.array(STOP_WORDS + work, dtype=object)
        self.cdf = _zipf_cdf(len(self.vocab), 1.05)
        self.tail = np.array(_made_up_terms(TAIL_TERMS), dtype=object)
        self.tail_cdf = _zipf_cdf(len(self.tail), 1.0)
        self.rng = rng
        self.work_by_frequency = work  # most frequent first

    def _pick(self, cdf: Any, count: int) -> Any:
        return np.minimum(np.searchsorted(cdf, self.rng.random(count)), len(cdf) - 1)

    def text(self, count: int) -> str:
        words = list(self.vocab[self._pick(self.cdf, count)])
        if self.rng.random() < 0.35:
            for term in self.tail[self._pick(self.tail_cdf, int(self.rng.integers(1, 3)))]:
                words.insert(int(self.rng.integers(0, len(words) + 1)), term)
        return str(" ".join(words)).capitalize() + "."

    def tail_terms(self, count: int) -> list[str]:
        """Specific terms as they occur in the text (frequent ones more often)."""
        return [str(t) for t in self.tail[self._pick(self.tail_cdf, count)]]

    def title(self) -> str:
        picks = self.rng.integers(0, len(WORK_WORDS), int(self.rng.integers(2, 6)))
        return " ".join(WORK_WORDS[int(i)] for i in picks).capitalize()


def _zipf_cdf(n: int, exponent: float) -> Any:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return np.cumsum(weights / weights.sum())


def _made_up_terms(count: int) -> list[str]:
    """Distinct pronounceable made-up words (deterministic): kalomira, vetrusan, ..."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    rnd = random.Random(99)
    terms: set[str] = set()
    while len(terms) < count:
        terms.add("".join(rnd.choice(syllables) for _ in range(3)) + rnd.choice("nrsx"))
    return sorted(terms, key=lambda t: rnd.random())


def _uuid(rnd: random.Random) -> str:
    return str(uuid.UUID(int=rnd.getrandbits(128), version=4))


def _secondary_indexes(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """(name, definition) of the indexes of TABLES not backing a constraint."""
    rows = conn.execute(
        """
        SELECT c.relname, pg_get_indexdef(i.indexrelid)
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_class t ON t.oid = i.indrelid
        WHERE t.relname = ANY(%s)
          AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
        """,
        (list(TABLES),),
    ).fetchall()
    return [(str(name), str(ddl)) for name, ddl in rows]


def seed(database_url: str, scale: float = 1.0, rng_seed: int = 4) -> SeedStats:
    """Fill a fresh, migrated database (see the module doc). Returns counts and timings."""
    from streams_service.llm.models import Usage, cost_usd, load_catalog, round_usd

    t0 = time.perf_counter()
    catalog = load_catalog()
    models = [(catalog.get(m), share) for m, share in MODEL_MIX]
    mix = [(m, share) for m, share in models if m is not None]
    rnd = random.Random(rng_seed)
    words = _Words(np.random.default_rng(rng_seed))
    n_users = max(10, round(USERS * scale))
    n_sessions = max(20, round(SESSIONS * scale))
    n_messages = max(2 * n_sessions, round(MESSAGES * scale))
    now = datetime.now(UTC)
    start = now - timedelta(days=DAYS)
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        # Bulk load: no per-row foreign-key triggers (the data is consistent by construction).
        conn.execute("SET session_replication_role = replica")
        indexes = _secondary_indexes(conn)
        for name, _ddl in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        user_ids = [f"user-{i:05d}" for i in range(n_users)]
        with (
            conn.cursor() as cur,
            cur.copy("COPY users (id, email, name, role, disabled, created_at) FROM STDIN") as copy,
        ):
            for i, uid in enumerate(user_ids):
                role = "admin" if i % 200 == 0 else "ops" if i % 50 == 1 else "member"
                copy.write_row(
                    (uid, f"{uid}@example.com", f"User {i}", role, False, start - timedelta(days=1))
                )
        # Some people chat far more than others.
        user_weights = [1.0 / (i + 1) ** 0.6 for i in range(n_users)]
        # Messages per session: pairs (user, assistant), about ten messages on average.
        pairs = [1 + min(int(rnd.expovariate(1 / 4)), 29) for _ in range(n_sessions)]
        total = sum(pairs) * 2
        while total != n_messages:
            i = rnd.randrange(n_sessions)
            if total < n_messages and pairs[i] < 60:
                pairs[i] += 1
                total += 2
            elif total > n_messages and pairs[i] > 1:
                pairs[i] -= 1
                total -= 2
            if abs(total - n_messages) == 1:
                break  # an odd target: one message fewer
        generations = 0
        t_load = time.perf_counter()
        # One COPY per connection (a connection runs one COPY at a time); three loads at once.
        with contextlib.ExitStack() as stack:
            cursors = []
            for _ in range(3):
                extra = stack.enter_context(psycopg.connect(url, autocommit=True))
                extra.execute("SET session_replication_role = replica")
                cursors.append(stack.enter_context(extra.cursor()))
            s_cur, m_cur, g_cur = cursors
            with (
                s_cur.copy(
                    "COPY chat_sessions (id, user_id, title, model, message_count, cost_usd, "
                    "reserved_usd, budget_usd, created_at, updated_at, ended_at, deleted_at) "
                    "FROM STDIN"
                ) as s_copy,
                m_cur.copy(
                    "COPY chat_messages (session_id, id, ordinal, role, content, parts, status, "
                    "generation_id, created_at) FROM STDIN"
                ) as m_copy,
                g_cur.copy(
                    f"COPY generations ({', '.join(GENERATION_COLUMNS)}) FROM STDIN"
                ) as g_copy,
            ):
                owners = rnd.choices(user_ids, weights=user_weights, k=n_sessions)
                # In creation order, as a real history is written (rows lie in time order).
                starts = sorted(rnd.random() * DAYS * 86400 for _ in range(n_sessions))
                for s_index in range(n_sessions):
                    sid = _uuid(rnd)
                    model = rnd.choices([m for m, _ in mix], weights=[w for _, w in mix])[0]
                    created = start + timedelta(seconds=starts[s_index])
                    at = created
                    session_cost = Decimal(0)
                    context = 0
                    for turn in range(pairs[s_index]):
                        user_mid, answer_mid = f"msg_{_uuid(rnd)[:32]}", f"msg_{_uuid(rnd)[:32]}"
                        gid = _uuid(rnd)
                        question = words.text(5 + int(rnd.expovariate(1 / 18)))
                        answer = words.text(20 + int(rnd.expovariate(1 / 110)))
                        at += timedelta(seconds=5 + rnd.random() * 300)
                        asked = at
                        output = max(20, int(len(answer) / 4 * (1 + rnd.random())))
                        context += len(question) // 4
                        usage = Usage(
                            input_tokens=300 + len(question) // 4,
                            output_tokens=output,
                            cache_read_tokens=context if turn else 0,
                            cache_write_5m_tokens=len(question) // 4 + (1500 if turn == 0 else 0),
                        )
                        cost = round_usd(cost_usd(model, usage))
                        session_cost += cost
                        ttft = int(250 + rnd.expovariate(1 / 400))
                        duration = ttft + int(output / (40 + rnd.random() * 60) * 1000)
                        at += timedelta(milliseconds=duration)
                        failed = rnd.random() < 0.02
                        context += output
                        m_copy.write_row(
                            (sid, user_mid, 2 * turn + 1, "user", question,
                             json.dumps([{"type": "text", "content": question}]),
                             "complete", gid, asked)
                        )  # fmt: skip
                        m_copy.write_row(
                            (sid, answer_mid, 2 * turn + 2, "assistant", answer,
                             json.dumps([{"type": "text", "content": answer}]),
                             "error" if failed else "complete", gid, at)
                        )  # fmt: skip
                        g_copy.write_row(
                            (gid, sid, owners[s_index], user_mid, answer_mid, model.id, False,
                             "error" if failed else "completed", None if failed else "stop",
                             "overloaded" if failed else None,
                             "Claude is overloaded; try again shortly." if failed else None,
                             usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
                             usage.cache_write_5m_tokens, 0, cost, 0, 1, ttft, duration,
                             asked, at)
                        )  # fmt: skip
                        generations += 1
                    age = now - at
                    ended = (
                        at + timedelta(hours=1)
                        if age > timedelta(days=1) and (rnd.random() < 0.4)
                        else None
                    )
                    deleted = at + timedelta(hours=2) if rnd.random() < 0.03 else None
                    s_copy.write_row(
                        (sid, owners[s_index], words.title(), model.id, pairs[s_index] * 2,
                         session_cost, 0, Decimal(5), created, min(at, now), ended,
                         min(deleted, now) if deleted else None)
                    )  # fmt: skip
        load_s = time.perf_counter() - t_load
        t_index = time.perf_counter()
        for _name, ddl in indexes:
            conn.execute(ddl)
        index_s = time.perf_counter() - t_index
        conn.execute("SET session_replication_role = DEFAULT")
        for table in TABLES:
            conn.execute(f"VACUUM ANALYZE {table}")
        # Write the load's dirty pages out now: otherwise the checkpoint that follows a bulk
        # load runs during the measurements and shows up as their tail.
        conn.execute("CHECKPOINT")
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return SeedStats(
        users=n_users,
        sessions=n_sessions,
        messages=sum(pairs) * 2,
        generations=generations,
        seconds=round(time.perf_counter() - t0, 1),
        load_seconds=round(load_s, 1),
        index_seconds=round(index_s, 1),
        database_mb=round((size[0] if size else 0) / 1e6, 1),
    )


# --- Measuring ------------------------------------------------------------------------------


def _p95(samples: list[float]) -> dict[str, float]:
    out = percentiles(samples)
    if samples:
        ordered = sorted(samples)
        out["p95"] = round(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)], 3)
    return out


def _timed(client: httpx.Client, url: str, params: dict[str, Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    response = client.get(url, params=params)
    elapsed = (time.perf_counter() - t0) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} {params} -> {response.status_code}: {response.text[:300]}")
    return elapsed, response.json()


def _sample(
    client: httpx.Client, url: str, make: Callable[[int], dict[str, Any]], count: int
) -> tuple[list[float], list[Any]]:
    for i in range(min(WARMUP, count)):
        _timed(client, url, make(-1 - i))
    times, bodies = [], []
    for i in range(count):
        elapsed, body = _timed(client, url, make(i))
        times.append(elapsed)
        bodies.append(body)
    return times, bodies


def measure(base_url: str, database_url: str, rng_seed: int = 11) -> Result:
    rnd = random.Random(rng_seed)
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        users = [
            str(r[0])
            for r in conn.execute(
                "SELECT user_id FROM chat_sessions GROUP BY user_id HAVING count(*) >= 5"
            )
        ]
    # The seed's own word lists: the 20 most frequent work words (each in 3-12% of messages)
    # apart from the rest of the work vocabulary, and specific terms as they occur.
    vocabulary = _Words(np.random.default_rng(4))
    classes = {
        "common": vocabulary.work_by_frequency[:20],
        "work": vocabulary.work_by_frequency[20:],
        "specific": vocabulary.tail_terms(2000),
    }
    sessions_url = f"{base_url}/v1/sessions"
    out: Result = {}
    with httpx.Client(timeout=30.0) as client:
        times, _ = _sample(
            client, sessions_url, lambda i: {"user": rnd.choice(users), "limit": 50}, LIST_SAMPLES
        )
        out["list_user_ms"] = _p95(times)
        times, _ = _sample(client, sessions_url, lambda i: {"user": "all"}, LIST_SAMPLES)
        out["list_all_ms"] = _p95(times)
        # Deeper pages: follow cursors from the first page of everyone's sessions.
        cursors: list[str] = []
        cursor = None
        for _ in range(20):
            _, body = _timed(
                client, sessions_url, {"user": "all", **({"cursor": cursor} if cursor else {})}
            )
            cursor = body["next_cursor"]
            if cursor is None:
                break
            cursors.append(cursor)
        times, _ = _sample(
            client,
            sessions_url,
            lambda i: {"user": "all", "cursor": rnd.choice(cursors)},
            LIST_SAMPLES,
        )
        out["list_deep_ms"] = _p95(times)
        for kind, pool in classes.items():
            for scope in ("user", "all"):

                def params(i: int, pool: list[str] = pool, scope: str = scope) -> dict[str, Any]:
                    who = rnd.choice(users) if scope == "user" else "all"
                    return {"q": rnd.choice(pool), "user": who}

                times, bodies = _sample(client, sessions_url, params, SEARCH_SAMPLES)
                out[f"search_{scope}_{kind}_ms"] = _p95(times)
                out[f"search_{scope}_{kind}_hits_mean"] = round(
                    sum(len(b["items"]) for b in bodies) / max(1, len(bodies)), 1
                )
        # The sweeper rolls up the hours the load marked in the background; a running service
        # has long caught up (one sweep interval behind at most), so the usage figures are
        # taken once it has. Usually it has already, during the list and search samples.
        out["usage_rollup_wait_s"] = wait_for_rollup(url)
        out["usage_ms"] = _usage(client, base_url)
    return out


def _usage(client: httpx.Client, base_url: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    params = {
        "from": (now - timedelta(days=DAYS)).isoformat(),
        "to": now.isoformat(),
        "group_by": "day,model",
    }
    probe = client.get(f"{base_url}/v1/usage", params=params)
    if probe.status_code == 404 and probe.json().get("error") == "not_found":
        return {"skipped": "GET /v1/usage does not exist yet"}
    if probe.status_code != 200:
        return {"skipped": f"GET /v1/usage -> {probe.status_code}: {probe.text[:200]}"}
    times, bodies = _sample(client, f"{base_url}/v1/usage", lambda i: params, USAGE_SAMPLES)
    body = bodies[-1]
    rows = body.get("rows", body.get("items", body)) if isinstance(body, dict) else body
    return {**_p95(times), "rows": len(rows) if isinstance(rows, list) else None}


# --- Runner ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _server(workdir: Path) -> Iterator[Server]:
    server = servers.start_ours(workdir)
    try:
        yield server
    finally:
        servers.stop(server)


def history(workdir: Path, cfg: Config) -> Result:
    scale = scale_from_env()
    with _server(workdir) as server:
        assert server.database is not None
        db_url = servers.database_url(server.database)
        try:
            print(f"  history: seeding at scale {scale:g} ...", flush=True)
            stats = seed(db_url, scale)
            print(
                f"  history: seeded {stats.sessions:,} sessions, {stats.messages:,} messages, "
                f"{stats.users:,} users in {stats.seconds} s ({stats.database_mb:,.0f} MB)",
                flush=True,
            )
            result: Result = {
                "scale": scale,
                "seed": asdict(stats),
                **measure(server.base_url, db_url),
            }
        except Exception:
            return {"error": traceback.format_exc(limit=4), "server_log_tail": server.log_tail()}
    usage = result["usage_ms"]
    result["targets_ms"] = {
        "list_p95": TARGET_LIST_P95_MS,
        "search_p95": TARGET_SEARCH_P95_MS,
        "usage_p95": TARGET_USAGE_MS,
    }
    result["ok"] = True
    result["usage_skipped"] = usage.get("skipped")
    return result


RUNNERS: dict[str, Callable[[Path, Config], Result]] = {"history": history}

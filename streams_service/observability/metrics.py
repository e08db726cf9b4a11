"""Prometheus metrics at `GET /metrics`, for ops, admins and the system token.

Each app has its own CollectorRegistry, never the global one (tests build many apps in one
process). Hot paths pay at most a counter increment: stream appends are already counted by the
writer, and live readers, running generations and pool use are read only when scraped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from streams_service.access.principal import Caller
from streams_service.errors import Forbidden
from streams_service.llm.models import Usage

if TYPE_CHECKING:
    from streams_service.durable.live import LiveHub
    from streams_service.durable.store import StreamStore
    from streams_service.sessions.generation import GenerationManager

TTFT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# How often the event loop's lag is sampled: cheap (one timer), often enough that a minute of
# scrapes holds a hundred samples.
LOOP_LAG_SAMPLE_S = 0.5

# The metrics of the app that started last in this process, for callers that are not handed
# one (the rate limiter's rejection hook). A process serves one app outside tests.
_active: Metrics | None = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "chatops_generation_ttft_seconds",
            "Time from the start of a generation to its first token, by model.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "chatops_generation_duration_seconds",
            "Duration of generations, by model.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "chatops_generations",
            "Generations finished, by model and status.",
            ["model", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "chatops_tokens", "Tokens used, by model and kind.", ["model", "kind"], registry=r
        )
        self.cost = Counter("chatops_cost_usd", "Cost in USD, by model.", ["model"], registry=r)
        self.rate_limited = Counter(
            "chatops_rate_limited",
            "Requests refused by a rate limit (429), by limit.",
            ["limit"],
            registry=r,
        )
        self.early_starts = Counter(
            "chatops_send_early_starts",
            "Sends that called Claude before reading the session, from what this process knew "
            "of its conversation (sessions/memo.py), by outcome: confirmed by the read, or "
            "abandoned before any token because the session had changed.",
            ["outcome"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "chatops_event_loop_lag_seconds",
            "How late the event loop ran a timer, sampled every 0.5 s. Every request, "
            "generation and live reader of the process shares this loop: sustained lag of "
            "tens of milliseconds means the process is CPU-bound, and every await waits that "
            "long again (time to first token, delivery).",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self._runtime: _RuntimeCollector | None = None

    # ------------------------------------------------------------------ lifecycle

    def watch(
        self,
        *,
        generations: GenerationManager,
        hub: LiveHub,
        store: StreamStore,
        pools: Mapping[str, AsyncEngine],
    ) -> None:
        """Report the running service's state at each scrape; this app's metrics become the
        process's active ones (for `observe_rate_limited`)."""
        global _active
        self.unwatch()
        self._runtime = _RuntimeCollector(generations, hub, store, dict(pools))
        self.registry.register(self._runtime)
        _active = self

    def unwatch(self) -> None:
        global _active
        if self._runtime is not None:
            self.registry.unregister(self._runtime)
            self._runtime = None
        if _active is self:
            _active = None

    async def sample_loop_lag(
        self,
        interval_s: float = LOOP_LAG_SAMPLE_S,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Runs until cancelled: sleeps `interval_s` and records how much later than that the
        loop woke it (the time callbacks ahead of it held the loop). `clock` is the loop's."""
        now = clock or asyncio.get_running_loop().time
        while True:
            asked = now() + interval_s
            await sleep(interval_s)
            self.loop_lag.observe(max(0.0, now() - asked))

    # ------------------------------------------------------------------ observations

    def observe_generation(
        self,
        *,
        model: str,
        status: str,
        ttft_ms: int | None,
        duration_s: float,
        usage: Usage,
        cost: Decimal,
    ) -> None:
        self.generations.labels(model, status).inc()
        if ttft_ms is not None:
            self.ttft.labels(model).observe(ttft_ms / 1000)
        self.duration.labels(model).observe(duration_s)
        self.observe_usage(model, usage, cost)

    def observe_usage(self, model: str, usage: Usage, cost: Decimal) -> None:
        counts = (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_5m_tokens,
            usage.cache_write_1h_tokens,
        )
        for kind, count in zip(TOKEN_KINDS, counts, strict=True):
            if count:
                self.tokens.labels(model, kind).inc(count)
        if cost:
            self.cost.labels(model).inc(float(cost))

    def observe_rate_limited(self, limit: str) -> None:
        self.rate_limited.labels(limit).inc()

    def observe_early_start(self, confirmed: bool) -> None:
        self.early_starts.labels("confirmed" if confirmed else "abandoned").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def observe_rate_limited(name: str) -> None:
    """A request was refused by the limit `name` (the rate limiter's `on_reject` hook)."""
    if _active is not None:
        _active.observe_rate_limited(name)


class _RuntimeCollector(Collector):
    """Gauges and counters read from the running service when scraped."""

    def __init__(
        self,
        generations: GenerationManager,
        hub: LiveHub,
        store: StreamStore,
        pools: dict[str, AsyncEngine],
    ) -> None:
        self.generations = generations
        self.hub = hub
        self.store = store
        self.pools = pools

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "chatops_active_generations",
            "Generations running in this process.",
            value=len(self.generations.running),
        )
        yield GaugeMetricFamily(
            "chatops_live_readers",
            "Long-poll and SSE readers waiting for new data in this process.",
            value=self.hub.live_readers,
        )
        try:
            counts: tuple[int, int] | None = (
                self.store.appends_committed,
                self.store.batches_committed,
            )
        except AssertionError:  # the store is stopped
            counts = None
        if counts is not None:
            yield CounterMetricFamily(
                "chatops_stream_appends", "Appends committed to streams.", value=counts[0]
            )
            yield CounterMetricFamily(
                "chatops_stream_append_batches",
                "Group commits of the stream writer (appends share them).",
                value=counts[1],
            )
        size = GaugeMetricFamily(
            "chatops_db_pool_size", "Connections a database pool keeps.", labels=["pool"]
        )
        used = GaugeMetricFamily(
            "chatops_db_pool_checked_out",
            "Connections of a database pool in use.",
            labels=["pool"],
        )
        overflow = GaugeMetricFamily(
            "chatops_db_pool_overflow",
            "Connections opened beyond a pool's size.",
            labels=["pool"],
        )
        for name, engine in self.pools.items():
            pool: Any = engine.sync_engine.pool
            if not all(hasattr(pool, m) for m in ("size", "checkedout", "overflow")):
                continue
            size.add_metric([name], pool.size())
            used.add_metric([name], pool.checkedout())
            overflow.add_metric([name], max(0, pool.overflow()))
        yield size
        yield used
        yield overflow


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request, who: Caller) -> Response:
    if not who.reads_all:
        raise Forbidden("metrics are for ops, admins and the system token")
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

"""Graceful drain for rolling deploys (DESIGN §7).

On SIGTERM (or SIGINT) the process stops taking new work: readiness answers 503 and new
sessions, messages, regenerations and forks get 503 `draining` with `Retry-After`. Running
generations get DRAIN_TIMEOUT_S to finish; the rest end as `interrupted`, their partial answer
saved and a RUN_ERROR on their streams. Live readers (long-poll, SSE) end at once at a chunk
boundary, so they resume from their last offset on another replica.

Why the drain starts in the signal handler and not in the lifespan shutdown: uvicorn closes its
listening socket on the signal, then waits for every open connection to finish, and only then
runs the lifespan shutdown. Started there, the drain would come too late: each live reader would
hold the process for its whole long-poll or SSE timeout, and a request already in flight on a
keep-alive connection would still be accepted. So `chatops serve` chains a handler in front of
uvicorn's that begins the drain immediately; the lifespan exit only waits for it to end (and
begins it itself when no signal came, as in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog
from fastapi import Request

from streams_service.durable.live import LiveHub
from streams_service.errors import ServiceUnavailable
from streams_service.sessions.generation import GenerationManager

log = structlog.get_logger(__name__)

# Clients retry after this long; by then the load balancer has taken this replica out.
RETRY_AFTER_S = 2


class Draining(ServiceUnavailable):
    code = "draining"


class Drain:
    """The process's shutdown state: `draining` flips once and never back."""

    def __init__(self, hub: LiveHub, generations: GenerationManager, timeout_s: float) -> None:
        self.hub = hub
        self.generations = generations
        self.timeout_s = timeout_s
        self.draining = False
        self._task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        """Stop taking new work and start ending the running work. Idempotent."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "drain_started",
            generations=len(self.generations.running),
            timeout_s=self.timeout_s,
        )
        # Waiting live readers wake, see the drain, and end after what they have delivered;
        # readers that are not waiting check the flag before they next wait.
        self.hub.notify_all()
        self._task = asyncio.create_task(
            self.generations.shutdown(self.timeout_s), name="chatops-drain"
        )

    async def finish(self) -> None:
        """Lifespan exit: the drain is over once every generation has ended and been saved."""
        self.begin()
        assert self._task is not None
        try:
            await self._task
        except Exception as exc:
            log.error("drain_failed", error=type(exc).__name__)
        log.info("drain_finished", still_running=len(self.generations.running))

    def check(self) -> None:
        if self.draining:
            raise Draining(
                "this replica is shutting down; retry and another replica will answer",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )


async def accepting_work(request: Request) -> None:
    """Route dependency for requests that start new work (sessions, generations, forks).
    `async` so FastAPI calls it in the event loop, not through its thread pool."""
    services: Any = request.app.state.services
    drain: Drain = services.drain
    drain.check()


def chain_shutdown_signals(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` in the current event loop as soon as SIGTERM or SIGINT arrives, then hand
    the signal on to the handler installed before (uvicorn's, which starts its own graceful
    shutdown). Signals whose current handler is not a Python callable are left alone, so this
    never swallows a signal that would otherwise end the process. Returns a function that puts
    the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Callable[[int, FrameType | None], Any]] = {}

    def handler(sig: int, frame: FrameType | None) -> None:
        # Python runs this in the main thread between two bytecodes, possibly inside the
        # loop's own code: schedule the callback rather than run it here.
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(callback)
        previous[sig](sig, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if callable(current):
            previous[sig] = current
            signal.signal(sig, handler)

    def restore() -> None:
        for sig, before in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, before)

    return restore

"""Output pace: one shared clock for every stream, and the per-stream release of tokens."""

from __future__ import annotations

import asyncio
import math
from typing import Final

# Granularity of the shared pacing clock: a token goes out at most this much after it falls due.
# uvloop's timers have 1 ms resolution anyway; coarser ticks let more streams share each wakeup.
TICK_S: Final = 0.002


class Ticker:
    """One timer per clock tick for every waiting stream, instead of one per token per stream.

    At benchmark load (hundreds of streams at tens of tokens a second) a timer and a future per
    token per stream were a large share of the simulator's CPU. Here a waiter joins the first
    tick at or after its deadline, and the tick wakes all of its waiters at once.
    """

    def __init__(self, tick_s: float) -> None:
        self._tick_s = tick_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    def wake_at(self, loop: asyncio.AbstractEventLoop, deadline: float) -> asyncio.Future[None]:
        """Done when `loop`'s clock reads `deadline`, or up to one tick later."""
        if loop is not self._loop:
            # The app is being served by a new event loop: ticks left scheduled on an old one
            # would never fire, and a waiter joining one would wait forever.
            self._loop, self._waiters = loop, {}
        tick = math.ceil(deadline / self._tick_s)
        waiters = self._waiters.get(tick)
        if waiters is None:
            waiters = self._waiters[tick] = []
            loop.call_at(tick * self._tick_s, self._wake, tick)
        # A future per waiter, not one per tick: cancelling a waiting stream cancels the future
        # it waits on, and that must not cancel the other streams.
        waiter: asyncio.Future[None] = loop.create_future()
        waiters.append(waiter)
        return waiter

    def _wake(self, tick: int) -> None:
        for waiter in self._waiters.pop(tick, ()):
            if not waiter.done():
                waiter.set_result(None)


class Pacer:
    """Releases output tokens at `tokens_per_s`; tokens that fell due together share a delta."""

    def __init__(self, tokens_per_s: float, ticker: Ticker) -> None:
        self._interval = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self._ticker = ticker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start = 0.0
        self._released = 0

    def duration(self, tokens: int) -> float:
        return max(0, tokens - 1) * self._interval

    def wait(self) -> asyncio.Future[None] | None:
        """What to await until the next token falls due; None if it already has.

        Not a coroutine itself: this runs once per delta per stream, and a coroutine frame
        more on that path is measurable at benchmark load.
        """
        if self._interval == 0.0:
            return None
        # Time is the loop's clock, the one the ticker's timers run on. The loop is looked up
        # once: asyncio.get_running_loop() costs a getpid() system call every time.
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._start = loop.time()
        due_at = self._start + self._released * self._interval
        return self._ticker.wake_at(loop, due_at) if due_at > loop.time() else None

    def take(self, wanted: int) -> int:
        """Release the tokens due by now (once `wait()` is done): at least one, at most `wanted`."""
        if self._interval == 0.0:
            self._released += 1
            return 1
        assert self._loop is not None, "take() before wait()"
        due = int((self._loop.time() - self._start) / self._interval) + 1 - self._released
        count = max(1, min(wanted, due))
        self._released += count
        return count

    async def skip(self, tokens: int) -> None:
        """Spend the time of `tokens` tokens without emitting them (hidden thinking)."""
        while tokens > 0:
            if (due := self.wait()) is not None:
                await due
            tokens -= self.take(tokens)

"""Following a session stream live, surviving dropped connections, and Ctrl-C that never lands
between a page and its offset.

The follower (console.stream.SessionFollower) applies one page and moves to the offset after it
together; after any failure the next long-poll starts again from that offset, so a restart of
the service, a proxy cut or a drain loses and doubles nothing.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType

from console.client import ServiceError
from console.stream import SessionFollower
from streams_service.client.http import CliClient, transient

# Reconnect backoff, and how long a follow keeps trying before it gives up with one line.
BACKOFF_S = (0.2, 0.5, 1.0, 2.0)
GIVE_UP_AFTER_S = 300.0


class Interrupts:
    """SIGINT raises KeyboardInterrupt only while the program waits (for the network or the
    keyboard); anywhere else it is held until the next wait. So a page is never half applied
    or half printed, and a blocked read or prompt still answers Ctrl-C at once (PEP 475: a
    handler that raises aborts the system call)."""

    def __init__(self) -> None:
        self._waiting = False
        self._pending = False
        self._previous: object = None

    def __enter__(self) -> Interrupts:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        if self._waiting:
            raise KeyboardInterrupt
        self._pending = True

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False


@contextlib.contextmanager
def _no_guard() -> Iterator[None]:
    yield


class LiveFollow:
    """Long-polls one session's stream into its follower, reconnecting after failures."""

    def __init__(
        self,
        client: CliClient,
        follower: SessionFollower,
        *,
        interrupts: Interrupts | None = None,
        notice: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.follower = follower
        self.interrupts = interrupts
        self.notice = notice or (lambda text: print(text, file=sys.stderr, flush=True))
        self.sleep = sleep
        self._failing_since: float | None = None
        self._attempt = 0

    def _wait(self) -> contextlib.AbstractContextManager[None]:
        return self.interrupts.waiting() if self.interrupts is not None else _no_guard()

    def step(self) -> int:
        """One long-poll round applied to the follower; records applied (0 after a failure
        it will retry, or when the wait ran out). Raises a ServiceError that is not
        transient, or a transient one that lasted longer than GIVE_UP_AFTER_S."""
        try:
            with self._wait():
                page = self.client.poll_stream(self.follower.session_id, self.follower.offset)
        except ServiceError as exc:
            self._failed(exc)
            return 0
        if self._failing_since is not None:
            self.notice("[reconnected]")
            self._failing_since = None
            self._attempt = 0
        return self.follower.apply(page)

    def _failed(self, exc: ServiceError) -> None:
        if not transient(exc):
            raise exc
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self.notice(f"[connection lost: {exc.detail}; reconnecting…]")
        elif now - self._failing_since > GIVE_UP_AFTER_S:
            raise exc
        delay = BACKOFF_S[min(self._attempt, len(BACKOFF_S) - 1)]
        self._attempt += 1
        with self._wait():
            self.sleep(delay)

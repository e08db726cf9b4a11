"""Serving the simulator: in-process for tests and the service's embedded default
(`run_simulator`), or in the foreground for `chatops simulator` (`serve_simulator`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn

from streams_service.heap import freeze_startup_heap
from streams_service.llm.simulator.app import create_simulator_app
from streams_service.llm.simulator.config import SimulatorConfig
from streams_service.llm.simulator.state import State


class _Server(uvicorn.Server):
    """uvicorn that ends open simulator streams first, and leaves signals alone when embedded."""

    def __init__(self, config: uvicorn.Config, state: State, *, own_signals: bool) -> None:
        super().__init__(config)
        self._sim_state = state
        self._own_signals = own_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Embedded in the service, SIGTERM belongs to the service's own server.
        if self._own_signals:
            with super().capture_signals():
                yield
        else:
            yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # A stalled stream would otherwise hold shutdown for the whole graceful timeout.
        self._sim_state.closing.set()
        await super().shutdown(sockets)


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def run_simulator(
    config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the simulator in the current event loop; yields its base URL (for `base_url=`).

    Port 0 picks a free port. Leaving the block drops any open streams and stops the server.
    """
    app = create_simulator_app(config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets that say
    # so, and without it Nagle + delayed ACK adds ~40 ms to every keep-alive request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound_port: int = sock.getsockname()[1]
    server_config = uvicorn.Config(
        app,
        lifespan="off",
        # Never reconfigure the host process's logging.
        log_config=None,
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = _Server(server_config, app.state.simulator, own_signals=False)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="chatops-simulator")
    try:
        while not server.started:
            if task.done():
                task.result()  # surfaces the startup error
                raise RuntimeError("simulator stopped during startup")
            await asyncio.sleep(0.005)
        yield _base_url(host, bound_port)
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()


def serve_simulator(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8090,
    log_level: str = "info",
) -> None:
    """Run the simulator standalone until SIGINT/SIGTERM (`chatops simulator`)."""
    app = create_simulator_app(config)
    # Its own process, serving load as the service does: the same collector tuning. Without
    # it a full collection stopped every stream it served for ~65 ms every ~20 s at 50 streams
    # of 100 tokens/s, and each showed up in the time to first token of whoever was waiting
    # (docs/BENCHMARKS.md, session 12): a stall the real API does not have.
    freeze_startup_heap()
    server_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_level=log_level,
        ws="none",
        timeout_graceful_shutdown=2,
    )
    _Server(server_config, app.state.simulator, own_signals=True).run()

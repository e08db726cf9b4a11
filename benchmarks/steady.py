"""One steady scale step alone, for judging a change back to back (not part of `make bench`).

    .venv/bin/python -m benchmarks.steady 50 100   # N generations per step, one step each

Starts a standalone simulator (200 ms, 50 tokens/s) and our service on a fresh Postgres
database, exactly as the `scale` scenario does, then runs its steady step for each N: sessions
start 40 a second, every one of the N generates together for 6 s, one live SSE reader each.
Prints per step the delivery lag over that window, the service's user and system CPU seconds
over the whole step, and how many appends and commits the stream writer made (from /metrics).

The CPU seconds are the figure to compare: at a fixed N the work is fixed, so fewer seconds is
a cheaper service, while lag also moves with how busy the machine happens to be. Run old and new
one after the other (`git stash`), twice each; nothing is written anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

import httpx

from benchmarks import servers, sessions
from benchmarks.servers import Server

_WRITER_METRICS = ("chatops_stream_appends_total", "chatops_stream_append_batches_total")


def _writer_counts(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _WRITER_METRICS:
            counts[name] = float(value)
    return counts


def _user_system_seconds(server: Server) -> tuple[float, float]:
    fields = servers._stat_fields(server.pid) or ["0"] * 13
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sessions", type=int, nargs="+", help="N for each steady step")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chatops-steady-") as tmp:
        workdir = Path(tmp)
        with (
            sessions._simulator(
                workdir, sessions.SCALE_SIM_TTFT_MS, sessions.SCALE_SIM_TOKENS_PER_S
            ) as sim,
            sessions._ours(
                workdir, ANTHROPIC_API_KEY=sessions.API_KEY, ANTHROPIC_BASE_URL=sim.base_url
            ) as server,
        ):
            for n in args.sessions:
                counts0, cpu0 = _writer_counts(server), _user_system_seconds(server)
                step = asyncio.run(sessions._scale_steady_step(server, n))
                counts1, cpu1 = _writer_counts(server), _user_system_seconds(server)
                result = {
                    "sessions": n,
                    "window_s": step["window_s"],
                    "lag_ms": {k: step["lag_ms"].get(k) for k in ("p50", "p99", "max")},
                    "service_lag_ms": {
                        k: step["service_lag_ms"].get(k) for k in ("p50", "p99", "max")
                    },
                    "service_user_s": round(cpu1[0] - cpu0[0], 2),
                    "service_system_s": round(cpu1[1] - cpu0[1], 2),
                    "appends": counts1.get(_WRITER_METRICS[0], 0)
                    - counts0.get(_WRITER_METRICS[0], 0),
                    "commits": counts1.get(_WRITER_METRICS[1], 0)
                    - counts0.get(_WRITER_METRICS[1], 0),
                    "rss_peak_mb": step["rss_peak_mb"],
                    "errors": step["errors"],
                    "error_kinds": step["error_kinds"],
                }
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

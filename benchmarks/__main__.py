"""`python -m benchmarks`: our service vs the reference server, same harness, same run.

Each scenario gets a freshly started server (ours on a fresh Postgres database, the reference on a
fresh data directory), so no scenario inherits another's state or memory. Servers run one at a
time so they never compete for the two cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import gateway, history, loadgen, plots, report, servers, sessions
from benchmarks.scenarios import RUNNERS, SCENARIOS, Config

# Protocol scenarios run against both servers; the chat-session ones against ours only.
OURS_ONLY = sessions.SCENARIOS + gateway.SCENARIOS + history.SCENARIOS
OURS_ONLY_RUNNERS = {**sessions.RUNNERS, **gateway.RUNNERS, **history.RUNNERS}
ALL_SCENARIOS = SCENARIOS + OURS_ONLY


def _csv(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
        return items

    return parse


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark our Durable Streams service against the reference Node server.",
    )
    parser.add_argument(
        "--only",
        type=_csv(servers.SERVER_NAMES),
        default=list(servers.SERVER_NAMES),
        help="servers to run: ours, reference, or both comma-separated (default both)",
    )
    parser.add_argument(
        "--scenario",
        type=_csv(ALL_SCENARIOS),
        default=list(ALL_SCENARIOS),
        help=f"comma-separated scenarios (default all; {','.join(OURS_ONLY)} run for "
        f"ours only): {','.join(ALL_SCENARIOS)}",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of measured load per append run (default 10)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of warm-up load before each append run (default 2)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=75,
        help="concurrent writers for the append runs (default 75)",
    )
    parser.add_argument(
        "--streams", type=int, default=75, help="streams for the appends_many run (default 75)"
    )
    parser.add_argument(
        "--sse-readers",
        type=int,
        default=1000,
        help="idle SSE readers, one per stream (default 1000)",
    )
    parser.add_argument(
        "--catchup-mb",
        type=int,
        default=64,
        help="MiB written, then read back, by the catch-up run (default 64)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="append load generator; auto installs wrk if missing and can",
    )
    parser.add_argument(
        "--history-scale",
        type=float,
        default=float(os.environ.get(history.SCALE_ENV, "1")),
        help="size of the history scenario's data, as a fraction of 100,000 sessions / "
        f"1,000,000 messages / 1,000 users (default 1, or ${history.SCALE_ENV}; 0.01 is quick)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait, before each scenario, for other CPU load to stop (default 30)",
    )
    parser.add_argument(
        "--no-doc",
        action="store_true",
        help="do not rewrite the generated section of docs/BENCHMARKS.md",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 1000 or not 1 <= args.streams <= 10_000:
        parser.error("--connections must be 1..1000 and --streams 1..10000")
    if not 0 < args.duration <= 120 or not 0 <= args.warmup <= 30:
        parser.error("--duration must be in (0, 120] and --warmup in [0, 30]")
    if not 0 < args.history_scale <= 1:
        parser.error("--history-scale must be in (0, 1]")
    if not 0 <= args.quiet_wait <= 600:
        parser.error("--quiet-wait must be in [0, 600]")
    if not 1 <= args.sse_readers <= 5000 or not 1 <= args.catchup_mb <= 1024:
        parser.error("--sse-readers must be 1..5000 and --catchup-mb 1..1024")
    return args


def _raise_nofile(needed: int) -> None:
    """Lift the open-files limit for us and the servers we start (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        print(f"warning: open-files limit {soft} < {needed}; SSE readers may fail", flush=True)


def _wait_for_quiet(limit_s: float) -> float:
    """Wait (bounded) for other work on the machine to calm down; returns the last busy sample."""
    deadline = time.monotonic() + limit_s
    busy = servers.background_cpu()
    while busy > report.BUSY_CORES and time.monotonic() < deadline:
        busy = servers.background_cpu()
    return busy


def _resolve_wrk(choice: str) -> tuple[str | None, str]:
    if choice == "python":
        return None, "python load generator requested"
    wrk, note = loadgen.ensure_wrk(allow_install=True)
    if wrk is None and choice == "wrk":
        sys.exit(f"wrk requested but unavailable: {note}")
    return wrk, note


def _summary_line(scenario: str, res: dict[str, Any]) -> str:
    if "error" in res:
        return f"ERROR {str(res['error']).splitlines()[0][:200]}"
    if scenario in ("appends", "appends_many"):
        v, lat = res["verify"], res["latency_ms"]
        return (
            f"{res['appends_per_s']:,.0f} appends/s, p50 {lat.get('p50')} ms, "
            f"p99 {lat.get('p99')} ms; stored {v['stored']:,} / 2xx {v['acknowledged_2xx']:,} "
            f"({'ok' if v['ok'] else 'FAIL'})"
        )
    if scenario == "longpoll":
        lat = res["latency_ms"]
        return (
            f"p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
            f"{res['received']}/{res['messages']} received"
        )
    if scenario == "catchup":
        return (
            f"read {res['read_mb_per_s_median']} MB/s (median), "
            f"write {res['write_mb_per_s']} MB/s ({'ok' if res['ok'] else 'FAIL'})"
        )
    if scenario == "sse":
        return (
            f"RSS {res['rss_before_mb']} -> {res['rss_with_readers_mb']} MB with "
            f"{res['opened']}/{res['readers']} readers; live {res['live_delivered']}/"
            f"{res['readers']} ({'ok' if res['ok'] else 'FAIL'})"
        )
    if scenario == "ttft":
        d, s, o = res["steady_direct_ttft_ms"], res["steady_service_ttft_ms"], res["overhead_ms"]
        b = res["burst_overhead_ms"]
        return (
            f"steady: TTFT direct p50 {d.get('p50')} / p99 {d.get('p99')} ms, via service p50 "
            f"{s.get('p50')} / p99 {s.get('p99')} ms; overhead p50 {o.get('p50')} / p99 "
            f"{o.get('p99')} ms; burst overhead p50 {b.get('p50')} / p99 {b.get('p99')} ms; "
            f"{res['errors']} errors"
        )
    if scenario == "gateway":
        return gateway.summary_line(res)
    if scenario == "scale":
        lag = res["lag_ms"]
        steady = res.get("steady") or {}
        slag = steady.get("lag_ms") or {}
        return (
            f"steady: {steady.get('max_sessions')} sessions sustained, lag p50 "
            f"{slag.get('p50')} / p99 {slag.get('p99')} ms"
            + (f" (stopped: {steady['stopped_early']})" if steady.get("stopped_early") else "")
            + f"; burst start: {res['max_sessions']} sessions, lag p50 {lag.get('p50')} / p99 "
            f"{lag.get('p99')} ms"
            + (f" (stopped: {res['stopped_early']})" if res["stopped_early"] else "")
            + f"; RSS peak {res['rss_peak_mb']} MB, {res['errors']} errors"
        )
    if scenario == "history":
        return (
            f"list p95 {res['list_user_ms'].get('p95')} ms (one user) / "
            f"{res['list_all_ms'].get('p95')} ms (all), search p95 (specific terms) "
            f"{res['search_user_specific_ms'].get('p95')} / "
            f"{res['search_all_specific_ms'].get('p95')} ms, (frequent words) "
            f"{res['search_user_common_ms'].get('p95')} / "
            f"{res['search_all_common_ms'].get('p95')} ms, usage "
            + (
                f"p95 {res['usage_ms'].get('p95')} ms"
                if "p95" in res["usage_ms"]
                else str(res["usage_ms"].get("skipped"))
            )
        )
    return "done"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    # The harness's own full collections walked every module it imported: 17-33 ms stops of
    # the clients and readers, measured as the server's time (docs/BENCHMARKS.md, session 12).
    # Frozen, they walk only what the scenarios allocate.
    gc.collect()
    gc.freeze()
    os.environ[history.SCALE_ENV] = str(args.history_scale)
    _raise_nofile(args.sse_readers * 2 + 256)
    wrk, wrk_note = _resolve_wrk(args.loadgen)
    print(f"load generator: {wrk or 'python fallback'} ({wrk_note})", flush=True)
    cfg = Config(
        duration_s=args.duration,
        warmup_s=args.warmup,
        connections=args.connections,
        many_streams=args.streams,
        sse_readers=args.sse_readers,
        catchup_mb=args.catchup_mb,
        wrk=wrk,
    )
    command = "python -m benchmarks" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv) if (argv or sys.argv[1:]) else ""
    )
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "machine": {**report.machine(), "calibration": report.calibration()},
        "versions": report.versions(loadgen.wrk_version(wrk) if wrk else None),
        "config": {**asdict(cfg), "scenarios": args.scenario, "wrk_note": wrk_note},
        "servers": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="chatops-bench-"))
    started = time.monotonic()
    failures = 0
    try:
        for name in args.only:
            entry: dict[str, Any] = {"label": servers.SERVER_LABELS[name], "scenarios": {}}
            results["servers"][name] = entry
            reason = servers.ours_available() if name == "ours" else servers.reference_available()
            if reason:
                entry["error"] = reason
                failures += 1
                print(f"[{name}] not available: {reason}", flush=True)
                continue
            for scenario in args.scenario:
                if scenario in OURS_ONLY and name != "ours":
                    continue  # chat-session scenarios exercise our session API only
                background = _wait_for_quiet(args.quiet_wait)
                t0 = time.monotonic()
                print(f"[{name}] {scenario} ... (background load {background} cores)", flush=True)
                try:
                    if scenario in OURS_ONLY:  # these start their own servers
                        res = OURS_ONLY_RUNNERS[scenario](workdir, cfg)
                    else:
                        with servers.running(name, workdir) as server:
                            try:
                                res = RUNNERS[scenario](server, cfg)
                            except Exception:
                                res = {"error": traceback.format_exc(limit=3)}
                                res["server_log_tail"] = server.log_tail()
                except Exception as exc:  # the server would not start
                    res = {"error": f"{type(exc).__name__}: {exc}"}
                res["wall_s"] = round(time.monotonic() - t0, 1)
                res["background_cpu_cores"] = background
                entry["scenarios"][scenario] = res
                # A reference-server check failure is a finding about it, not a harness failure.
                failed = "error" in res or (name == "ours" and not report.passed(res))
                failures += failed
                print(
                    f"[{name}] {scenario}: {_summary_line(scenario, res)} [{res['wall_s']} s]",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["total_wall_s"] = round(time.monotonic() - started, 1)
    # Again at the end: a neighbour arriving mid-run shows up as a slower second reading.
    results["machine"]["calibration_end"] = report.calibration()
    if not args.no_doc:  # the charts live beside the document, so --no-doc skips both
        results["plots"] = plots.render(results, plots.OUT_DIR)
    path = report.write_json(results)
    print(f"results: {path.relative_to(servers.REPO)} (total {results['total_wall_s']} s)")
    if not args.no_doc:
        doc = report.update_doc(results)
        print(f"updated {doc.relative_to(servers.REPO)}")
    print()
    print(report.markdown(results))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

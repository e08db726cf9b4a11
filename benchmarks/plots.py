"""PNG charts of a benchmark run, for docs/BENCHMARKS.md.

`render(results, out_dir)` draws whatever the results hold (a partial run draws fewer charts)
and returns the file names it wrote; `python -m benchmarks` calls it after a run unless
`--no-doc`, and `python -m benchmarks.plots [results.json] [out_dir]` redraws from a saved run.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, not pyplot: no global
state, no display needed.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from benchmarks.report import BUSY_CORES
from benchmarks.servers import REPO

OUT_DIR = REPO / "docs" / "bench"
Result = dict[str, Any]

GATEWAY_PNG = "gateway_ttft.png"
SCALE_PNG = "scale.png"
STREAMS_PNG = "streams.png"

PATH_STYLE = {  # gateway path -> (label, colour)
    "direct": ("direct SDK → simulator", "#555555"),
    "litellm": ("LiteLLM proxy", "#d62728"),
    "ours": ("our service", "#1f77b4"),
}
SERVER_STYLE = {"ours": ("ours", "#1f77b4"), "reference": ("reference", "#ff7f0e")}
DPI = 110


def _scenario(results: Result, server: str, name: str) -> Result | None:
    res = results.get("servers", {}).get(server, {}).get("scenarios", {}).get(name)
    return res if isinstance(res, dict) and "error" not in res else None


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    # No Software tag: the PNG bytes then depend on the data, not on the matplotlib version.
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})


def _subtitle(results: Result) -> str:
    mach = results.get("machine", {})
    return (
        f"{results.get('date', '?')} · {mach.get('nproc', '?')} cores "
        f"({mach.get('cpu_model', '?')}) · chatops {results.get('versions', {}).get('chatops_git')}"
    )


def _label_bars(ax: Axes, bars: Any, fmt: str = "{:,.0f}") -> None:
    for bar in bars:
        height = bar.get_height()
        ax.annotate(
            (fmt if abs(height) < 100 else "{:,.0f}").format(height),
            (bar.get_x() + bar.get_width() / 2, height),
            ha="center",
            va="bottom",
            fontsize=7,
            xytext=(0, 2),
            textcoords="offset points",
        )


# --- (a) gateway TTFT -----------------------------------------------------------------------


def gateway_chart(results: Result, path: Path) -> bool:
    res = _scenario(results, "ours", "gateway")
    if not res or not res.get("levels"):
        return False
    levels = res["levels"]
    xs = list(range(len(levels)))
    ticks = [str(level["concurrency"]) for level in levels]
    fig = Figure(figsize=(10, 4.2))
    left, right = fig.subplots(1, 2)
    paths = [p for p in PATH_STYLE if any(p in level["paths"] for level in levels)]
    for p in paths:
        label, colour = PATH_STYLE[p]
        for pct, style in (("p50", "-"), ("p99", "--")):
            ys = [level["paths"].get(p, {}).get("ttft_ms", {}).get(pct) for level in levels]
            if any(y is not None for y in ys):
                left.plot(
                    xs,
                    [float("nan") if y is None else y for y in ys],
                    style,
                    marker="o",
                    color=colour,
                    label=f"{label} {pct}",
                )
    left.set_xticks(xs, ticks)
    left.set_xlabel("concurrent requests")
    left.set_ylabel("time to first text token (ms)")
    left.set_title("TTFT by path (solid p50, dashed p99)")
    left.set_ylim(bottom=0)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)

    # Right: what each gateway adds over the direct call, where the differences are visible.
    gateways = [p for p in paths if p != "direct"]
    series = [(p, pct) for p in gateways for pct in ("p50", "p99")]
    width = 0.8 / max(1, len(series))
    for i, (p, pct) in enumerate(series):
        label, colour = PATH_STYLE[p]
        ys = [level["paths"].get(p, {}).get("overhead_ms", {}).get(pct, 0.0) for level in levels]
        bars = right.bar(
            [x - 0.4 + width * (i + 0.5) for x in xs],
            ys,
            width,
            color=colour,
            alpha=1.0 if pct == "p50" else 0.5,
            label=f"{label} {pct}",
        )
        _label_bars(right, bars, "{:,.1f}")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(xs, ticks)
    right.set_xlabel("concurrent requests")
    right.set_ylabel("TTFT minus direct, same percentile (ms)")
    right.set_title("Added by the gateway (lower is better)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    litellm = res.get("litellm", {})
    note = (
        f"LiteLLM {litellm.get('version')}"
        if litellm.get("status") == "ok"
        else f"LiteLLM not measured: {litellm.get('status')}"
    )
    other = max((level.get("other_cpu_cores") or 0.0) for level in levels)
    if other > BUSY_CORES:
        note += f" · other work used up to {other:g} cores: noisy"
    fig.suptitle(f"Gateway TTFT · {note} · {_subtitle(results)}", fontsize=8)
    _save(fig, path)
    return True


# --- (b) scale steps ------------------------------------------------------------------------


def scale_chart(results: Result, path: Path) -> bool:
    res = _scenario(results, "ours", "scale")
    if not res or not res.get("steps"):
        return False
    steps = res["steps"]
    xs = list(range(len(steps)))
    ticks = [str(step["sessions"]) for step in steps]
    targets = res.get("targets", {})
    fig = Figure(figsize=(10, 4.2))
    left, right = fig.subplots(1, 2)
    for pct, style in (("p50", "-"), ("p99", "--")):
        left.plot(
            xs,
            [step["lag_ms"].get(pct, float("nan")) for step in steps],
            style,
            marker="o",
            color="#1f77b4",
            label=f"lag {pct}",
        )
    if targets.get("lag_p99_ms"):
        left.axhline(targets["lag_p99_ms"], color="#d62728", linestyle=":", label="p99 target")
    left.set_xticks(xs, ticks)
    left.set_xlabel("concurrent generating sessions")
    left.set_ylabel("token delivery lag (ms)")
    left.set_title("Delivery lag per step")
    left.set_ylim(bottom=0)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)

    bars = right.bar(xs, [step["rss_peak_mb"] for step in steps], 0.6, color="#1f77b4")
    _label_bars(right, bars)
    if targets.get("rss_mb"):
        right.axhline(targets["rss_mb"], color="#d62728", linestyle=":", label="RSS target")
        right.legend(fontsize=7)
    right.set_xticks(xs, ticks)
    right.set_xlabel("concurrent generating sessions")
    right.set_ylabel("server RSS peak (MB)")
    right.set_title("Memory per step")
    right.grid(alpha=0.3, axis="y")
    stopped = f" · stopped early: {res['stopped_early']}" if res.get("stopped_early") else ""
    fig.suptitle(f"Scale{stopped} · {_subtitle(results)}", fontsize=8)
    _save(fig, path)
    return True


# --- (c) appends and long-poll, ours vs reference -------------------------------------------


def streams_chart(results: Result, path: Path) -> bool:
    runs = {
        server: {name: _scenario(results, server, name) for name in ("appends", "appends_many")}
        for server in SERVER_STYLE
    }
    polls = {server: _scenario(results, server, "longpoll") for server in SERVER_STYLE}
    if not any(r for by_name in runs.values() for r in by_name.values()) and not any(
        polls.values()
    ):
        return False
    servers = list(SERVER_STYLE)
    width = 0.8 / len(servers)
    fig = Figure(figsize=(10, 4.2))
    left, right = fig.subplots(1, 2)

    groups = [("appends", "1 stream"), ("appends_many", "many streams")]
    for i, server in enumerate(servers):
        label, colour = SERVER_STYLE[server]
        ys = [(runs[server][name] or {}).get("appends_per_s", 0.0) for name, _ in groups]
        bars = left.bar(
            [x - 0.4 + width * (i + 0.5) for x in range(len(groups))],
            ys,
            width,
            color=colour,
            label=label,
        )
        _label_bars(left, bars)
    left.set_xticks(range(len(groups)), [g for _, g in groups])
    left.set_ylabel("acknowledged appends per second")
    left.set_title("Append throughput (higher is better)")
    left.legend(fontsize=7)
    left.grid(alpha=0.3, axis="y")

    pcts = ("p50", "p99")
    for i, server in enumerate(servers):
        label, colour = SERVER_STYLE[server]
        latency = (polls[server] or {}).get("latency_ms", {})
        bars = right.bar(
            [x - 0.4 + width * (i + 0.5) for x in range(len(pcts))],
            [latency.get(p, 0.0) for p in pcts],
            width,
            color=colour,
            label=label,
        )
        _label_bars(right, bars, "{:,.1f}")
    right.set_xticks(range(len(pcts)), list(pcts))
    right.set_ylabel("append → long-poll reader (ms)")
    right.set_title("Long-poll delivery latency (lower is better)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Durable Streams, ours vs reference · {_subtitle(results)}", fontsize=8)
    _save(fig, path)
    return True


CHARTS: tuple[tuple[str, Callable[[Result, Path], bool]], ...] = (
    (GATEWAY_PNG, gateway_chart),
    (SCALE_PNG, scale_chart),
    (STREAMS_PNG, streams_chart),
)


def render(results: Result, out_dir: Path) -> list[str]:
    """Draw every chart the results have data for; returns the file names written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in CHARTS:
        try:
            if draw(results, out_dir / name):
                written.append(name)
        except Exception:  # a broken chart must not lose the run's results; say so loudly
            print(f"warning: could not draw {name}:\n{traceback.format_exc(limit=3)}", flush=True)
    return written


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else REPO / "benchmarks" / "results" / "latest.json"
    out_dir = Path(argv[1]) if len(argv) > 1 else OUT_DIR
    written = render(json.loads(source.read_text()), out_dir)
    for name in written:
        print(out_dir / name)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

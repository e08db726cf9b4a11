"""Shaping ops data for the dashboards: DataFrames from the service's rows, and plotly figures.
No Streamlit here, so the arithmetic (cache savings, error rate) is testable on its own."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from console.client import Models

DAY_MS = 86_400_000
NUMERIC = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "generations",
    "errors",
    "ttft_p50_ms",
    "ttft_p95_ms",
)


def default_range(days: int) -> tuple[date, date]:
    today = datetime.now(UTC).date()
    return today - timedelta(days=days - 1), today


def usage_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Usage rows as a DataFrame: numbers as numbers (money arrives as decimal strings), the
    `day`/`hour` bucket as a UTC timestamp."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for column in NUMERIC:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in ("day", "hour"):
        if column in frame:
            frame[column] = pd.to_datetime(frame[column], utc=True)
    if {"input_tokens", "output_tokens"} <= set(frame.columns):
        frame["tokens"] = frame["input_tokens"] + frame["output_tokens"]
    if {"errors", "generations"} <= set(frame.columns):
        runs = frame["generations"].where(frame["generations"] > 0)
        frame["error_rate"] = (frame["errors"] / runs).fillna(0.0)
    return frame


def cache_savings(by_model: pd.DataFrame, catalog: Models | None) -> pd.DataFrame:
    """What cache reads saved per model: each cached input token cost `cache_read` instead of
    `input` (USD per MTok, the model's first price band)."""
    out = []
    if by_model.empty or "model" not in by_model:
        return pd.DataFrame(columns=["model", "cache_read_tokens", "saved_usd"])
    for model_id, reads in by_model.groupby("model")["cache_read_tokens"].sum().items():
        info = catalog.get(str(model_id)) if catalog is not None else None
        band = info.base_price if info is not None else None
        saved = Decimal(0)
        if band is not None:
            saved = Decimal(int(reads)) * (band.input - band.cache_read) / Decimal(1_000_000)
        out.append(
            {"model": str(model_id), "cache_read_tokens": int(reads), "saved_usd": float(saved)}
        )
    return pd.DataFrame(out)


def cost_by_day_and_model(frame: pd.DataFrame) -> go.Figure:
    fig = px.bar(
        frame,
        x="day",
        y="cost_usd",
        color="model",
        labels={"cost_usd": "Cost (USD)", "day": "Day (UTC)", "model": "Model"},
    )
    fig.update_layout(barmode="stack", margin={"t": 30, "b": 10}, legend_title_text="Model")
    fig.update_traces(width=DAY_MS * 0.8)  # on a time axis a bar is 1 ms wide unless told
    _pad_days(fig, frame["day"])
    return fig


def _pad_days(fig: go.Figure, days: pd.Series) -> None:
    _pad(fig, days, pd.Timedelta(days=1))


def _pad(fig: go.Figure, times: pd.Series, step: pd.Timedelta) -> None:
    """Show at least seven steps, so one or two buckets of data do not become a wall-wide bar."""
    if times.empty or times.nunique() >= 7:
        return
    start, end = times.min(), times.max()
    fig.update_xaxes(range=[start - 3 * step, end + 3 * step])


def top_users(frame: pd.DataFrame, names: dict[str, str], n: int) -> go.Figure:
    top = frame.sort_values("cost_usd", ascending=False).head(n).copy()
    top["who"] = [names.get(str(u), str(u)) for u in top["user"]]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Cost (USD)", "Tokens"))
    fig.add_trace(go.Bar(x=top["cost_usd"], y=top["who"], orientation="h", name="Cost"), 1, 1)
    fig.add_trace(go.Bar(x=top["tokens"], y=top["who"], orientation="h", name="Tokens"), 1, 2)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(showlegend=False, margin={"t": 30, "b": 10}, height=80 + 28 * len(top))
    return fig


def ttft(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for column, label in (("ttft_p50_ms", "p50"), ("ttft_p95_ms", "p95")):
        fig.add_trace(go.Scatter(x=frame["day"], y=frame[column], mode="lines+markers", name=label))
    fig.update_layout(yaxis_title="Time to first token (ms)", margin={"t": 30, "b": 10})
    _pad_days(fig, frame["day"])
    return fig


def generations_and_errors(frame: pd.DataFrame) -> go.Figure:
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Bar(x=frame["day"], y=frame["generations"], name="Generations", width=DAY_MS * 0.8)
    )
    fig.add_trace(
        go.Scatter(
            x=frame["day"], y=frame["error_rate"] * 100, name="Error rate (%)", mode="lines+markers"
        ),
        secondary_y=True,
    )
    fig.update_yaxes(title_text="Generations", secondary_y=False)
    fig.update_yaxes(title_text="Error rate (%)", secondary_y=True, rangemode="tozero")
    fig.update_layout(margin={"t": 30, "b": 10})
    _pad_days(fig, frame["day"])
    return fig


def stacked_counts(
    frame: pd.DataFrame,
    x: str,
    color: str,
    y: str = "count",
    title: str = "",
    bucket_ms: int | None = None,
) -> go.Figure:
    fig = px.bar(frame, x=x, y=y, color=color, labels={y: title or y, x: "Time (UTC)"})
    fig.update_layout(barmode="stack", margin={"t": 30, "b": 10})
    if bucket_ms:
        fig.update_traces(width=bucket_ms * 0.8)
        _pad(fig, frame[x], pd.Timedelta(milliseconds=bucket_ms))
    return fig


def bucket_ms(bucket: str) -> int:
    return 3_600_000 if bucket == "hour" else DAY_MS


def per_bucket(times: list[Any], kinds: list[str], bucket: str) -> pd.DataFrame:
    """Count events per time bucket (`hour` or `day`) and kind, for a stacked bar."""
    if not times:
        return pd.DataFrame(columns=["at", "type", "count"])
    frame = pd.DataFrame({"at": pd.to_datetime(times, utc=True), "type": kinds})
    frame["at"] = frame["at"].dt.floor("h" if bucket == "hour" else "D")
    return frame.groupby(["at", "type"]).size().reset_index(name="count")


RATELIMIT_PAIRS = (
    ("requests", "anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining"),
    ("tokens", "anthropic-ratelimit-tokens-limit", "anthropic-ratelimit-tokens-remaining"),
    (
        "input tokens",
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-remaining",
    ),
    (
        "output tokens",
        "anthropic-ratelimit-output-tokens-limit",
        "anthropic-ratelimit-output-tokens-remaining",
    ),
)


def headroom(headers: dict[str, str]) -> list[dict[str, Any]]:
    """Upstream rate-limit headroom from the latest `anthropic-ratelimit-*` headers."""
    lower = {k.lower(): v for k, v in headers.items()}
    out = []
    for label, limit_key, remaining_key in RATELIMIT_PAIRS:
        try:
            limit = int(lower[limit_key])
            remaining = int(lower[remaining_key])
        except (KeyError, ValueError):
            continue
        reset = lower.get(limit_key.replace("-limit", "-reset"))
        out.append({"what": label, "limit": limit, "remaining": remaining, "reset": reset})
    return out

"""Errors (`/errors`, ops): error events over time by type, and a table linking each to its
session."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from console import charts, ui
from console.client import ServiceError

ctx = ui.context()
client = ctx.client
st.title("Errors")
MAX_EVENTS = 200  # the most one page of GET /v1/errors carries


@st.fragment
def dashboard() -> None:
    top = st.columns([3, 2])
    start, end = charts.default_range(7)
    picked = top[0].date_input("Date range (UTC)", value=(start, end), key="errors_range")
    if not (isinstance(picked, tuple | list) and len(picked) == 2):
        st.caption("Pick the last day of the range.")
        return
    kind = top[1].text_input("Type", key="errors_type", placeholder="all types").strip()
    try:
        data = client.errors(picked[0], picked[1], type=kind or None, limit=MAX_EVENTS)
    except ServiceError as exc:
        ui.show_error(exc, feature="Errors (GET /v1/errors, issue 4)")
        return
    counts: dict[str, int] = data.get("counts") or {}
    items = data.get("items") or []
    if counts:
        cols = st.columns(min(4, len(counts)))
        for i, (name, count) in enumerate(sorted(counts.items(), key=lambda kv: -kv[1])):
            cols[i % len(cols)].metric(name, f"{count:,}")
    if not items:
        st.success("No errors in this range.")
        return
    st.subheader("Errors over time by type")
    bucket = "hour" if (picked[1] - picked[0]).days <= 2 else "day"
    timeline = charts.per_bucket(
        [i.get("at") for i in items], [str(i.get("type")) for i in items], bucket
    )
    st.plotly_chart(
        charts.stacked_counts(timeline, "at", "type", "count", "Errors", charts.bucket_ms(bucket)),
        key="errors_chart",
    )
    if data.get("next_cursor"):
        st.caption(f"The chart and table show the latest {len(items)} events of this range.")

    st.subheader("Events")
    table = pd.DataFrame(
        [
            {
                "At": pd.to_datetime(i.get("at"), utc=True),
                "Type": i.get("type"),
                "Message": i.get("message"),
                "Model": i.get("model"),
                "Session": f"/?session={i['session_id']}" if i.get("session_id") else None,
            }
            for i in items
        ]
    )
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "At": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
            "Session": st.column_config.LinkColumn(display_text="open session"),
        },
    )


dashboard()

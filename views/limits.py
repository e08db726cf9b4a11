"""Rate limits (`/limits`, ops): rejections over time by limit, current window use per user
and session, and the upstream Anthropic headroom."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from console import charts, ui
from console.client import ServiceError

ctx = ui.context()
client = ctx.client
st.title("Rate limits")


@st.fragment
def dashboard() -> None:
    top = st.columns([3, 1])
    start, end = charts.default_range(2)
    picked = top[0].date_input("Date range (UTC)", value=(start, end), key="limits_range")
    bucket = top[1].selectbox("Bucket", ["hour", "day"], key="limits_bucket")
    if not (isinstance(picked, tuple | list) and len(picked) == 2):
        st.caption("Pick the last day of the range.")
        return
    try:
        data = client.ratelimits(picked[0], picked[1], bucket)
    except ServiceError as exc:
        ui.show_error(exc, feature="Rate limits (GET /v1/ratelimits, issue 4)")
        return

    limits = data.get("limits") or []
    if limits:
        st.subheader("Configured limits")
        st.dataframe(pd.DataFrame(limits), hide_index=True)

    st.subheader("Rejections over time")
    rejections = pd.DataFrame(data.get("rejections") or [])
    if rejections.empty:
        st.success("No request was rejected in this range.")
    else:
        rejections["bucket"] = pd.to_datetime(rejections["bucket"], utc=True)
        fig = charts.stacked_counts(
            rejections, "bucket", "limit_name", "count", "Rejections", charts.bucket_ms(bucket)
        )
        st.plotly_chart(fig, key="limits_chart")
        recent = data.get("recent") or []
        if recent:
            with st.expander(f"Latest rejections ({len(recent)})"):
                st.dataframe(pd.DataFrame(ui.rows_table(recent)), hide_index=True)

    st.subheader("Current window use")
    current = data.get("current") or []
    if current:
        use = pd.DataFrame(ui.rows_table(current))
        if {"used", "limit"} <= set(use.columns):
            use["use"] = pd.to_numeric(use["used"]) / pd.to_numeric(use["limit"])
        st.dataframe(
            use,
            hide_index=True,
            column_config={"use": st.column_config.ProgressColumn("Use", min_value=0, max_value=1)},
        )
    else:
        st.caption("No user or session is using a limit window right now.")

    st.subheader("Upstream headroom (Anthropic)")
    upstream = data.get("upstream")
    if not upstream:
        st.caption("No upstream rate-limit headers recorded yet.")
        return
    rows = charts.headroom(upstream.get("headers") or {})
    st.caption(f"From the latest generation ({upstream.get('model')}, {upstream.get('at')}).")
    if not rows:
        st.caption("The upstream sent no rate-limit headers.")
    for row in rows:
        share = row["remaining"] / row["limit"] if row["limit"] else 0.0
        st.progress(
            min(1.0, max(0.0, share)),
            text=f"{row['what']}: {row['remaining']:,} of {row['limit']:,} left"
            + (f" · resets {row['reset']}" if row.get("reset") else ""),
        )


dashboard()

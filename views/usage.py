"""Usage & cost (`/usage`): cost per day by model, top users, cache savings, time to first
token, generations and error rate. Ops and admins see everyone; members see their own."""

from __future__ import annotations

import streamlit as st

from console import charts, render, ui
from console.client import ServiceError

ctx = ui.context()
client = ctx.client
st.title("Usage & cost")
st.caption("Everyone's usage." if ctx.reads_all else "Your own usage.")


@st.fragment
def dashboard() -> None:
    # A fragment: changing the range reruns only the dashboard (reference/streamlit.md §5).
    start, end = charts.default_range(30)
    picked = st.date_input("Date range (UTC)", value=(start, end), key="usage_range")
    if not (isinstance(picked, tuple | list) and len(picked) == 2):
        st.caption("Pick the last day of the range.")
        return
    date_from, date_to = picked
    try:
        by_day_model = charts.usage_frame(client.usage(date_from, date_to, "day,model"))
        by_day = charts.usage_frame(client.usage(date_from, date_to, "day"))
        by_user = charts.usage_frame(client.usage(date_from, date_to, "user"))
    except ServiceError as exc:
        ui.show_error(exc, feature="Usage & cost (GET /v1/usage, issue 4)")
        return
    if by_day.empty:
        st.info("No generations in this range yet.")
        return

    totals = st.columns(4)
    totals[0].metric("Cost", render.usd(by_day["cost_usd"].sum(), 2))
    totals[1].metric("Generations", f"{int(by_day['generations'].sum()):,}")
    totals[2].metric("Tokens", f"{int(by_day['tokens'].sum()):,}")
    runs = int(by_day["generations"].sum())
    rate = by_day["errors"].sum() / runs if runs else 0.0
    totals[3].metric("Error rate", f"{rate:.1%}")

    st.subheader("Cost per day by model")
    st.plotly_chart(charts.cost_by_day_and_model(by_day_model), key="usage_cost_chart")

    left, right = st.columns(2)
    with left:
        st.subheader("Cost and tokens per user")
        top_n = st.slider("Top", 3, 50, 10, key="usage_top_n")
        names = _user_names()
        st.plotly_chart(charts.top_users(by_user, names, top_n), key="usage_users_chart")
    with right:
        st.subheader("Cache savings")
        savings = charts.cache_savings(by_day_model, ui.models(client))
        st.metric("Saved by cache reads", render.usd(savings["saved_usd"].sum(), 2))
        st.dataframe(
            savings,
            hide_index=True,
            column_config={
                "saved_usd": st.column_config.NumberColumn("Saved (USD)", format="$%.4f"),
                "cache_read_tokens": st.column_config.NumberColumn("Cache-read tokens"),
            },
        )

    left, right = st.columns(2)
    with left:
        st.subheader("Time to first token")
        st.plotly_chart(charts.ttft(by_day), key="usage_ttft_chart")
    with right:
        st.subheader("Generations and error rate")
        st.plotly_chart(charts.generations_and_errors(by_day), key="usage_errors_chart")

    st.download_button(
        "Download CSV (per day and model)",
        data=by_day_model.to_csv(index=False).encode(),
        file_name=f"usage-{date_from}-{date_to}.csv",
        mime="text/csv",
        on_click="ignore",
    )


def _user_names() -> dict[str, str]:
    """User ids to emails where the caller may list users (admins); ids otherwise."""
    if not ctx.is_admin:
        return {ctx.me.id: "you"} if ctx.me is not None and ctx.me.id else {}
    try:
        return {str(u["id"]): str(u.get("email") or u["id"]) for u in client.users()}
    except ServiceError:
        return {}


dashboard()

"""Admin (`/admin`): users (role, disable, daily budget), API tokens (shown once, revoked),
every session (rename, delete, restore, purge) and the audit log."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import pandas as pd
import streamlit as st

from console import charts, sessions_ui, ui
from console.client import ServiceError

ctx = ui.context()
client = ctx.client
st.title("Admin")
ui.show_flashes()

users_tab, tokens_tab, sessions_tab, audit_tab = st.tabs(
    ["Users", "API tokens", "All sessions", "Audit log"]
)


def load_users() -> list[dict[str, Any]] | None:
    try:
        return client.users()
    except ServiceError as exc:
        ui.show_error(exc, feature="User management (GET /v1/users, issue 5)")
        return None


def user_label(user: dict[str, Any]) -> str:
    flag = " (disabled)" if user.get("disabled") else ""
    return f"{user.get('email')} · {user.get('role')}{flag}"


with users_tab:
    users = load_users()
    if users is not None:
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "Email": u.get("email"),
                        "Name": u.get("name"),
                        "Role": u.get("role"),
                        "Disabled": bool(u.get("disabled")),
                        "Daily budget (USD)": u.get("daily_budget_usd") or "default",
                        "Last seen": u.get("last_seen_at"),
                    }
                    for u in users
                ]
            ),
            hide_index=True,
        )
        if users:
            with st.form("admin_user_edit"):
                st.markdown("**Change a user**")
                chosen = st.selectbox("User", users, format_func=user_label, key="admin_edit_pick")
                cols = st.columns([1, 1, 1])
                roles = list(ui.ROLES)
                role = cols[0].selectbox(
                    "Role",
                    roles,
                    index=roles.index(chosen["role"]) if chosen["role"] in roles else 0,
                )
                budget_text = cols[1].text_input(
                    "Daily budget (USD)",
                    value=str(chosen.get("daily_budget_usd") or ""),
                    help="Empty: the service's default cap",
                )
                disabled = cols[2].checkbox("Disabled", value=bool(chosen.get("disabled")))
                if st.form_submit_button("Save", type="primary"):
                    try:
                        budget = Decimal(budget_text) if budget_text.strip() else None
                    except InvalidOperation:
                        st.error("The daily budget must be a number of dollars, like 20 or 7.5.")
                    else:
                        try:
                            client.update_user(
                                str(chosen["id"]),
                                role=role,
                                disabled=disabled,
                                daily_budget_usd=None if budget is None else str(budget),
                            )
                        except ServiceError as exc:
                            ui.show_error(exc)
                        else:
                            ui.flash("success", f"Saved {chosen.get('email')}.")
                            st.rerun()
        with st.form("admin_user_add", clear_on_submit=True):
            st.markdown("**Add a user**")
            cols = st.columns([3, 2, 1])
            email = cols[0].text_input("Email", key="admin_add_email")
            name = cols[1].text_input("Name", key="admin_add_name")
            role = cols[2].selectbox("Role", list(ui.ROLES), key="admin_add_role")
            if st.form_submit_button("Add"):
                try:
                    client.create_user(email.strip(), role, name.strip() or None)
                except ServiceError as exc:
                    ui.show_error(exc)
                else:
                    ui.flash("success", f"Added {email.strip()}.")
                    st.rerun()

with tokens_tab:
    users = load_users() or []
    shown = st.session_state.pop("admin_new_token", None)
    if shown is not None:
        st.success(
            "Copy this token now: it is shown only once and cannot be recovered.",
            icon=":material/key:",
        )
        st.code(shown, language=None)
    if users:
        owner = st.selectbox("Tokens of", users, format_func=user_label, key="admin_token_user")
        try:
            tokens = client.tokens(str(owner["id"]))
        except ServiceError as exc:
            ui.show_error(exc, feature="API tokens (issue 5)")
            tokens = []
        if tokens:
            st.dataframe(
                pd.DataFrame(
                    [
                        {
                            "Name": t.get("name"),
                            "Prefix": t.get("prefix"),
                            "Created": t.get("created_at"),
                            "Expires": t.get("expires_at"),
                            "Last used": t.get("last_used_at"),
                            "Revoked": t.get("revoked_at"),
                        }
                        for t in tokens
                    ]
                ),
                hide_index=True,
            )
            live_tokens = [t for t in tokens if not t.get("revoked_at")]
            if live_tokens:
                cols = st.columns([3, 1])
                victim = cols[0].selectbox(
                    "Revoke",
                    live_tokens,
                    format_func=lambda t: f"{t.get('name') or 'unnamed'} ({t.get('prefix')}…)",
                    key="admin_revoke_pick",
                )
                if cols[1].button("Revoke", key="admin_revoke"):
                    try:
                        client.revoke_token(str(owner["id"]), str(victim["id"]))
                    except ServiceError as exc:
                        ui.show_error(exc)
                    else:
                        ui.flash("success", "Token revoked.")
                        st.rerun()
        else:
            st.caption("No tokens yet.")
        with st.form("admin_token_create", clear_on_submit=True):
            st.markdown(f"**New token for {owner.get('email')}**")
            cols = st.columns([3, 1])
            token_name = cols[0].text_input(
                "Name", placeholder="e.g. CI, laptop CLI", key="admin_token_name"
            )
            days = cols[1].number_input("Expires in days", min_value=0, max_value=3650, value=90)
            if st.form_submit_button("Create token", type="primary"):
                try:
                    created = client.create_token(
                        str(owner["id"]), token_name.strip() or None, int(days) or None
                    )
                except ServiceError as exc:
                    ui.show_error(exc)
                else:
                    st.session_state["admin_new_token"] = created.get("token", "")
                    st.rerun()

with sessions_tab:
    sessions_ui.session_browser(ctx, prefix="admin", everyone=True)

with audit_tab:
    start, end = charts.default_range(30)
    picked = st.date_input("Date range (UTC)", value=(start, end), key="audit_range")
    action = st.text_input("Action", placeholder="all actions", key="audit_action").strip()
    if isinstance(picked, tuple | list) and len(picked) == 2:
        try:
            audit = client.audit(picked[0], picked[1], action=action or None, limit=200)
        except ServiceError as exc:
            ui.show_error(exc, feature="The audit log (GET /v1/audit, issue 4)")
        else:
            entries = audit.get("items") or []
            if entries:
                st.dataframe(
                    pd.DataFrame(
                        [
                            {
                                "At": pd.to_datetime(e.get("at"), utc=True),
                                "Who": e.get("actor_email") or e.get("actor_id"),
                                "Action": e.get("action"),
                                "Target": f"{e.get('target_type')} {e.get('target_id') or ''}",
                                "Detail": str(e.get("detail") or ""),
                            }
                            for e in entries
                        ]
                    ),
                    hide_index=True,
                )
            else:
                st.caption("Nothing recorded in this range.")

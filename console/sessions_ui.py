"""The session browser shared by History (your sessions) and Admin (everyone's): search,
filters, a selectable table, a transcript, rename, delete to Trash, restore, purge, export."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pandas as pd
import streamlit as st

from console import render, ui
from console.client import MessageInfo, ServiceError, SessionInfo, SessionPage
from console.stream import Message

PAGE_SIZE = 25


def _state(prefix: str) -> dict[str, Any]:
    box: dict[str, Any] = st.session_state.setdefault(
        f"{prefix}_browser", {"cursors": [None], "filters": None, "nonce": 0}
    )
    return box


def _reset_selection(prefix: str) -> None:
    _state(prefix)["nonce"] += 1


def session_browser(ctx: ui.Context, *, prefix: str, everyone: bool = False) -> None:
    """Browse sessions. `everyone` lists all users' (ops/admin); else the caller's own."""
    client = ctx.client
    box = _state(prefix)
    with st.container(border=True):
        top = st.columns([3, 2, 2, 1])
        q = top[0].text_input(
            "Search", key=f"{prefix}_q", placeholder="Words in titles and messages"
        )
        catalog = ui.models(client)
        model_ids = [m.id for m in catalog.models] if catalog else []
        model = top[1].selectbox(
            "Model", ["All models", *model_ids], key=f"{prefix}_model", index=0
        )
        days = top[2].date_input(
            "Created between",
            value=[],
            max_value=datetime.now(UTC).date() + timedelta(days=1),
            key=f"{prefix}_days",
        )
        trash = top[3].toggle("Trash", key=f"{prefix}_trash", help="Deleted sessions")
        user: str | None = None
        if ctx.reads_all:
            user = st.text_input(
                "User id",
                key=f"{prefix}_user",
                placeholder="all users" if everyone else "your own sessions",
                help="Leave empty for "
                + ("everyone's sessions" if everyone else "your own")
                + "; or a user id",
            ).strip() or ("all" if everyone else None)
    date_from, date_to = _range(days)
    filters = (q.strip(), model, date_from, date_to, trash, user)
    if box["filters"] != filters:
        box.update(filters=filters, cursors=[None])
        _reset_selection(prefix)
    try:
        page: SessionPage = client.list_sessions(
            q=q.strip() or None,
            model=None if model == "All models" else model,
            date_from=date_from,
            date_to=date_to,
            trash=trash,
            user=user,
            cursor=box["cursors"][-1],
            limit=PAGE_SIZE,
        )
    except ServiceError as exc:
        ui.show_error(exc, feature="The session list (GET /v1/sessions, issue 4)")
        return
    if not page.items:
        st.info("No sessions in the trash." if trash else "No sessions match.")
        _pager(prefix, page)
        return
    selected = _table(prefix, page.items, show_user=ctx.reads_all)
    _pager(prefix, page)
    if selected is not None:
        _details(ctx, prefix, selected, trash=trash)


def _range(days: Any) -> tuple[date | None, date | None]:
    if isinstance(days, tuple | list):
        picked = [d for d in days if isinstance(d, date)]
        if len(picked) == 2:
            return picked[0], picked[1]
        if len(picked) == 1:
            return picked[0], picked[0]
    return None, None


def _table(prefix: str, items: list[SessionInfo], *, show_user: bool) -> SessionInfo | None:
    rows = []
    for s in items:
        row: dict[str, Any] = {
            "Title": s.title or "Untitled",
            "Model": s.model,
            "Messages": s.message_count,
            "Cost (USD)": float(s.cost_usd),
            "Updated": s.updated_at,
        }
        if show_user:
            user = s.user if isinstance(s.user, dict) else {}
            row["User"] = user.get("email") or user.get("id") or ""
        if s.deleted_at is not None:
            row["Deleted"] = s.deleted_at
        rows.append(row)
    event = st.dataframe(
        pd.DataFrame(rows),
        key=f"{prefix}_table_{_state(prefix)['nonce']}",
        on_select="rerun",
        selection_mode="single-row",
        hide_index=True,
        column_config={
            "Cost (USD)": st.column_config.NumberColumn(format="$%.4f"),
            "Updated": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
            "Deleted": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
        },
    )
    chosen = list(getattr(getattr(event, "selection", None), "rows", []) or [])
    if chosen and 0 <= int(chosen[0]) < len(items):
        return items[int(chosen[0])]
    count = f"{len(items)} session{'s' if len(items) != 1 else ''}"
    st.caption(f"{count} shown. Select a row to open, rename, delete or export that session.")
    return None


def _pager(prefix: str, page: SessionPage) -> None:
    box = _state(prefix)
    back, _, forward = st.columns([1, 4, 1])
    if len(box["cursors"]) > 1 and back.button("← Newer", key=f"{prefix}_newer"):
        box["cursors"].pop()
        _reset_selection(prefix)
        st.rerun()
    if page.next_cursor and forward.button("Older →", key=f"{prefix}_older"):
        box["cursors"].append(page.next_cursor)
        _reset_selection(prefix)
        st.rerun()


def _details(ctx: ui.Context, prefix: str, s: SessionInfo, *, trash: bool) -> None:
    client = ctx.client
    st.subheader(s.title or "Untitled")
    st.caption(
        f"`{s.id}` · {s.model} · {s.message_count} messages · {render.usd(s.cost_usd)}"
        + (" · in the trash" if s.deleted_at else "")
    )

    def done(text: str) -> None:
        ui.flash("success", text)
        _reset_selection(prefix)

    def rename(title: str) -> None:
        with ui.flashing_errors():
            client.rename(s.id, title)
            done(f"Renamed to “{title}”.")

    def delete() -> None:
        with ui.flashing_errors():
            client.delete(s.id)
            done("Moved to the trash. Turn on “Trash” to restore it.")

    def restore() -> None:
        with ui.flashing_errors():
            client.restore(s.id)
            done("Restored.")

    def purge() -> None:
        with ui.flashing_errors():
            client.purge(s.id)
            done("Deleted for good (its usage and cost stay on record).")

    if not trash:
        cols = st.columns([2, 3, 1])
        if cols[0].button(
            "Continue in Chat", icon=":material/chat:", key=f"{prefix}_open", type="primary"
        ):
            st.switch_page("views/chat.py", query_params={"session": s.id})
        title = cols[1].text_input(
            "New title",
            value=s.title or "",
            key=f"{prefix}_title_{s.id}",
            label_visibility="collapsed",
        )
        cols[2].button(
            "Rename",
            key=f"{prefix}_rename",
            on_click=rename,
            args=(title.strip(),),
            disabled=not title.strip() or title.strip() == (s.title or ""),
        )
        actions = st.columns([1, 1, 1, 3])
        actions[0].button(
            "Delete", icon=":material/delete:", key=f"{prefix}_delete", on_click=delete
        )
        for col, fmt, label in ((actions[1], "md", "Markdown"), (actions[2], "json", "JSON")):
            _export(ctx, prefix, col, s.id, fmt, label)
        _transcript(ctx, s.id)
    else:
        cols = st.columns([1, 1, 4])
        cols[0].button(
            "Restore",
            icon=":material/restore_from_trash:",
            key=f"{prefix}_restore",
            on_click=restore,
            type="primary",
        )
        if ctx.is_admin:
            sure = cols[2].checkbox(
                "I understand a purge cannot be undone", key=f"{prefix}_purge_ok_{s.id}"
            )
            cols[1].button("Purge", key=f"{prefix}_purge", on_click=purge, disabled=not sure)


def _export(ctx: ui.Context, prefix: str, col: Any, session_id: str, fmt: str, label: str) -> None:
    cache_key = f"{prefix}_export_{session_id}_{fmt}"
    ready = st.session_state.get(cache_key)
    if ready is None:
        if col.button(
            label, icon=":material/download:", key=f"{prefix}_prep_{fmt}", help=f"Export as {label}"
        ):
            try:
                st.session_state[cache_key] = ctx.client.export(session_id, fmt)
            except ServiceError as exc:
                ui.show_error(exc, feature="Export (GET /v1/sessions/{id}/export, issue 4)")
                return
            st.rerun()
        return
    col.download_button(
        f"Save {label}",
        data=ready.data,
        file_name=ready.filename,
        mime=ready.mime,
        key=f"{prefix}_dl_{fmt}",
        on_click="ignore",
        type="primary",
    )


def _transcript(ctx: ui.Context, session_id: str) -> None:
    with st.expander("Transcript", expanded=False):
        try:
            full = ctx.client.get_session(session_id)
        except ServiceError as exc:
            ui.show_error(exc)
            return
        for m in full.messages or []:
            if m.status == "superseded":
                continue
            render.message(as_message(m), key=f"t-{session_id}-")


def as_message(m: MessageInfo) -> Message:
    return Message(
        id=m.id,
        role=m.role,
        parts=list(m.parts),
        status=m.status,
        created_at=m.created_at.isoformat() if m.created_at else None,
    )


def importer(ctx: ui.Context, prefix: str) -> None:
    with st.expander("Import a session from a JSON export"):
        upload = st.file_uploader("JSON export", type=["json"], key=f"{prefix}_import")
        if upload is not None and st.button("Import", key=f"{prefix}_import_go"):
            try:
                document = json.loads(upload.getvalue())
            except ValueError:
                st.error("That file is not JSON.")
                return
            try:
                created = ctx.client.import_session(document)
            except ServiceError as exc:
                ui.show_error(exc, feature="Import (POST /v1/sessions/import, issue 4)")
                return
            ui.flash("success", f"Imported as “{created.title or 'Untitled'}”.")
            st.switch_page("views/chat.py", query_params={"session": created.id})

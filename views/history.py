"""History (`/history`): find a session, read it, rename, delete to Trash, restore, export,
continue it in Chat."""

from __future__ import annotations

import streamlit as st

from console import sessions_ui, ui

ctx = ui.context()
st.title("History")
ui.show_flashes()
sessions_ui.session_browser(ctx, prefix="history")
sessions_ui.importer(ctx, "history")

"""The chatops console (DESIGN §1, §8): sign-in, then the pages this user's role may see.

Run with `streamlit run app.py` (or `make run`, beside the service). The console reaches the
service at STREAMS_URL over HTTP only.
"""

from __future__ import annotations

import streamlit as st

from console import auth, ui

st.set_page_config(page_title="chatops console", page_icon=":material/forum:", layout="wide")

identity = auth.sign_in()
ctx = ui.build_context(identity)

# (file, title, icon, url path, roles). Only the pages a role may see are passed to
# st.navigation: any other URL falls back to Chat with "Page not found". The folder is views/,
# not pages/: Streamlit 1.67 still runs a `pages/` folder beside the entry script as an old-style
# multipage app until some run calls st.navigation, so the first request after a start could
# open pages/admin.py directly, past sign-in and roles.
PAGES = [
    ("views/chat.py", "Chat", ":material/chat:", None, ("member", "ops", "admin")),
    ("views/history.py", "History", ":material/history:", "history", ("member", "ops", "admin")),
    ("views/usage.py", "Usage & cost", ":material/payments:", "usage", ("member", "ops", "admin")),
    ("views/limits.py", "Rate limits", ":material/speed:", "limits", ("ops", "admin")),
    ("views/errors.py", "Errors", ":material/error:", "errors", ("ops", "admin")),
    ("views/admin.py", "Admin", ":material/admin_panel_settings:", "admin", ("admin",)),
]

pages = [
    st.Page(path, title=title, icon=icon, url_path=url, default=url is None)
    for path, title, icon, url, roles in PAGES
    if ctx.role in roles
]
page = st.navigation(pages)
ui.sidebar_identity(ctx)
if not identity.dev:
    st.sidebar.button("Sign out", on_click=auth.sign_out)
page.run()

"""The chatops console: Streamlit-side code (HTTP client, stream follower, rendering, auth).

The console talks to the Streams service over HTTP only (DESIGN §1); nothing here imports the
service or opens its database.
"""

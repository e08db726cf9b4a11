"""The `chatops` terminal client: chat, sessions and tail over the service's HTTP API.

Like the console it talks to the Streams service over HTTP only (DESIGN §1) and reuses the
console's typed client and stream follower (`console.client`, `console.stream`, both free of
Streamlit), so a terminal and a browser materialize a session's stream identically.
"""

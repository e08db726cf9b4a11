#!/usr/bin/env bash
# `make run`: the Streams service in the background, the console (Streamlit) in the foreground
# talking to it. Ctrl-C stops both.
set -euo pipefail

BIN=${BIN:-.venv/bin}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8080}
CONSOLE_PORT=${CONSOLE_PORT:-8501}

"$BIN/chatops" serve --host "$HOST" --port "$PORT" &
service=$!
trap 'kill "$service" 2>/dev/null || true; wait "$service" 2>/dev/null || true' EXIT INT TERM

for _ in $(seq 1 100); do
  if ! kill -0 "$service" 2>/dev/null; then
    echo "the service did not start" >&2
    exit 1
  fi
  if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
    "http://$HOST:$PORT/health" 2>/dev/null; then
    break
  fi
  sleep 0.2
done

echo "service: http://$HOST:$PORT    console: http://127.0.0.1:$CONSOLE_PORT"
STREAMS_URL=${STREAMS_URL:-http://$HOST:$PORT} "$BIN/streamlit" run app.py \
  --server.address 127.0.0.1 --server.port "$CONSOLE_PORT"

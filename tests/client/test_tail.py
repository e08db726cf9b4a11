"""`chatops tail` follows a session live and resumes from its offset when the connection drops:
here the service itself goes away mid-answer (a graceful drain, as in a deploy: the answer is
finished while the client is cut off) and comes back on the same port and database."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from tests.client.conftest import SERVICE_ENV, send, service_env, stored_text, wait_idle
from tests.client.support import Output, answers, plain
from tests.support import ServerProcess, chatops_bin


def test_tail_resumes_after_the_service_restarts_without_losing_or_doubling_text(
    tmp_path: Path, clean_env: dict[str, str], home: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'tail.db'}"
    env = {**SERVICE_ENV, "SIMULATOR_TOKENS_PER_S": "50", "DRAIN_TIMEOUT_S": "20"}
    first = service_env(ServerProcess(db, tmp_path, "first", **env)).start()
    second = service_env(ServerProcess(db, tmp_path, "second", **env))
    second.port, second.base_url = first.port, first.base_url
    tail: subprocess.Popen[str] | None = None
    try:
        api = httpx.Client(base_url=first.base_url, timeout=30)
        session_id = api.post("/v1/sessions", json={}).json()["id"]
        send(api, session_id, "before the tail [[tokens:6]]")
        earlier = stored_text(wait_idle(api, session_id)["messages"][1])

        tail = subprocess.Popen(
            [str(chatops_bin()), "tail", session_id],
            env={**clean_env, "STREAMS_URL": first.base_url},
            cwd=home / "work",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = Output(tail.stdout), Output(tail.stderr)  # type: ignore[arg-type]
        out.wait_for(lambda t: earlier in t, what="the earlier answer")

        send(api, session_id, "during the restart [[tokens:150]]")  # 3 s at this pace
        out.wait_for(
            lambda t: len(answers(t)) == 2 and len(answers(t)[1].split()) >= 5,
            what="the start of the live answer",
        )
        # SIGTERM: the service drains. Its live readers are let go at once, the answer is
        # finished; then it exits, and nothing listens until the second process is up.
        first.stop()
        err.wait_for(lambda t: "[connection lost" in t, what="the lost connection")
        shown_while_down = answers(out.text)[1]
        second.start()

        final = wait_idle(api, session_id)
        answer = final["messages"][-1]
        assert answer["status"] == "complete"
        expected = stored_text(answer)
        out.wait_for(
            lambda t: len(answers(t)) == 2 and answers(t)[1] == expected,
            what="the whole answer",
        )
        err.wait_for(lambda t: "[reconnected]" in t, what="the reconnection")
        # While the tail could not read, the rest of the answer was written: it came from
        # the offset the tail had, every word once.
        assert len(shown_while_down) < len(expected)
        printed = plain(out.text)
        assert answers(printed) == [earlier, expected]
        assert printed.count("during the restart [[tokens:150]]") == 1

        # Ending the session ends the tail.
        assert api.post(f"/v1/sessions/{session_id}/end").status_code == 200
        assert tail.wait(timeout=20) == 0
        assert "[the session has ended]" in err.join()
        assert "Traceback" not in err.text

        # An ended session's tail prints its last messages and returns at once.
        again = subprocess.run(
            [str(chatops_bin()), "tail", session_id, "-n", "1"],
            env={**clean_env, "STREAMS_URL": second.base_url},
            cwd=home / "work",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert again.returncode == 0, again.stderr
        assert answers(again.stdout) == [expected]
        assert "during the restart" not in again.stdout  # only the last message
        assert "[the session has ended]" in again.stderr
    finally:
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.wait(timeout=10)
        first.stop()
        second.stop()

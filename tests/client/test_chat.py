"""`chatops chat` on a pseudo terminal, as a person uses it, against a real service."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import pexpect

from tests.client.conftest import new_session, send, stored_text, wait_idle
from tests.client.support import UUID, answers, spawn_chat, squash, transcript
from tests.support import ServerProcess

PROMPT = "you> "


def start(args: list[str], env: dict[str, str], home: Path) -> pexpect.spawn:
    child = spawn_chat(args, env=env, cwd=home / "work")
    child.logfile_read = io.StringIO()
    return child


def session_id_of(child: pexpect.spawn) -> str:
    child.expect(rf"session ({UUID})")
    found: str = child.match.group(1)
    return found


def test_chat_streams_an_answer_then_prompts_again(
    service: ServerProcess, api: httpx.Client, clean_env: dict[str, str], home: Path
) -> None:
    env = {**clean_env, "STREAMS_URL": service.base_url}
    child = start(["--model", "claude-haiku-4-5"], env, home)
    session_id = session_id_of(child)
    child.expect_exact(PROMPT)
    child.sendline("hello there [[tokens:12]]")
    child.expect_exact("claude> ")
    child.expect_exact("[thinking] ")  # thinking is shown, marked as such
    child.expect_exact(PROMPT)  # the prompt comes back once the answer has ended

    body = wait_idle(api, session_id)
    assert body["model"] == "claude-haiku-4-5"
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
    printed = answers(transcript(child))
    # The typed line is not printed a second time from the stream; the answer exactly once.
    assert transcript(child).count("hello there [[tokens:12]]") == 1
    assert printed == [stored_text(body["messages"][1])]
    assert printed[0]

    # Ctrl-C at the prompt leaves, cleanly.
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in transcript(child)


def test_tool_approval_is_asked_and_answered(
    service: ServerProcess, api: httpx.Client, clean_env: dict[str, str], home: Path
) -> None:
    env = {**clean_env, "STREAMS_URL": service.base_url}
    child = start([], env, home)
    session_id = session_id_of(child)
    child.expect_exact(PROMPT)
    child.sendline('look it up [[tool:search_my_history {"query":"quokka"}]]')
    child.expect_exact('[tool] search_my_history {"query": "quokka"}')
    child.expect_exact("allow search_my_history to run? [y/N] ")
    child.sendline("y")
    child.expect_exact("[tool] approved")
    child.expect_exact("[tool result] ")
    child.expect_exact("The tool returned:")
    child.expect_exact(PROMPT)

    body = wait_idle(api, session_id)
    answer = body["messages"][-1]
    calls = [p for p in answer["parts"] if p["type"] == "tool-call"]
    assert len(calls) == 1
    assert calls[0]["approval"]["approved"] is True
    assert "The tool returned:" in stored_text(answer)

    child.sendeof()  # Ctrl-D leaves too
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_partial_text(
    service: ServerProcess, api: httpx.Client, clean_env: dict[str, str], home: Path
) -> None:
    env = {**clean_env, "STREAMS_URL": service.base_url}
    child = start([], env, home)
    session_id = session_id_of(child)
    child.expect_exact(PROMPT)
    child.sendline("a long one [[tokens:900]]")  # 15 s at the test pace
    # Wait until answer text (not only thinking) is on the screen, then press Ctrl-C.
    child.expect(r"\[thinking\][^\n]*\n(\S+ ){5}")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)

    body = wait_idle(api, session_id, timeout_s=10)
    answer = body["messages"][-1]
    assert answer["role"] == "assistant"
    assert answer["status"] == "stopped"
    kept = stored_text(answer)
    assert kept  # the partial answer is kept…
    assert len(kept.split()) < 900  # …and it is partial
    # What the terminal showed is what was kept: nothing lost, nothing doubled (`^C` is the
    # terminal's echo of the key).
    assert squash(answers(transcript(child).replace("^C", ""))[0]) == squash(kept)

    # The chat goes on in the same session after a stop.
    child.sendline("and now a short one [[tokens:5]]")
    child.expect_exact("claude> ")
    child.expect_exact(PROMPT)
    assert len(wait_idle(api, session_id)["messages"]) == 4
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_reattach_prints_the_answer_so_far_and_continues_live(
    service: ServerProcess, api: httpx.Client, clean_env: dict[str, str], home: Path
) -> None:
    session_id = new_session(api)
    send(api, session_id, "first [[tokens:4]]")
    wait_idle(api, session_id)
    send(api, session_id, "second, long [[tokens:300]]")  # 5 s at the test pace
    # Attach once the answer is visibly under way (text on the stream), still running.
    deadline = time.monotonic() + 20
    while (
        "TEXT_MESSAGE_CONTENT"
        not in api.get(f"/v1/stream/sessions/{session_id}", params={"offset": "-1"}).text.split(
            "second, long"
        )[-1]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert api.get(f"/v1/sessions/{session_id}").json()["active_generation_id"] is not None

    # With colour this time: the client dims thinking on a terminal.
    env = {k: v for k, v in clean_env.items() if k != "NO_COLOR"}
    env["STREAMS_URL"] = service.base_url
    child = start(["--session", session_id], env, home)
    child.expect_exact(session_id)
    child.expect_exact("second, long [[tokens:300]]")
    child.expect_exact("claude> ")  # the running answer's label (the first one's came before)
    child.expect_exact(PROMPT)

    body = wait_idle(api, session_id)
    raw = child.logfile_read.getvalue()
    assert "\x1b[2m[thinking] " in raw
    printed = answers(transcript(child))
    # The whole transcript: both answers, each exactly as stored, once.
    assert printed == [stored_text(m) for m in body["messages"] if m["role"] == "assistant"]
    assert len(printed[1].split()) > 100
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

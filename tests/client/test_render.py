"""The terminal printer on the service's own record shapes: printed as it grows, it shows the
same as printed once at the end, and model text cannot carry terminal escapes."""

from __future__ import annotations

import io
from typing import Any

from console.stream import Transcript
from streams_service.client.render import Screen, TranscriptPrinter, clean
from streams_service.sessions.records import chunk_record, event, user_message_record

NOW = "2026-11-26T00:00:00Z"


def assistant(seq: int, chunk: dict[str, Any]) -> dict[str, Any]:
    return chunk_record(
        message_id="m2", actor_id="claude", role="assistant", seq=seq, chunk=chunk, created_at=NOW
    )


def records() -> list[dict[str, Any]]:
    call = "toolu_1"
    chunks = [
        event("RUN_STARTED", runId="g1", threadId="s1"),
        event("STEP_STARTED", stepId="thinking-1", stepType="thinking"),
        event("STEP_FINISHED", stepId="thinking-1", delta="Let me"),
        event("STEP_FINISHED", stepId="thinking-1", delta=" think.\nSecond line."),
        event("TEXT_MESSAGE_START", messageId="m2", role="assistant"),
        event("TEXT_MESSAGE_CONTENT", messageId="m2", delta="I'll "),
        event("TEXT_MESSAGE_CONTENT", messageId="m2", delta="look\x1b[2J it up."),
        event("TOOL_CALL_START", toolCallId=call, toolName="search_my_history"),
        event("TOOL_CALL_ARGS", toolCallId=call, delta='{"query": '),
        event("TOOL_CALL_ARGS", toolCallId=call, delta='"x"}'),
        event("TOOL_CALL_END", toolCallId=call, toolName="search_my_history", input={"query": "x"}),
        event(
            "CUSTOM",
            name="approval-requested",
            data={"toolCallId": call, "approval": {"id": call, "needsApproval": True}},
        ),
        event("CUSTOM", name="approval-responded", data={"toolCallId": call, "approved": True}),
        event("TOOL_CALL_END", toolCallId=call, result="1. found\n2. more", isError=False),
        event("TEXT_MESSAGE_CONTENT", messageId="m2", delta="\n\nDone"),
        event("TEXT_MESSAGE_CONTENT", messageId="m2", delta=", twice."),
        event("RUN_FINISHED", runId="g1", finishReason="stopped"),
    ]
    user = user_message_record(
        message_id="m1",
        actor_id="local",
        parts=[{"type": "text", "content": "find \x1b]0;title\x07x"}],
        created_at=NOW,
    )
    return [user] + [assistant(i, c) for i, c in enumerate(chunks)]


def printed(step_by_step: bool) -> str:
    out = io.StringIO()
    printer = TranscriptPrinter(Screen(out, color=False, err=io.StringIO()))
    transcript = Transcript()
    for record in records():
        transcript.apply(record)
        if step_by_step:
            printer.update(transcript.visible)
    printer.update(transcript.visible)
    printer.update(transcript.visible)  # nothing new: prints nothing
    return out.getvalue()


EXPECTED = """\
you> find x
claude> [thinking] Let me think.
[thinking] Second line.
I'll look it up.
[tool] search_my_history {"query": "x"}
[tool] waiting for approval (answer it in `chatops chat` or the console)
[tool] approved
[tool result] 1. found
    2. more


Done, twice.
[stopped]
"""


def test_live_and_final_printing_agree() -> None:
    assert printed(step_by_step=True) == EXPECTED
    # Printed at once (a reload), the pending approval is already answered: no waiting line.
    assert printed(step_by_step=False) == EXPECTED.replace(
        "[tool] waiting for approval (answer it in `chatops chat` or the console)\n", ""
    )


def test_clean_drops_escapes_and_controls_but_keeps_text() -> None:
    assert clean("a\x1b[31mred\x1b[0m b") == "ared b"
    assert clean("\x1b]8;;https://evil\x1b\\link\x1b]8;;\x1b\\") == "link"
    assert clean("tab\tnew\nline\r\x07\x9b2J\u202eevil") == "tab\tnew\nlineevil"
    assert clean("naïve — 日本語 ✓") == "naïve — 日本語 ✓"

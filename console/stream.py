"""Follow a session stream and materialize its messages, the way the service does (DESIGN §2).

A session stream holds State-Protocol records: `chunk` rows (a user's `whole-message`, or one AG-UI
event of an assistant message, as a JSON string in `value.chunk`) and `session` rows (metadata
upserts). `Transcript.apply` turns them into messages with the same `parts` the service stores in
`chat_messages` (text, thinking, tool-call, tool-result), so a live answer and a reloaded one look
alike.

`SessionFollower` keeps the offset *with* the transcript: one page of records and the offset after
it are applied together, in plain Python with no Streamlit call in between, so a rerun that
interrupts a tick can never apply a page twice or skip one (no gap, no double).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from console.client import StreamPage

START = "-1"

# Message status after a terminal event, as the service stores it (generation._persist).
_STATUS_BY_FINISH = {"stopped": "stopped", "budget": "stopped"}


@dataclass
class Message:
    id: str
    role: str
    parts: list[dict[str, Any]] = field(default_factory=list)
    # streaming | complete | stopped | error | interrupted | superseded
    status: str = "streaming"
    run_id: str | None = None
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    created_at: str | None = None

    @property
    def text(self) -> str:
        return "".join(p.get("content", "") for p in self.parts if p.get("type") == "text")

    @property
    def pending_approvals(self) -> list[dict[str, Any]]:
        """Tool calls of a running answer that wait for the user's Approve / Deny."""
        if self.status != "streaming":
            return []
        return [
            p
            for p in self.parts
            if p.get("type") == "tool-call" and p.get("state") == "approval-requested"
        ]


class Transcript:
    """The messages of one session, built record by record."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._by_id: dict[str, Message] = {}
        self.session: dict[str, Any] = {}
        self._running: set[str] = set()
        self._finished: set[str] = set()
        self._steps: dict[tuple[str, str], dict[str, Any]] = {}
        self.records_seen = 0

    # -- queries

    @property
    def visible(self) -> list[Message]:
        return [m for m in self.messages if m.status != "superseded"]

    @property
    def running(self) -> bool:
        return bool(self._running)

    def finished(self, run_id: str) -> bool:
        return run_id in self._finished

    def started(self, run_id: str) -> bool:
        return run_id in self._running or run_id in self._finished

    def get(self, message_id: str) -> Message | None:
        return self._by_id.get(message_id)

    # -- building

    def apply(self, record: Any) -> None:
        self.records_seen += 1
        if not isinstance(record, dict):
            return
        kind = record.get("type")
        value = record.get("value")
        if not isinstance(value, dict):
            return
        if kind == "session":
            self.session.update({k: v for k, v in value.items() if k != "sessionId"})
            return
        if kind != "chunk":
            return
        try:
            chunk = json.loads(value.get("chunk") or "{}")
        except (TypeError, ValueError):
            return
        if not isinstance(chunk, dict):
            return
        if chunk.get("type") == "whole-message":
            self._whole_message(chunk.get("message"))
            return
        message_id = value.get("messageId")
        if not isinstance(message_id, str):
            return
        message = self._message(message_id, str(value.get("role") or "assistant"))
        if message.created_at is None:
            message.created_at = value.get("createdAt")
        self._event(message, chunk)

    def _message(self, message_id: str, role: str) -> Message:
        message = self._by_id.get(message_id)
        if message is None:
            message = Message(id=message_id, role=role)
            self._by_id[message_id] = message
            self.messages.append(message)
        return message

    def add_stored(
        self,
        message_id: str,
        role: str,
        parts: list[dict[str, Any]],
        status: str,
        created_at: datetime | None,
    ) -> None:
        """A message as the service stored it (`GET /v1/sessions/{id}`), not from the stream."""
        message = self._message(message_id, role)
        message.parts = [dict(p) for p in parts]
        message.status = status
        message.created_at = created_at.isoformat() if created_at else None

    def _whole_message(self, raw: Any) -> None:
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            return
        message = self._message(raw["id"], str(raw.get("role") or "user"))
        message.parts = [p for p in raw.get("parts") or [] if isinstance(p, dict)]
        message.status = "complete"
        message.created_at = raw.get("createdAt")

    def _event(self, m: Message, e: dict[str, Any]) -> None:
        kind = e.get("type")
        if kind == "RUN_STARTED":
            m.run_id = e.get("runId")
            m.status = "streaming"
            if m.run_id:
                self._running.add(m.run_id)
        elif kind == "TEXT_MESSAGE_CONTENT":
            delta = str(e.get("delta") or "")
            last = m.parts[-1] if m.parts else None
            # A new text part after anything else, as the service starts one per text block
            # (its later blocks begin with the "\n\n" it streams).
            if last is not None and last.get("type") == "text":
                last["content"] = last.get("content", "") + delta
            else:
                m.parts.append({"type": "text", "content": delta})
        elif kind == "STEP_STARTED" and e.get("stepType", "thinking") == "thinking":
            self._thinking(m, e.get("stepId"))
        elif kind == "STEP_FINISHED":
            part = self._thinking(m, e.get("stepId"))
            part["content"] = part.get("content", "") + str(e.get("delta") or "")
        elif kind == "TOOL_CALL_START":
            m.parts.append(
                {
                    "type": "tool-call",
                    "id": e.get("toolCallId"),
                    "name": e.get("toolName"),
                    "arguments": "",
                    "state": "input-streaming",
                }
            )
        elif kind == "TOOL_CALL_ARGS":
            call = self._tool_call(m, e.get("toolCallId"))
            if call is not None:
                call["arguments"] = call.get("arguments", "") + str(e.get("delta") or "")
        elif kind == "TOOL_CALL_END":
            self._tool_end(m, e)
        elif kind == "CUSTOM":
            self._custom(m, e)
        elif kind == "RUN_FINISHED":
            reason = e.get("finishReason")
            m.finish_reason = reason
            m.usage = e.get("usage")
            m.status = _STATUS_BY_FINISH.get(str(reason), "complete")
            self._end_run(m, e.get("runId"))
        elif kind == "RUN_ERROR":
            raw_error = e.get("error")
            error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
            m.error = error
            m.status = "interrupted" if error.get("code") == "interrupted" else "error"
            self._end_run(m, e.get("runId"))

    def _end_run(self, m: Message, run_id: Any) -> None:
        run = run_id if isinstance(run_id, str) else m.run_id
        if run:
            self._running.discard(run)
            self._finished.add(run)

    def _thinking(self, m: Message, step: Any) -> dict[str, Any]:
        # Steps are tracked beside the parts: the service's stored parts carry no step id.
        key = (m.id, str(step))
        part = self._steps.get(key)
        if part is None:
            part = {"type": "thinking", "content": ""}
            self._steps[key] = part
            m.parts.append(part)
        return part

    def _tool_call(self, m: Message, call_id: Any) -> dict[str, Any] | None:
        for part in reversed(m.parts):
            if part.get("type") == "tool-call" and part.get("id") == call_id:
                found: dict[str, Any] = part
                return found
        return None

    def _tool_end(self, m: Message, e: dict[str, Any]) -> None:
        call = self._tool_call(m, e.get("toolCallId"))
        if "result" in e:
            # The tool ran (or was refused): its output, as the service records it.
            content = str(e.get("result") or "")
            denied = call is not None and (call.get("approval") or {}).get("approved") is False
            if call is not None:
                call["output"] = content
            m.parts.append(
                {
                    "type": "tool-result",
                    "toolCallId": e.get("toolCallId"),
                    "content": content,
                    "state": "error" if denied else "complete",
                }
            )
        elif call is not None:
            call["arguments"] = json.dumps(e.get("input", {}))
            call["state"] = "input-complete"

    def _custom(self, m: Message, e: dict[str, Any]) -> None:
        name = e.get("name")
        raw_data = e.get("data")
        data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
        if name == "approval-requested":
            call = self._tool_call(m, data.get("toolCallId"))
            if call is not None:
                call["state"] = "approval-requested"
                call["approval"] = dict(data.get("approval") or {"id": data.get("toolCallId")})
        elif name == "approval-responded":
            call = self._tool_call(m, data.get("toolCallId"))
            if call is not None:
                call["state"] = "approval-responded"
                approval = call.setdefault("approval", {"id": data.get("toolCallId")})
                approval["approved"] = bool(data.get("approved"))
        elif name == "message-superseded":
            target = self._by_id.get(str(data.get("messageId") or m.id))
            if target is not None:
                target.status = "superseded"


class StreamReader(Protocol):
    """What the follower needs from the HTTP client (console.client.ServiceClient has it)."""

    def read_stream(self, session_id: str, offset: str, *, timeout: float = ...) -> StreamPage: ...

    def follow_stream(
        self, session_id: str, offset: str, *, timeout: float = ...
    ) -> Iterator[StreamPage]: ...


class SessionFollower:
    """One session's transcript and the stream offset it was built up to."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.offset = START
        self.transcript = Transcript()
        self.closed = False
        # A generation this tab started that has not shown up on the stream yet: the answer is
        # "live" from the moment the send is accepted, not only from its RUN_STARTED.
        self.awaiting: str | None = None
        self.reads = 0

    @property
    def live(self) -> bool:
        return self.transcript.running or self.awaiting is not None

    def expect(self, generation_id: str) -> None:
        if not self.transcript.finished(generation_id):
            self.awaiting = generation_id

    def apply(self, page: StreamPage) -> int:
        """Apply one page and move to the offset after it (together). Returns records applied."""
        for record in page.records:
            self.transcript.apply(record)
        self.offset = page.next_offset
        self.closed = self.closed or page.closed
        self.reads += 1
        if self.awaiting is not None and self.transcript.finished(self.awaiting):
            self.awaiting = None
        return len(page.records)

    def catch_up(self, reader: StreamReader, *, timeout: float = 5.0) -> int:
        """Read from the kept offset to the current end (a short request, never a wait)."""
        if self.closed:
            return 0
        return self.apply(reader.read_stream(self.session_id, self.offset, timeout=timeout))

    def load_history(self, messages: list[Any]) -> None:
        """The transcript from the session's stored messages (`MessageInfo`s), when its stream
        is gone: retention removes the stream of an ended session and keeps its messages. Nothing
        more can arrive, so the follower is closed."""
        self.transcript = Transcript()
        for m in messages:
            self.transcript.add_stored(m.id, m.role, m.parts, m.status, m.created_at)
        self.closed = True

    def settle(self, active_generation_id: str | None) -> None:
        """Align with the generation the service says runs (read *before* the last catch-up,
        so the stream is at least as new as that answer): one we do not see finished is awaited
        (another tab may have started it); one we waited for that is neither running nor on the
        stream has gone."""
        active = active_generation_id
        if active is not None and not self.transcript.finished(active):
            self.awaiting = active
        elif (
            self.awaiting is not None
            and active != self.awaiting
            and not self.transcript.started(self.awaiting)
        ):
            self.awaiting = None

    def follow(self, reader: StreamReader, *, timeout: float = 60.0) -> Iterator[int]:
        """Catch up, then follow live with long-polls until the stream closes. Yields the
        number of records each page applied. For blocking callers (CLI, tests)."""
        for page in reader.follow_stream(self.session_id, self.offset, timeout=timeout):
            yield self.apply(page)
            if self.closed:
                return

"""`chatops chat`: an interactive chat in the terminal on a durable session.

The answer is read from the session's stream, not from the request that started it, so
attaching to a session whose answer is still being written shows it so far and continues live
from the same offset. Ctrl-C during an answer stops the generation (its partial answer is
kept); Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from typing import Any, TextIO

from console.client import (
    Conflict,
    Forbidden,
    MessageInfo,
    NotFound,
    ServiceError,
    SessionInfo,
    Unauthorized,
)
from console.stream import Message, SessionFollower
from streams_service.client.follow import Interrupts, LiveFollow
from streams_service.client.http import CliClient, transient
from streams_service.client.render import USER_LABEL, Screen, TranscriptPrinter, clean, one_line


def as_messages(items: list[MessageInfo]) -> list[Message]:
    """Stored messages in the follower's shape, so both print alike."""
    return [
        Message(
            id=mi.id,
            role=mi.role,
            parts=mi.parts,
            # A stored message is final; only the stream has an answer in progress.
            status="complete" if mi.status == "streaming" else mi.status,
            created_at=mi.created_at.isoformat() if mi.created_at else None,
        )
        for mi in items
    ]


def describe_session(info: SessionInfo) -> str:
    title = one_line(info.title, 60) if info.title else "untitled"
    simulated = " (simulated)" if info.simulated else ""
    return f"session {info.id} · {title} · {one_line(info.model, 40)}{simulated}"


class Chat:
    def __init__(
        self,
        client: CliClient,
        screen: Screen,
        interrupts: Interrupts,
        *,
        model: str | None = None,
        stdin: TextIO | None = None,
    ) -> None:
        self.client = client
        self.screen = screen
        self.interrupts = interrupts
        self.model = model
        self.stdin = stdin or sys.stdin
        self.printer = TranscriptPrinter(screen, approval_hint=False)
        self.follower: SessionFollower | None = None
        self._asked: set[str] = set()

    def notice(self, text: str) -> None:
        self.screen.notice(text)

    # -- the loop

    def run(self, session_id: str | None) -> int:
        if session_id is None:
            info = self.client.create_session(model=self.model)
        else:
            info = self.client.get_session(session_id)
        self.notice(describe_session(info))
        if info.ended_at is not None:
            self.printer.update(as_messages(info.messages or []))
            self.notice(
                "this session has ended and is read-only (fork it in the console to continue)"
            )
            return 1
        self.notice("Ctrl-C stops an answer · Ctrl-D or Ctrl-C at the prompt leaves")
        self.follower = SessionFollower(info.id)
        while True:
            if not self._sync():
                return 1
            if self.follower.live:
                self._answer()
                continue
            line = self._read(USER_LABEL)
            if line is None:
                return 0
            if line.strip():
                self._send(line)

    def _sync(self) -> bool:
        """Print whatever the stream holds beyond our offset (another tab's messages too)
        and learn whether an answer runs. The session is read before the stream, so the
        stream is at least as new as what the session says (SessionFollower.settle)."""
        assert self.follower is not None
        info = self.client.get_session(self.follower.session_id)
        self.follower.catch_up(self.client)
        self._show()
        if info.ended_at is not None:
            self.notice(
                "this session has ended and is read-only (fork it in the console to continue)"
            )
            return False
        self.follower.settle(info.active_generation_id)
        return True

    def _show(self) -> None:
        assert self.follower is not None
        self.printer.update(self.follower.transcript.visible)

    def _send(self, line: str) -> None:
        assert self.follower is not None
        try:
            accepted = self.client.send_message(
                self.follower.session_id,
                line,
                model=self.model,
                client_message_id=str(uuid.uuid4()),
            )
        except (Unauthorized, Forbidden, NotFound):
            raise
        except Conflict as exc:
            # Another tab's answer is running: say so; the next sync follows it.
            self.notice(f"[{exc.detail}]")
            return
        except ServiceError as exc:
            # Too long, over budget, rate limited, draining: the chat goes on.
            self.notice(f"[not sent: {exc.detail}]")
            return
        # The terminal shows what was typed already; the stream's copy is not printed again.
        self.printer.skip([accepted.message_id])
        self.follower.expect(accepted.generation_id)

    # -- following an answer

    def _answer(self) -> None:
        assert self.follower is not None
        live = LiveFollow(
            self.client, self.follower, interrupts=self.interrupts, notice=self.notice
        )
        stopping = False
        while self.follower.live and not self.follower.closed:
            try:
                if live.step():
                    self._show()
                    self._approvals()
                elif self._lost():
                    return
            except KeyboardInterrupt:
                if stopping:
                    raise
                stopping = True
                self._stop()

    def _lost(self) -> bool:
        """After an empty round: is the answer we wait for still coming? (One that never
        started and no longer runs was refused or lost; stop waiting for it.)"""
        assert self.follower is not None
        awaiting = self.follower.awaiting
        if awaiting is None or self.follower.transcript.started(awaiting):
            return False
        try:
            return not self._sync()
        except ServiceError as exc:
            if transient(exc):
                return False
            raise

    def _stop(self) -> None:
        assert self.follower is not None
        self.notice("[stopping…]")
        try:
            with self.interrupts.waiting():
                self.client.stop(self.follower.session_id)
        except Conflict:
            pass  # it had already ended; its last events are on the stream
        except ServiceError as exc:
            if not transient(exc):
                raise
            self.notice(f"[could not stop the answer: {exc.detail}]")

    def _approvals(self) -> None:
        assert self.follower is not None
        for message in self.follower.transcript.visible:
            for call in message.pending_approvals:
                call_id = str(call.get("id"))
                if call_id in self._asked:
                    continue
                self._asked.add(call_id)
                self._approve(call_id, call)

    def _approve(self, call_id: str, call: dict[str, Any]) -> None:
        assert self.follower is not None
        name = one_line(str(call.get("name") or "the tool"), 80)
        answer = self._read(f"allow {name} to run? [y/N] ")
        approved = (answer or "").strip().lower() in ("y", "yes")
        try:
            with self.interrupts.waiting():
                self.client.approve(self.follower.session_id, call_id, approved)
        except NotFound:
            self.notice("[that tool call no longer waits: answered elsewhere or timed out]")

    # -- the keyboard

    def _read(self, prompt: str) -> str | None:
        """A line from the user; None for Ctrl-D (and Ctrl-C at the prompt).

        Ctrl-C while asking for an approval is a stop: the caller's handler sees it."""
        self.screen.newline()
        at_prompt = prompt == USER_LABEL
        try:
            with self.interrupts.waiting():
                line = input(prompt)
        except EOFError:
            line = None
        except KeyboardInterrupt:
            if not at_prompt:
                self.screen.out.write("\n")  # off the approval question's line
                raise
            line = None
        if line is None or not self.stdin.isatty():
            # A pipe does not echo the line (shown here, so a log reads like the screen), nor
            # does Ctrl-D end it: end the prompt's line.
            self.screen.out.write(f"{clean(line or '')}\n")
            self.screen.out.flush()
        return line


def run_chat(client: CliClient, session_id: str | None, model: str | None) -> int:
    screen = Screen(sys.stdout)
    if sys.stdin.isatty():
        # Line editing and history for input(); absent on some platforms.
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
    with Interrupts() as interrupts:
        return Chat(client, screen, interrupts, model=model).run(session_id)

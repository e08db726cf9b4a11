"""Terminal output: a session's messages printed as they grow, and tables.

Model and user text reach the terminal only through `clean`, which drops escape sequences and
control characters: a message (or a tool result, or a title) must not be able to move the
cursor, rewrite earlier lines, retitle the window or smuggle a hyperlink.

`TranscriptPrinter` prints the difference between what it printed before and the messages
now (the console's `Transcript` materializes them), so a page applied twice could never print
twice and the screen always matches the stream up to the follower's offset.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from console.stream import Message

# CSI (7- and 8-bit), OSC (to BEL or ST), and two-character escapes.
_ESCAPES = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])|\x9b[0-?]*[ -/]*[@-~]"
)
# C0 except tab and newline, DEL, C1 (8-bit CSI among them), and the bidi overrides that
# reorder what is shown.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")

_STYLES = {"dim": "\x1b[2m", "bold": "\x1b[1m", "red": "\x1b[31m"}
_RESET = "\x1b[0m"

USER_LABEL = "you> "
ASSISTANT_LABEL = "claude> "
THINKING_PREFIX = "[thinking] "
TOOL_RESULT_MAX_CHARS = 400
TOOL_RESULT_MAX_LINES = 6
ARGUMENTS_MAX_CHARS = 200


def clean(text: str) -> str:
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def one_line(text: str, limit: int) -> str:
    flat = " ".join(clean(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def use_color(out: TextIO) -> bool:
    # https://no-color.org: any non-empty NO_COLOR turns colour off.
    return out.isatty() and not os.environ.get("NO_COLOR")


def _same_file(a: TextIO, b: TextIO) -> bool:
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class Screen:
    """Writes to a terminal (or a pipe), knowing whether the cursor is at a line start."""

    def __init__(
        self, out: TextIO, *, color: bool | None = None, err: TextIO | None = None
    ) -> None:
        self.out = out
        self.err = err or sys.stderr
        self.color = use_color(out) if color is None else color
        self.at_line_start = True
        self._after_label = False
        self._shared = _same_file(out, self.err)

    def _emit(self, text: str, style: str | None = None) -> None:
        if style and self.color:
            # Styled per piece and reset at once: an interrupted answer never leaves the
            # terminal dimmed.
            text = f"{_STYLES[style]}{text}{_RESET}"
        self.out.write(text)

    def write(self, text: str, *, style: str | None = None, prefix: str | None = None) -> None:
        """Text already cleaned; `prefix` starts every line it begins."""
        for piece in re.split(r"(\n)", text):
            if not piece:
                continue
            if piece == "\n":
                self._emit("\n")
                self.at_line_start, self._after_label = True, False
                continue
            if prefix and (self.at_line_start or self._after_label):
                self._emit(prefix, style)
            self._emit(piece, style)
            self.at_line_start, self._after_label = False, False
        self.out.flush()

    def label(self, text: str) -> None:
        self.newline()
        self._emit(text, "bold")
        self.out.flush()
        self.at_line_start, self._after_label = False, True

    def newline(self) -> None:
        if not self.at_line_start:
            self._emit("\n")
            self.out.flush()
        self.at_line_start, self._after_label = True, False

    def notice(self, text: str) -> None:
        """A status line on stderr. On a terminal both share, it starts on a line of its own;
        when stdout goes elsewhere its text is left exactly as the stream had it."""
        if self._shared:
            self.newline()
        print(text, file=self.err, flush=True)

    def line(self, text: str, style: str | None = None) -> None:
        self.newline()
        self.write(text, style=style)
        self.newline()


@dataclass
class _Progress:
    started: bool = False
    part: int = 0  # the part being printed
    chars: int = 0  # characters of that part printed so far
    done: bool = False
    # Tool call id -> what has been said about its approval ("requested", "responded").
    approvals: dict[str, set[str]] = field(default_factory=dict)


class TranscriptPrinter:
    """Prints messages incrementally: each call prints only what is new since the last."""

    def __init__(self, screen: Screen, *, approval_hint: bool = True) -> None:
        self.screen = screen
        # Whether to say that a tool call waits for approval (chat asks instead).
        self.approval_hint = approval_hint
        self._progress: dict[str, _Progress] = {}

    def skip(self, message_ids: Iterable[str]) -> None:
        """Never print these (the message this terminal just typed, older history)."""
        for message_id in message_ids:
            self._progress[message_id] = _Progress(done=True)

    def update(self, messages: Sequence[Message]) -> None:
        for m in messages:
            p = self._progress.setdefault(m.id, _Progress())
            if p.done:
                continue
            if m.status == "superseded":
                if p.started:
                    self.screen.line("[replaced by a regenerated answer]", "dim")
                p.done = True
                continue
            if not p.started:
                self.screen.label(USER_LABEL if m.role == "user" else ASSISTANT_LABEL)
                p.started = True
            self._parts(m, p)
            if m.status != "streaming":
                self._footer(m)
                p.done = True

    def _parts(self, m: Message, p: _Progress) -> None:
        streaming = m.status == "streaming" and m.role != "user"
        while p.part < len(m.parts):
            self._approvals(m, p)
            part = m.parts[p.part]
            growing = streaming and p.part == len(m.parts) - 1
            kind = part.get("type")
            if kind in ("text", "thinking"):
                content = str(part.get("content") or "")
                new = content[p.chars :]
                p.chars = len(content)
                if kind == "thinking":
                    self.screen.write(clean(new), style="dim", prefix=THINKING_PREFIX)
                else:
                    self.screen.write(clean(new))
                if growing:
                    return
                if kind == "thinking":
                    self.screen.newline()
            elif kind == "tool-call":
                if growing and part.get("state") == "input-streaming":
                    return
                self._tool_call(part)
            elif kind == "tool-result":
                self._tool_result(part)
            else:
                name = part.get("name") or part.get("filename") or ""
                self.screen.write(clean(f"[{kind}{' ' + str(name) if name else ''}]"), style="dim")
            p.part += 1
            p.chars = 0
        self._approvals(m, p)

    def _tool_call(self, part: dict[str, Any]) -> None:
        args = one_line(str(part.get("arguments") or ""), ARGUMENTS_MAX_CHARS)
        self.screen.line(f"[tool] {one_line(str(part.get('name') or '?'), 80)} {args}", "dim")

    def _tool_result(self, part: dict[str, Any]) -> None:
        content = clean(str(part.get("content") or ""))
        lines = content.splitlines()
        short = "\n".join(lines[:TOOL_RESULT_MAX_LINES])[:TOOL_RESULT_MAX_CHARS]
        if short != content:
            short += " …"
        label = "[tool error] " if part.get("state") == "error" else "[tool result] "
        self.screen.newline()
        self.screen.write(label, style="dim")
        self.screen.write(short, style="dim", prefix="    ")
        self.screen.newline()

    def _approvals(self, m: Message, p: _Progress) -> None:
        for part in m.parts[: p.part]:
            if part.get("type") != "tool-call":
                continue
            said = p.approvals.setdefault(str(part.get("id")), set())
            approval = part.get("approval") or {}
            if (
                self.approval_hint
                and part.get("state") == "approval-requested"
                and m.status == "streaming"
                and "requested" not in said
            ):
                self.screen.line(
                    "[tool] waiting for approval (answer it in `chatops chat` or the console)",
                    "dim",
                )
                said.add("requested")
            if "approved" in approval and "responded" not in said:
                verdict = "approved" if approval["approved"] else "denied"
                self.screen.line(f"[tool] {verdict}", "dim")
                said.add("responded")

    def _footer(self, m: Message) -> None:
        if m.status == "stopped":
            reason = " (budget reached)" if m.finish_reason == "budget" else ""
            self.screen.line(f"[stopped{reason}]", "dim")
        elif m.status == "interrupted":
            self.screen.line("[interrupted]", "dim")
        elif m.status == "error":
            detail = (m.error or {}).get("message")
            text = f"[error] {one_line(str(detail), 300)}" if detail else "[error]"
            self.screen.line(text, "red")
        else:
            self.screen.newline()


def table(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    cells = [header] + [[clean(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
    out.flush()

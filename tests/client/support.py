"""Running the `chatops` client as users do: a subprocess on pipes, or on a pseudo terminal."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pexpect

from tests.support import chatops_bin

ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# Lines the client adds around an answer (status notices and footers), not answer text.
MARKERS = ("[stopping…]", "[stopped]", "[reconnected]", "[connection lost")


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def run_cli(args: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 60) -> CliRun:
    result = subprocess.run(
        [str(chatops_bin()), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return CliRun(result.returncode, result.stdout, result.stderr)


def plain(text: str) -> str:
    """Terminal output as text: no colour codes, no carriage returns."""
    return ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "")


def answer_text(block: str) -> str:
    """The answer text of one printed assistant message (from just after its `claude> `
    label): thinking lines, tool lines and status lines are not part of it."""
    lines = [
        line for line in block.split("\n") if not line.startswith(("[thinking]", "[tool", *MARKERS))
    ]
    return "\n".join(lines).strip()


def answers(output: str) -> list[str]:
    """Each assistant message's printed text, in order, up to the next `you> `."""
    found = []
    for chunk in plain(output).split("claude> ")[1:]:
        found.append(answer_text(chunk.split("you> ")[0]))
    return found


def squash(text: str) -> str:
    """Text without whitespace: a status line may break a line where the stream had none."""
    return "".join(text.split())


def spawn_chat(args: list[str], *, env: dict[str, str], cwd: Path) -> pexpect.spawn:
    child = pexpect.spawn(
        str(chatops_bin()),
        ["chat", *args],
        env=env,
        cwd=str(cwd),
        encoding="utf-8",
        timeout=30,
        dimensions=(50, 400),
    )
    return child


def transcript(child: pexpect.spawn) -> str:
    """Everything the terminal showed so far (pexpect's `before` + `after` of each match)."""
    log = child.logfile_read
    assert log is not None
    return plain(log.getvalue())


class Output:
    """A stream of a subprocess, collected by a thread so the test can wait for text."""

    def __init__(self, stream: IO[str]) -> None:
        self._parts: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for chunk in iter(lambda: stream.read(1), ""):
            with self._lock:
                self._parts.append(chunk)

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self._parts)

    def wait_for(self, check: Callable[[str], bool], timeout_s: float = 30, what: str = "") -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text
            if check(text):
                return text
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {text[-2000:]!r}"
            time.sleep(0.05)

    def join(self, timeout_s: float = 10) -> str:
        self._thread.join(timeout_s)
        return self.text

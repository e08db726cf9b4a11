"""Process helpers of the console tests (also used by scripts/console_screenshots.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, free_port, tail, terminate

APP = str(REPO_ROOT / "app.py")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


class ConsoleProcess:
    """`streamlit run app.py` on a free loopback port, talking to `streams_url`."""

    def __init__(
        self, streams_url: str, log_dir: Path, *, cwd: Path = REPO_ROOT, **env: str
    ) -> None:
        # cwd holds the .streamlit/ folder Streamlit reads (config, and secrets for sign-in).
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "console.log"
        self.env = {**os.environ, "STREAMS_URL": streams_url, **env}
        if "STREAMS_SECRET" not in env:
            self.env.pop("STREAMS_SECRET", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsoleProcess:
        cmd = [
            sys.executable, "-m", "streamlit", "run", APP,
            "--server.port", str(self.port),
            "--server.address", "127.0.0.1",
            "--server.headless", "true",
            "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"streamlit exited early:\n{tail(self.log)}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        pytest.fail(f"streamlit was not ready within 30s:\n{tail(self.log)}", pytrace=False)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)

    def __enter__(self) -> ConsoleProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

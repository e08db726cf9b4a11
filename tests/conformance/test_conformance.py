"""The public Durable Streams conformance suite against a real `chatops serve` process.

`@durable-streams/server-conformance-tests` 0.3.6 (installed under conformance/ by `make node`)
runs through vitest against the server on SQLite and on Postgres; the bar is every test the suite
runs (332; 6 more are skipped by the suite itself) passing.

The reference Node server runs beside ours in `make bench` (benchmarks/), which also records
its conformance result (326 passed, 6 failed with this suite version).

Set CONFORMANCE_FAILURES_DIR to also write `conformance-failures-<backend>.txt` there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE_DIR = REPO_ROOT / "conformance"
VITEST_ENTRY = CONFORMANCE_DIR / "node_modules" / "vitest" / "vitest.mjs"

EXPECTED_PASSED = 332
LONG_POLL_TIMEOUT_MS = 500
STARTUP_TIMEOUT_S = 30.0
SUITE_TIMEOUT_S = 540.0

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "<no output>"
    return text[-limit:] if text else "<empty>"


def _terminate(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited within the grace period."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait(timeout=grace_s)


@contextmanager
def _server(
    cmd: list[str], env: dict[str, str], log_dir: Path, name: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """Runs `cmd` in its own process group with output in log files; always stops it."""
    stdout_path = log_dir / f"{name}.stdout.log"
    stderr_path = log_dir / f"{name}.stderr.log"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        yield proc, stdout_path, stderr_path
    finally:
        _terminate(proc)


def _wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    stdout_path: Path,
    stderr_path: Path,
    what: str,
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"{what} exited with code {proc.returncode} before it was ready.\n"
                f"--- stderr ---\n{_tail(stderr_path)}\n--- stdout ---\n{_tail(stdout_path)}",
                pytrace=False,
            )
        if ready():
            return
        time.sleep(0.1)
    pytest.fail(
        f"{what} was not ready within {STARTUP_TIMEOUT_S:.0f}s.\n"
        f"--- stderr ---\n{_tail(stderr_path)}\n--- stdout ---\n{_tail(stdout_path)}",
        pytrace=False,
    )


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, OSError):
        return False


def _run_suite(base_url: str, out_dir: Path) -> dict[str, Any]:
    """Runs the conformance suite with vitest's JSON reporter and returns the parsed report."""
    report_path = out_dir / "conformance-report.json"
    log_path = out_dir / "vitest.log"
    env = {
        **os.environ,
        "CONFORMANCE_TEST_URL": base_url,
        "CONFORMANCE_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_TIMEOUT_MS),
        "NO_COLOR": "1",
        "CI": "1",
    }
    cmd = [
        "node",
        str(VITEST_ENTRY),
        "run",
        "conformance.test.mjs",
        "--reporter=json",
        f"--outputFile={report_path}",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=CONFORMANCE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=SUITE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _terminate(proc, grace_s=5.0)
            pytest.fail(
                f"vitest did not finish within {SUITE_TIMEOUT_S:.0f}s:\n{_tail(log_path)}",
                pytrace=False,
            )
        finally:
            _terminate(proc, grace_s=5.0)
    if not report_path.exists():
        pytest.fail(
            f"vitest (exit {proc.returncode}) wrote no JSON report; output:\n{_tail(log_path)}",
            pytrace=False,
        )
    report: dict[str, Any] = json.loads(report_path.read_text())
    return report


def _failures(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(full name, failure messages) of every failed test, plus files that failed to load."""
    failed: list[tuple[str, str]] = []
    for file_result in report.get("testResults", []):
        assertions = file_result.get("assertionResults", [])
        if file_result.get("status") == "failed" and file_result.get("message"):
            failed.append((f"<file {file_result.get('name')}>", file_result["message"]))
        for assertion in assertions:
            if assertion.get("status") == "failed":
                messages = "\n".join(assertion.get("failureMessages") or ["<no message>"])
                failed.append((assertion.get("fullName", assertion.get("title", "?")), messages))
    return failed


def _first_line(message: str) -> str:
    for line in message.splitlines():
        if line.strip():
            return line.strip()[:300]
    return "<no message>"


def _counts(report: dict[str, Any]) -> str:
    return (
        f"{report.get('numPassedTests')} passed, {report.get('numFailedTests')} failed, "
        f"{report.get('numPendingTests')} skipped of {report.get('numTotalTests')}"
    )


def _write_failures(
    report: dict[str, Any], failures: list[tuple[str, str]], out_dir: Path, backend: str
) -> Path:
    lines = [f"# {backend}: {_counts(report)}"]
    lines += [f"{name}\n    {_first_line(message)}" for name, message in failures]
    text = "\n".join(lines) + "\n"
    path = out_dir / f"conformance-failures-{backend}.txt"
    path.write_text(text)
    extra_dir = os.environ.get("CONFORMANCE_FAILURES_DIR")
    if extra_dir:
        Path(extra_dir, path.name).write_text(text)
    # Full messages (stack traces included) next to the summary.
    full = out_dir / f"conformance-failures-{backend}.full.txt"
    full.write_text("\n\n".join(f"== {name}\n{message}" for name, message in failures) + "\n")
    return path


def _failure_summary(
    report: dict[str, Any], failures: list[tuple[str, str]], details: Path, limit: int = 80
) -> str:
    lines = [f"conformance: {_counts(report)} (expected {EXPECTED_PASSED} passed, 0 failed)"]
    for name, message in failures[:limit]:
        lines.append(f"  FAIL {name}\n       {_first_line(message)}")
    if len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more")
    lines.append(f"details: {details} (full messages: {details.with_suffix('.full.txt')})")
    return "\n".join(lines)


def test_server_passes_conformance_suite(
    conformance_installed: Path,
    chatops_executable: Path,
    conformance_database_url: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    backend = request.node.callspec.params["conformance_database_url"]
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": conformance_database_url,
        "STREAMS_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_TIMEOUT_MS),
    }
    cmd = [str(chatops_executable), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with _server(cmd, env, tmp_path, "chatops") as (proc, stdout_path, stderr_path):
        _wait_until(
            lambda: _health_ok(f"{base_url}/health"),
            proc,
            stdout_path,
            stderr_path,
            f"`chatops serve` ({backend})",
        )
        report = _run_suite(base_url, tmp_path)

    failures = _failures(report)
    details = _write_failures(report, failures, tmp_path, backend)
    passed = report.get("numPassedTests")
    failed = report.get("numFailedTests")
    assert passed == EXPECTED_PASSED and failed == 0 and not failures, _failure_summary(
        report, failures, details
    )

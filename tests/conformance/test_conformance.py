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
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO_ROOT, ServerProcess, tail, terminate

CONFORMANCE_DIR = REPO_ROOT / "conformance"
VITEST_ENTRY = CONFORMANCE_DIR / "node_modules" / "vitest" / "vitest.mjs"

EXPECTED_PASSED = 332
LONG_POLL_TIMEOUT_MS = 500
STARTUP_TIMEOUT_S = 30.0
SUITE_TIMEOUT_S = 540.0

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(600)]


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
            terminate(proc, grace_s=5.0)
            pytest.fail(
                f"vitest did not finish within {SUITE_TIMEOUT_S:.0f}s:\n{tail(log_path)}",
                pytrace=False,
            )
        finally:
            terminate(proc, grace_s=5.0)
    if not report_path.exists():
        pytest.fail(
            f"vitest (exit {proc.returncode}) wrote no JSON report; output:\n{tail(log_path)}",
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
    fresh_database_url: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    backend = request.node.callspec.params["fresh_database_url"]
    server = ServerProcess(
        fresh_database_url,
        tmp_path,
        name=f"chatops-{backend}",
        STREAMS_LONG_POLL_TIMEOUT_MS=str(LONG_POLL_TIMEOUT_MS),
    )
    with server:
        report = _run_suite(server.base_url, tmp_path)

    failures = _failures(report)
    details = _write_failures(report, failures, tmp_path, backend)
    passed = report.get("numPassedTests")
    failed = report.get("numFailedTests")
    assert passed == EXPECTED_PASSED and failed == 0 and not failures, _failure_summary(
        report, failures, details
    )

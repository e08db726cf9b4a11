"""The GitHub Actions workflows: valid offline, audited by zizmor, and shaped as issue 8 asks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.files import (
    CONSOLE_APP,
    SERVICE_APP,
    WORKFLOW_FILES,
    WORKFLOWS_DIR,
    secrets_set_on_apps,
    steps,
    workflow,
)
from tests.support import REPO_ROOT

BIN = Path(sys.executable).parent
FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
EXACT_TAG = re.compile(r"^v?\d+\.\d+\.\d+$")
SAME_REPO = "github.event.pull_request.head.repo.full_name == github.repository"
# The only write permission any job holds, and why.
ALLOWED_WRITES = {("deploy-preview.yml", "comment"): {"pull-requests"}}


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def _uses(file: str) -> list[tuple[str, str]]:
    """(uses, trailing comment) of every `uses:` line of a workflow, from its text."""
    found = []
    for line in (WORKFLOWS_DIR / file).read_text().splitlines():
        match = re.match(r"^\s*(?:-\s+)?uses:\s*(\S+)\s*(?:#\s*(.*))?$", line)
        if match:
            found.append((match.group(1), (match.group(2) or "").strip()))
    return found


def _job_text(job: dict[str, Any]) -> str:
    return yaml.safe_dump(job)


def test_workflows_match_the_github_workflow_schema() -> None:
    files = [str(WORKFLOWS_DIR / name) for name in WORKFLOW_FILES]
    result = _run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *files]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in WORKFLOWS_DIR.glob("*.y*ml")) == sorted(WORKFLOW_FILES)


def test_zizmor_offline_reports_no_high_findings() -> None:
    result = _run([str(BIN / "zizmor"), "--offline", "--format", "json", str(WORKFLOWS_DIR)])
    assert result.stdout.strip(), f"zizmor printed no report:\n{result.stderr}"
    findings = json.loads(result.stdout)
    summary = [
        f"{f['ident']} ({f['determinations']['severity']}): "
        f"{f['locations'][0]['symbolic']['key']} {f['desc']}"
        for f in findings
    ]
    high = [
        line
        for line, f in zip(summary, findings, strict=True)
        if f["determinations"]["severity"] == "High"
    ]
    assert not high, "\n".join(high)
    # zizmor exits non-zero for any finding at all; CI runs it the same way.
    assert result.returncode == 0, "\n".join(summary) or result.stderr


def test_every_action_is_pinned() -> None:
    config = yaml.safe_load((REPO_ROOT / ".github" / "zizmor.yml").read_text())
    policies: dict[str, str] = config["rules"]["unpinned-uses"]["config"]["policies"]
    assert policies.get("*") == "hash-pin"
    tag_pinned = {name for name, policy in policies.items() if policy == "ref-pin"}
    for file in WORKFLOW_FILES:
        for uses, comment in _uses(file):
            if uses.startswith("./"):
                continue
            action, _, ref = uses.partition("@")
            if action in tag_pinned:
                # Allowed a tag only because its SHA was not verifiable: an exact release.
                assert EXACT_TAG.match(ref), f"{file}: {uses} is not an exact version tag"
            else:
                assert FULL_SHA.match(ref), f"{file}: {uses} is not pinned to a commit SHA"
                assert comment, f"{file}: {uses} has no `# version` comment"


def test_permissions_are_least_privilege() -> None:
    for file in WORKFLOW_FILES:
        data = workflow(file)
        assert data.get("permissions") == {}, f"{file}: workflow-level permissions must be {{}}"
        for job_id, job in data["jobs"].items():
            permissions = job.get("permissions")
            assert isinstance(permissions, dict), f"{file}:{job_id} has no explicit permissions"
            writes = {scope for scope, level in permissions.items() if level == "write"}
            assert writes == ALLOWED_WRITES.get((file, job_id), set()), (file, job_id, writes)
            assert set(permissions.values()) <= {"read", "write", "none"}


def test_pull_request_code_never_meets_secrets_it_should_not() -> None:
    for file in WORKFLOW_FILES:
        data = workflow(file)
        triggers = data["on"]
        assert "pull_request_target" not in triggers, file
        assert "workflow_run" not in triggers, file
        for job_id, job in data["jobs"].items():
            for step in steps(job):
                if str(step.get("uses", "")).startswith("actions/checkout@"):
                    assert step.get("with", {}).get("persist-credentials") is False, (
                        f"{file}:{job_id}: checkout must not persist the token"
                    )
            if "pull_request" in triggers and "secrets." in _job_text(job):
                # Forks get no secrets from GitHub anyway; the jobs that need them skip forks.
                assert SAME_REPO in str(job.get("if", "")), f"{file}:{job_id} runs for forks"
            if "secrets." in _job_text(job) and file != "ci.yml":
                assert job.get("environment"), (
                    f"{file}:{job_id} uses secrets outside an environment"
                )


def test_ci_runs_lint_types_tests_conformance_and_workflow_checks() -> None:
    data = workflow("ci.yml")
    assert set(data["on"]) == {"pull_request", "workflow_call"}
    commands = "\n".join(
        str(step.get("run", "")) for job in data["jobs"].values() for step in steps(job)
    )
    for command in (
        "ruff check",
        "mypy",
        "pytest",
        "npm ci",
        "apt-get install -y --no-install-recommends chromium",
        "check-jsonschema --builtin-schema vendor.github-workflows",
        "zizmor --offline",
        "pip install -e '.[dev]'",
    ):
        assert command in commands, f"ci.yml never runs {command!r}"
    test_job = data["jobs"]["test"]
    images = {name: service["image"] for name, service in test_job["services"].items()}
    assert images == {"postgres": "postgres:15", "redis": "redis:7"}
    node = next(
        s for s in steps(test_job) if str(s.get("uses", "")).startswith("actions/setup-node@")
    )
    assert str(node["with"]["node-version"]) == "20"
    npm = next(s for s in steps(test_job) if "npm ci" in str(s.get("run", "")))
    assert npm["working-directory"] == "conformance"
    # Tests reach the service containers through the addresses the suite reads from the env.
    assert test_job["env"]["TEST_PG_ADMIN_URL"].startswith("postgresql://postgres@postgres:5432/")


def test_production_deploys_service_then_console_after_ci() -> None:
    data = workflow("deploy-production.yml")
    assert data["on"] == {"push": {"branches": ["main"]}}
    assert data["concurrency"]["cancel-in-progress"] is False
    jobs = data["jobs"]
    assert jobs["ci"]["uses"] == "./.github/workflows/ci.yml"
    deploy = jobs["deploy"]
    assert deploy["needs"] == "ci"
    assert deploy["environment"]["name"] == "production"
    assert any(
        str(s.get("uses", "")).startswith("superfly/flyctl-actions/setup-flyctl@")
        for s in steps(deploy)
    )
    runs = [str(s.get("run", "")) for s in steps(deploy)]
    script = "\n".join(runs)
    for line in script.splitlines():
        if "flyctl secrets set" in line:
            assert "--stage" in line, f"secrets must be staged, not released one by one: {line}"
    deploys = [r for r in runs if "flyctl deploy" in r]
    assert len(deploys) == 2
    service, console = deploys
    assert "--remote-only" in service and "--config fly.toml" in service and SERVICE_APP in service
    assert (
        "--remote-only" in console
        and "--config fly.console.toml" in console
        and CONSOLE_APP in console
    )
    # Each app's secrets are staged before its deploy, so they ship with that release.
    assert script.index(f"--app {SERVICE_APP}") < script.index(service)
    assert script.index(service) < script.index(f"--app {CONSOLE_APP}") < script.index(console)
    assert secrets_set_on_apps()[SERVICE_APP] >= {
        "ANTHROPIC_API_KEY",
        "STREAMS_SECRET",
        "DATABASE_URL",
        "REDIS_URL",
        "SENTRY_DSN_STREAMS",
        "POSTHOG_API_KEY",
    }


def test_preview_gets_a_neon_branch_and_two_linked_apps_and_a_comment() -> None:
    data = workflow("deploy-preview.yml")
    assert set(data["on"]) == {"pull_request"}
    deploy = data["jobs"]["deploy"]
    by_id = {s["id"]: s for s in steps(deploy) if "id" in s}
    neon = by_id["neon"]
    assert neon["uses"].startswith("neondatabase/create-branch-action@v6.")
    assert "github.event.pull_request.number" in neon["with"]["branch_name"]
    streams, console = by_id["streams"], by_id["console"]
    for step, app in ((streams, SERVICE_APP), (console, CONSOLE_APP)):
        assert step["uses"] == "superfly/fly-pr-review-apps@1.3.0"
        assert step["with"]["name"] == f"{app}-pr-${{{{ github.event.pull_request.number }}}}"
    assert "DATABASE_URL=${{ steps.neon.outputs.db_url }}" in streams["with"]["secrets"]
    assert "ANTHROPIC_API_KEY" not in _job_text(deploy), "previews run on the simulator"
    # The console's config is written after the service is up, from the service's own URL.
    order = [s.get("id") or s.get("name") for s in steps(deploy)]
    write_console = next(
        s for s in steps(deploy) if "fly.console.preview.toml" in str(s.get("run", ""))
    )
    assert write_console["env"]["STREAMS_URL"] == "${{ steps.streams.outputs.url }}"
    assert "--streams-url" in write_console["run"]
    assert console["with"]["config"] == "fly.console.preview.toml"
    assert order.index("streams") < order.index(write_console["name"]) < order.index("console")
    comment = data["jobs"]["comment"]
    assert comment["needs"] == "deploy"
    script_step = steps(comment)[0]
    assert script_step["uses"].startswith("actions/github-script@")
    assert script_step["env"]["CONSOLE_URL"] == "${{ needs.deploy.outputs.console_url }}"
    assert script_step["env"]["STREAMS_URL"] == "${{ needs.deploy.outputs.streams_url }}"
    assert deploy["outputs"]["console_url"] == "${{ steps.console.outputs.url }}"
    assert deploy["outputs"]["streams_url"] == "${{ steps.streams.outputs.url }}"
    # URLs reach the script through env, never spliced into its source.
    assert "${{" not in script_step["with"]["script"]


def test_cleanup_removes_both_apps_and_the_same_neon_branch() -> None:
    data = workflow("cleanup-preview.yml")
    assert data["on"] == {"pull_request": {"types": ["closed"]}}
    assert data["concurrency"]["group"] == workflow("deploy-preview.yml")["concurrency"]["group"]
    job = data["jobs"]["cleanup"]
    script = "\n".join(str(s.get("run", "")) for s in steps(job))
    assert "flyctl apps destroy" in script
    assert f'"{SERVICE_APP}-pr-${{PR_NUMBER}}"' in script
    assert f'"{CONSOLE_APP}-pr-${{PR_NUMBER}}"' in script
    delete = next(
        s
        for s in steps(job)
        if str(s.get("uses", "")).startswith("neondatabase/delete-branch-action@")
    )
    created = next(
        s for s in steps(workflow("deploy-preview.yml")["jobs"]["deploy"]) if s.get("id") == "neon"
    )
    assert delete["with"]["branch"] == created["with"]["branch_name"]
    assert delete["with"]["project_id"] == created["with"]["project_id"]

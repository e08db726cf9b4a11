"""The Dockerfile, checked and replayed without a Docker engine.

The static tests read the Dockerfile. The replay builds what the image holds the way the image
does: the build context (after .dockerignore) copied to a temporary /src, the build stage's RUN
commands run with /opt/venv mapped to a fresh virtualenv, the runtime stage's files copied to a
temporary /app, the runtime ENV applied; then the deploy's release command and the image's two
start commands (service and console) run from that virtualenv and answer their health checks.
One deviation: `--no-cache-dir` is dropped so repeated runs reuse pip's cache (it changes what
is downloaded, not what is installed).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.files import (
    Stage,
    build_context_files,
    copy_sources,
    dockerfile_stages,
    dockerignore_patterns,
    env_assignments,
    excluded,
    fly_config,
    seconds,
)
from tests.support import REPO_ROOT, free_port, tail

VENV_IN_IMAGE = "/opt/venv"
STARTUP_TIMEOUT_S = 60.0
# Runtime-stage RUN commands that only set up the image's user and ownership; they need root
# and change nothing a process in the image can observe besides permissions.
USER_SETUP_COMMANDS = {"groupadd", "useradd", "chown"}


def _stages() -> dict[str, Stage]:
    stages = dockerfile_stages()
    assert [s.name for s in stages] == ["build", "runtime"]
    return {s.name: s for s in stages if s.name}


def _commands(run_args: str) -> list[list[str]]:
    """The `&&`-joined commands of a RUN line (no other shell syntax is used or supported)."""
    assert not re.search(r"[;|]|\$\(|`", run_args), (
        f"RUN uses shell syntax the replay skips: {run_args}"
    )
    return [shlex.split(part) for part in run_args.split("&&")]


# --- static -----------------------------------------------------------------------------------


def test_base_image_is_slim_python_satisfying_the_project() -> None:
    with (REPO_ROOT / "pyproject.toml").open("rb") as handle:
        requires = tomllib.load(handle)["project"]["requires-python"]
    floor = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires)
    assert floor, f"unexpected requires-python {requires!r}"
    minimum = tuple(int(p) for p in floor.groups())
    for stage in _stages().values():
        match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(?:-\w+)?", stage.image)
        assert match, f"stage {stage.name} is not a slim Python image: {stage.image}"
        assert tuple(int(p) for p in match.groups()) >= minimum
    assert len({s.image for s in _stages().values()}) == 1, (
        "the venv must run on the Python it was built with"
    )


def test_the_image_installs_the_project_without_dev_tools_and_runs_unprivileged() -> None:
    stages = _stages()
    installs = [
        command
        for run in stages["build"].all("RUN")
        for command in _commands(run.args)
        if "pip" in Path(command[0]).name and "install" in command[1:]
    ]
    assert any(c[-1] == "." for c in installs), "the build stage never runs `pip install .`"
    assert not any("[dev]" in arg or arg in {"-e", "--editable"} for c in installs for arg in c)
    runtime = stages["runtime"]
    user, cmd = runtime.last("USER"), runtime.last("CMD")
    assert user is not None and cmd is not None
    assert user.args not in {"root", "0"}
    assert runtime.instructions.index(user) < runtime.instructions.index(cmd)
    copied_from_build = [copy_sources(c) for c in runtime.all("COPY") if "--from=build" in c.args]
    assert ([VENV_IN_IMAGE], VENV_IN_IMAGE, "build") in copied_from_build


def test_no_secret_or_local_state_enters_the_build_context() -> None:
    patterns = dockerignore_patterns()
    for secret in (".env", ".env.production", ".streamlit/secrets.toml"):
        assert excluded(secret, patterns), f"{secret} would be sent to the image build"
    files = build_context_files()
    prefixes = (".git/", ".venv/", ".data/", "node_modules/", "tests/", "conformance/")
    assert not [f for f in files if f.startswith(prefixes) or "__pycache__" in f]
    for needed in ("pyproject.toml", "README.md", "streams_service/cli.py", "db/migrate.py"):
        assert needed in files, f"{needed} is excluded by .dockerignore but the build needs it"


# --- replay -----------------------------------------------------------------------------------


@dataclass
class Image:
    venv: Path
    app_dir: Path
    env: dict[str, str]


def _map(arg: str, venv: Path) -> str:
    return arg.replace(VENV_IN_IMAGE, str(venv))


def _run_build_stage(stage: Stage, context: Path, venv: Path, env: dict[str, str]) -> None:
    for instruction in stage.instructions:
        if instruction.keyword == "COPY":
            sources, _, from_stage = copy_sources(instruction)
            assert from_stage is None and sources == ["."], "build stage copies the whole context"
        elif instruction.keyword == "ENV":
            env.update(env_assignments(instruction))
        elif instruction.keyword == "RUN":
            for command in _commands(instruction.args):
                argv = [_map(a, venv) for a in command if a != "--no-cache-dir"]
                if argv[0] == "python":
                    argv[0] = sys.executable
                assert Path(argv[0]).is_absolute(), f"unsupported build command: {command}"
                result = subprocess.run(
                    argv,
                    cwd=context,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                    check=False,
                )
                assert result.returncode == 0, (
                    f"`{shlex.join(command)}` failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
                )
        else:
            assert instruction.keyword == "WORKDIR", f"unsupported build instruction {instruction}"


def _assemble_runtime(
    stage: Stage, context: Path, venv: Path, root: Path
) -> tuple[Path, dict[str, str]]:
    app_dir = root / "app"
    env: dict[str, str] = {"PATH": os.environ["PATH"], "HOME": str(root / "home")}
    (root / "home").mkdir()
    workdir = stage.last("WORKDIR")
    assert workdir is not None and workdir.args == "/app"
    app_dir.mkdir()
    for instruction in stage.instructions:
        if instruction.keyword == "ENV":
            for name, value in env_assignments(instruction):
                value = re.sub(
                    r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m.group(1) or m.group(2), ""), value
                )
                env[name] = _map(value, venv)
        elif instruction.keyword == "COPY":
            sources, dest, from_stage = copy_sources(instruction)
            if from_stage == "build":
                assert sources == [VENV_IN_IMAGE], f"unexpected copy from build: {sources}"
                continue
            assert from_stage is None
            in_dir = dest in (".", "./") or dest.endswith("/")
            dest_path = app_dir / dest.removeprefix("./") if dest not in (".", "./") else app_dir
            for source in sources:
                src = context / source
                assert src.exists(), (
                    f"COPY {source}: not in the build context (missing, or in .dockerignore)"
                )
                if src.is_dir():
                    shutil.copytree(src, dest_path, dirs_exist_ok=True)
                    continue
                target = dest_path / src.name if in_dir else dest_path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
        elif instruction.keyword == "RUN":
            for command in _commands(instruction.args):
                if command[0] in USER_SETUP_COMMANDS:
                    continue
                assert command[:2] == ["mkdir", "-p"], f"unsupported runtime command: {command}"
                for path in command[2:]:
                    (app_dir / Path(path).relative_to("/app")).mkdir(parents=True, exist_ok=True)
    return app_dir, env


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("image")
    context = root / "src"
    for relative in build_context_files():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / relative, target)
    venv = root / "venv"
    stages = _stages()
    _run_build_stage(stages["build"], context, venv, dict(os.environ))
    app_dir, env = _assemble_runtime(stages["runtime"], context, venv, root)
    return Image(venv=venv, app_dir=app_dir, env=env)


@pytest.fixture
def fly_env(image: Image, tmp_path: Path) -> dict[str, str]:
    """The image's environment as fly.toml runs it, on a fresh SQLite database."""
    return {
        **image.env,
        **fly_config("fly.toml").get("env", {}),
        "STREAMS_SECRET": secrets.token_urlsafe(32),
        "DATABASE_URL": f"sqlite:///{tmp_path}/chatops.db",
    }


@contextmanager
def _started(
    argv: list[str], env: dict[str, str], cwd: Path, logs: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A process started as the image starts it: its program found on the image's PATH."""
    program = shutil.which(argv[0], path=env["PATH"])
    assert program, f"{argv[0]} is not on the image's PATH"
    with logs.open("wb") as log:
        proc = subprocess.Popen(
            [program, *argv[1:]],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _get(url: str, proc: subprocess.Popen[bytes], logs: Path) -> tuple[int, bytes]:
    """The first answer from url while the process lives (it is still starting before that)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode} before answering:\n{tail(logs)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    pytest.fail(
        f"no answer from {url} within {STARTUP_TIMEOUT_S:.0f}s:\n{tail(logs)}", pytrace=False
    )


def _with_port(argv: list[str], option: str, port: int) -> list[str]:
    index = argv.index(option)
    return [*argv[: index + 1], str(port), *argv[index + 2 :]]


@pytest.mark.timeout(900)
def test_the_release_command_migrates_from_the_image_install(
    image: Image, fly_env: dict[str, str]
) -> None:
    argv = shlex.split(fly_config("fly.toml")["deploy"]["release_command"])
    program = shutil.which(argv[0], path=fly_env["PATH"])
    assert program is not None and program.startswith(str(image.venv))
    result = subprocess.run(
        [program, *argv[1:]],
        cwd=image.app_dir,
        env=fly_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "database at revision head" in result.stdout


@pytest.mark.timeout(900)
def test_the_image_command_serves_health_and_stops_cleanly(
    image: Image, fly_env: dict[str, str], tmp_path: Path
) -> None:
    runtime = _stages()["runtime"]
    cmd = runtime.last("CMD")
    assert cmd is not None
    argv = cmd.exec_form()
    assert argv is not None
    port = free_port()
    logs = tmp_path / "serve.log"
    with _started(_with_port(argv, "--port", port), fly_env, image.app_dir, logs) as proc:
        status, body = _get(f"http://127.0.0.1:{port}/health", proc, logs)
        assert (status, body) == (200, b'{"status":"ok"}'), tail(logs)
        # Fly stops a machine with kill_signal and SIGKILLs it after kill_timeout.
        fly = fly_config("fly.toml")
        assert fly["kill_signal"] == "SIGTERM"
        os.killpg(proc.pid, signal.SIGTERM)
        returncode = proc.wait(timeout=seconds(fly["kill_timeout"]))
    log = logs.read_text(errors="replace")
    # uvicorn re-raises the signal it handled once its shutdown is done, so a clean stop
    # exits by SIGTERM (or 0); the lifespan (the drain) must have completed.
    assert returncode in (0, -signal.SIGTERM), tail(logs)
    assert "Application shutdown complete" in log, tail(logs)
    # Production logs (ENV=production from fly.toml) must be writable: a failing log
    # handler prints "--- Logging error ---" with a traceback instead of the line.
    assert "Traceback" not in log and "Logging error" not in log, tail(logs)


@pytest.mark.timeout(900)
def test_the_console_command_serves_streamlit_health(
    image: Image, fly_env: dict[str, str], tmp_path: Path
) -> None:
    console = fly_config("fly.console.toml")
    argv = shlex.split(console["processes"]["app"])
    port = free_port()
    env = {**image.env, **console.get("env", {})}
    logs = tmp_path / "console.log"
    with _started(_with_port(argv, "--server.port", port), env, image.app_dir, logs) as proc:
        path = console["http_service"]["checks"][0]["path"]
        status, body = _get(f"http://127.0.0.1:{port}{path}", proc, logs)
        assert (status, body) == (200, b"ok"), tail(logs)

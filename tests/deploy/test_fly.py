"""fly.toml and fly.console.toml: as issue 8 specifies, and in agreement with the app, the image
and the workflows."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from streams_service.app import create_app
from streams_service.cli import build_parser
from streams_service.config import Settings
from tests.deploy.files import (
    CONSOLE_APP,
    SERVICE_APP,
    dockerfile_stages,
    fly_config,
    megabytes,
    seconds,
    secrets_set_on_apps,
)
from tests.support import REPO_ROOT

# Fly's SIGKILL must not land while the service still drains: the HTTP server first closes
# connections (up to 5 s, streams_service/cli.py), then generations get DRAIN_TIMEOUT_S, then
# their final rows are written. 10 s covers the parts that are not the drain itself.
SHUTDOWN_MARGIN_S = 10.0
CONSOLE_COMMAND = "streamlit run app.py --server.port 8501 --server.address 0.0.0.0"


def _option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def _settings_env_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def test_service_config_is_as_specified() -> None:
    fly = fly_config("fly.toml")
    assert fly["app"] == SERVICE_APP
    assert fly["primary_region"] == "iad"
    assert fly["kill_signal"] == "SIGTERM"
    assert fly["deploy"]["release_command"] == "chatops db upgrade"
    assert "mounts" not in fly, "state lives in Postgres and Redis: no volumes"
    http = fly["http_service"]
    assert http["internal_port"] == 8080
    assert http["auto_stop_machines"] == "stop"
    assert http["auto_start_machines"] is True
    assert http["min_machines_running"] == 1
    assert http["force_https"] is True
    [check] = http["checks"]
    assert check["method"] == "GET" and check["path"] == "/health"
    [vm] = fly["vm"]
    assert megabytes(vm) == 512
    assert vm["cpu_kind"] == "shared"
    assert fly["env"]["ENV"] == "production"


def test_release_command_is_a_real_cli_command() -> None:
    args = build_parser().parse_args(
        shlex.split(fly_config("fly.toml")["deploy"]["release_command"])[1:]
    )
    assert args.command == "db" and args.db_command == "upgrade" and args.revision == "head"


def test_kill_timeout_outlasts_the_drain() -> None:
    fly = fly_config("fly.toml")
    default = Settings.model_fields["drain_timeout_s"].default
    drain = float(fly.get("env", {}).get("DRAIN_TIMEOUT_S", default))
    assert seconds(fly["kill_timeout"]) >= drain + SHUTDOWN_MARGIN_S, (
        f"kill_timeout {fly['kill_timeout']} leaves no room after a {drain:.0f} s drain"
    )


def test_ports_agree_between_fly_the_image_and_the_cli() -> None:
    runtime = dockerfile_stages()[-1]
    cmd = runtime.last("CMD")
    assert cmd is not None
    argv = cmd.exec_form()
    assert argv is not None and argv[:2] == ["chatops", "serve"]
    exposed = {int(port) for i in runtime.all("EXPOSE") for port in i.args.split()}
    serve_default = build_parser().parse_args(["serve"]).port
    service_port = fly_config("fly.toml")["http_service"]["internal_port"]
    assert service_port == serve_default == int(_option(argv, "--port"))
    assert service_port in exposed
    # Fly's proxy reaches a machine on its IPv4 address: loopback would never answer.
    assert _option(argv, "--host") == "0.0.0.0"

    console = fly_config("fly.console.toml")
    command = console["processes"]["app"]
    assert command == CONSOLE_COMMAND
    console_argv = shlex.split(command)
    console_port = console["http_service"]["internal_port"]
    assert console_port == int(_option(console_argv, "--server.port")) == 8501
    assert console_port in exposed
    assert _option(console_argv, "--server.address") == "0.0.0.0"
    assert console["http_service"]["processes"] == ["app"]
    healthcheck = runtime.last("HEALTHCHECK")
    assert healthcheck is not None and "http://127.0.0.1:8080/health" in healthcheck.args
    assert console["env"]["HEALTHCHECK_URL"] == (
        f"http://127.0.0.1:{console_port}{console['http_service']['checks'][0]['path']}"
    )


async def test_the_health_check_path_is_a_route_of_the_app(tmp_path: Path) -> None:
    path = fly_config("fly.toml")["http_service"]["checks"][0]["path"]
    app = create_app(Settings(_env_file=None, database_url=f"sqlite:///{tmp_path}/h.db"))
    routes = [r for r in app.routes if isinstance(r, APIRoute) and r.path == path]
    assert routes and "GET" in routes[0].methods
    # Liveness answers without the lifespan (no database): a machine whose database is down
    # is still alive, and Fly must not replace it for that.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fly-proxy") as client:
        response = await client.get(path)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_console_config_follows_the_service() -> None:
    console = fly_config("fly.console.toml")
    service = fly_config("fly.toml")
    assert console["app"] == CONSOLE_APP
    assert console["primary_region"] == service["primary_region"]
    assert console["build"]["dockerfile"] == service["build"]["dockerfile"] == "Dockerfile"
    assert console["env"]["STREAMS_URL"] == f"https://{service['app']}.fly.dev"
    [check] = console["http_service"]["checks"]
    assert check["path"] == "/_stcore/health"
    [secrets_file] = console["files"]
    # The OIDC secrets file is written where Streamlit looks for it: ./.streamlit under the
    # image's working directory.
    workdir = dockerfile_stages()[-1].last("WORKDIR")
    assert workdir is not None
    assert secrets_file["guest_path"] == f"{workdir.args}/.streamlit/secrets.toml"
    assert "mounts" not in console


def test_every_secret_a_workflow_sets_is_read_by_its_app() -> None:
    targets = secrets_set_on_apps()
    assert set(targets) == {SERVICE_APP, CONSOLE_APP}
    unknown = sorted(targets[SERVICE_APP] - _settings_env_names())
    assert not unknown, f"secrets set on {SERVICE_APP} that Settings does not read: {unknown}"

    console_source = "\n".join(p.read_text() for p in sorted((REPO_ROOT / "console").glob("*.py")))
    file_secrets = {f["secret_name"] for f in fly_config("fly.console.toml").get("files", [])}
    for name in sorted(targets[CONSOLE_APP]):
        assert name in file_secrets or f'"{name}"' in console_source, (
            f"{CONSOLE_APP} is given {name}, which neither the console reads nor fly.console.toml "
            "mounts as a file"
        )


@pytest.mark.parametrize(
    ("source", "app", "streams_url"),
    [
        ("fly.toml", f"{SERVICE_APP}-pr-42", None),
        ("fly.console.toml", f"{CONSOLE_APP}-pr-42", f"https://{SERVICE_APP}-pr-42.fly.dev"),
    ],
)
def test_preview_configs_differ_from_production_only_where_intended(
    tmp_path: Path, source: str, app: str, streams_url: str | None
) -> None:
    dest = tmp_path / "preview.toml"
    args = [sys.executable, "scripts/fly_preview_config.py", source, str(dest), "--app", app]
    if streams_url:
        args += ["--streams-url", streams_url]
    result = subprocess.run(
        args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    production = fly_config(source)
    preview = tomllib.loads(dest.read_text())
    assert preview["app"] == app
    assert preview["http_service"]["min_machines_running"] == 0
    assert "files" not in preview, "previews have no OIDC secrets file"
    expected = dict(production, app=app)
    expected["http_service"] = dict(production["http_service"], min_machines_running=0)
    expected.pop("files", None)
    if streams_url:
        expected["env"] = dict(production["env"], STREAMS_URL=streams_url)
    assert preview == expected


def test_preview_config_refuses_a_config_it_cannot_rewrite(tmp_path: Path) -> None:
    source = tmp_path / "fly.toml"
    source.write_text('app = "x"\n[http_service]\n  internal_port = 8080\n')
    result = subprocess.run(
        [
            sys.executable,
            "scripts/fly_preview_config.py",
            str(source),
            str(tmp_path / "out.toml"),
            "--app",
            "x-pr-1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert re.search(r"min_machines_running", result.stderr)
    assert not (tmp_path / "out.toml").exists()

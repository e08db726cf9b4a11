"""Where the client finds the service and its token (flags > environment > .env > config file),
and the one line it prints when it cannot use them: nothing listening, a rejected token, a
session that does not exist."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.client.conftest import SERVICE_ENV, service_env
from tests.client.support import CliRun, run_cli
from tests.support import ServerProcess, free_port

SECRET = "client-tests-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("client-secured")
    server = service_env(
        ServerProcess(f"sqlite:///{root / 'chatops.db'}", root, "secured", **SERVICE_ENV)
    )
    server.env["STREAMS_SECRET"] = SECRET
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def member_token(secured: ServerProcess) -> str:
    """A member's personal API token, made through the admin API with the system secret."""
    with httpx.Client(
        base_url=secured.base_url, headers={"Authorization": f"Bearer {SECRET}"}, timeout=30
    ) as admin:
        user = admin.post("/v1/users", json={"email": f"cli-{uuid.uuid4().hex[:8]}@example.com"})
        assert user.status_code == 201, user.text
        token = admin.post(f"/v1/users/{user.json()['id']}/tokens", json={"name": "cli"})
        assert token.status_code == 201, token.text
        value: str = token.json()["token"]
        return value


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def write_config(directory: Path, url: str, token: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text(f'url = "{url}"\ntoken = "{token}"\n')


def one_line(run: CliRun) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("chatops: ")
    return lines[0]


def test_each_layer_beats_the_ones_below(
    secured: ServerProcess, member_token: str, clean_env: dict[str, str], home: Path
) -> None:
    """Each case puts the working URL and token in one layer only and wrong ones in every
    layer below it: the command succeeds only if that layer wins over all of those."""
    work = home / "work"
    good_url, good_token = secured.base_url, member_token

    def run(*flags: str, **env: str) -> CliRun:
        return run_cli(["sessions", "list", *flags], env={**clean_env, **env}, cwd=work)

    # The config file, under $XDG_CONFIG_HOME …
    xdg = home / "xdg"
    write_config(xdg / "chatops", good_url, good_token)
    assert run(XDG_CONFIG_HOME=str(xdg)).returncode == 0
    # … or under ~/.config without it.
    write_config(home / ".config" / "chatops", good_url, good_token)
    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ID ")

    # .env beats the config file.
    write_config(home / ".config" / "chatops", dead_url(), "cho_wrong_from_config")
    assert "config.toml" in one_line(run())  # the config file's URL is used until .env has one
    (work / ".env").write_text(
        f"# the service\nexport STREAMS_URL={good_url}\nSTREAMS_TOKEN='{good_token}'\n"
    )
    assert run().returncode == 0

    # The environment beats .env (and the config file).
    (work / ".env").write_text(f"STREAMS_URL={dead_url()}\nSTREAMS_TOKEN=cho_wrong_from_dotenv\n")
    assert ".env" in one_line(run())
    ok = run(STREAMS_URL=good_url, STREAMS_TOKEN=good_token)
    assert ok.returncode == 0, ok.stderr

    # Flags beat the environment (and everything else).
    env = {"STREAMS_URL": dead_url(), "STREAMS_TOKEN": "cho_wrong_from_env"}
    assert "STREAMS_URL (environment)" in one_line(run(**env))
    ok = run("--url", good_url, "--token", good_token, **env)
    assert ok.returncode == 0, ok.stderr

    # Each key resolves on its own: the URL from a flag, the token from the config file.
    (work / ".env").unlink()
    write_config(home / ".config" / "chatops", dead_url(), good_token)
    assert run("--url", good_url).returncode == 0


def test_unreachable_service_is_one_line(clean_env: dict[str, str], home: Path) -> None:
    url = dead_url()
    for args in (
        ["sessions", "list"],
        ["sessions", "show", str(uuid.uuid4())],
        ["chat"],
        ["tail", str(uuid.uuid4())],
    ):
        run = run_cli([*args, "--url", url], env=clean_env, cwd=home / "work")
        line = one_line(run)
        assert f"cannot reach the service at {url}" in line
        assert run.returncode == 1
        assert run.stdout == ""


def test_rejected_token_is_one_line_that_never_shows_the_token(
    secured: ServerProcess, clean_env: dict[str, str], home: Path
) -> None:
    bad = "cho_" + secrets.token_hex(16)
    env = {**clean_env, "STREAMS_URL": secured.base_url}
    for args in (["sessions", "list"], ["chat"], ["tail", str(uuid.uuid4())]):
        line = one_line(run_cli([*args, "--token", bad], env=env, cwd=home / "work"))
        assert "rejected the token from --token (401" in line
        assert bad not in line
    from_env = one_line(
        run_cli(["sessions", "list"], env={**env, "STREAMS_TOKEN": bad}, cwd=home / "work")
    )
    assert "STREAMS_TOKEN (environment)" in from_env
    missing = one_line(run_cli(["sessions", "list"], env=env, cwd=home / "work"))
    assert "needs a token (401)" in missing


def test_forbidden_and_missing_are_one_line(
    secured: ServerProcess, member_token: str, clean_env: dict[str, str], home: Path
) -> None:
    env = {**clean_env, "STREAMS_URL": secured.base_url, "STREAMS_TOKEN": member_token}
    with httpx.Client(
        base_url=secured.base_url,
        headers={"Authorization": f"Bearer {member_token}"},
        timeout=30,
    ) as api:
        session_id = api.post("/v1/sessions", json={}).json()["id"]
    # A member may not purge, even their own session.
    line = one_line(
        run_cli(["sessions", "delete", session_id, "--purge", "--yes"], env=env, cwd=home / "work")
    )
    assert "(403)" in line
    # A session that is not there (or not theirs) is a 404 with the session's id.
    for args in (["sessions", "show"], ["sessions", "rename"], ["chat", "--session"], ["tail"]):
        missing = str(uuid.uuid4())
        extra = ["new title"] if args[-1] == "rename" else []
        line = one_line(run_cli([*args, missing, *extra], env=env, cwd=home / "work"))
        assert line == f"chatops: session {missing} does not exist (or is not yours)"


def test_a_bad_url_or_config_file_is_one_line(clean_env: dict[str, str], home: Path) -> None:
    line = one_line(run_cli(["sessions", "list", "--url", "ftp://x"], env=clean_env, cwd=home))
    assert "not an http(s) URL" in line
    config = home / ".config" / "chatops"
    config.mkdir(parents=True)
    (config / "config.toml").write_text("url = [broken\n")
    line = one_line(run_cli(["sessions", "list"], env=clean_env, cwd=home))
    assert "config.toml" in line

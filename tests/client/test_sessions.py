"""`chatops sessions list|show|rename|delete|restore|export`, checked against the service."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.client.conftest import exchange, stored_text
from tests.client.support import CliRun


def ids_in(output: str) -> list[str]:
    return [line.split()[0] for line in output.strip().splitlines()[1:] if line.strip()]


def test_list_searches_and_pages_with_the_cursor(
    api: httpx.Client, cli: Callable[..., CliRun]
) -> None:
    word = f"kumquat{secrets.token_hex(4)}"
    older, _ = exchange(api, f"first {word} [[tokens:3]]")
    newer, _ = exchange(api, f"second {word} [[tokens:3]]")
    exchange(api, "unrelated [[tokens:3]]")

    found = cli("sessions", "list", "--q", word)
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[0].split() == [
        "ID",
        "UPDATED",
        "MSGS",
        "COST",
        "MODEL",
        "TITLE",
    ]
    assert ids_in(found.stdout) == [newer, older]  # newest first, nothing else
    assert "more:" not in found.stderr

    page1 = cli("sessions", "list", "--q", word, "--limit", "1")
    assert ids_in(page1.stdout) == [newer]
    cursor = page1.stderr.split("--cursor", 1)[1].split()[0]
    page2 = cli("sessions", "list", "--q", word, "--limit", "1", "--cursor", cursor)
    assert ids_in(page2.stdout) == [older]
    assert "more:" not in page2.stderr

    nothing = cli("sessions", "list", "--q", f"absent{secrets.token_hex(4)}")
    assert nothing.returncode == 0
    assert ids_in(nothing.stdout) == []
    assert "no sessions" in nothing.stderr


def test_show_prints_the_transcript(api: httpx.Client, cli: Callable[..., CliRun]) -> None:
    session_id, body = exchange(api, "tell me something [[tokens:8]]")
    shown = cli("sessions", "show", session_id)
    assert shown.returncode == 0, shown.stderr
    assert session_id in shown.stdout
    assert "you> tell me something [[tokens:8]]" in shown.stdout
    assert "claude> [thinking] " in shown.stdout
    assert stored_text(body["messages"][1]) in shown.stdout

    missing = cli("sessions", "show", str(uuid.uuid4()))
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.strip().endswith("does not exist (or is not yours)")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_rename_delete_restore(api: httpx.Client, cli: Callable[..., CliRun]) -> None:
    session_id, _ = exchange(api, "to be renamed [[tokens:3]]")
    title = f"Quarterly plan {secrets.token_hex(3)}"

    renamed = cli("sessions", "rename", session_id, title)
    assert renamed.returncode == 0, renamed.stderr
    assert api.get(f"/v1/sessions/{session_id}").json()["title"] == title

    deleted = cli("sessions", "delete", session_id)
    assert deleted.returncode == 0, deleted.stderr
    assert api.get(f"/v1/sessions/{session_id}").status_code == 404
    trash = cli("sessions", "list", "--trash", "--limit", "200")
    assert session_id in ids_in(trash.stdout)
    assert f"{title} (deleted)" in trash.stdout

    restored = cli("sessions", "restore", session_id)
    assert restored.returncode == 0, restored.stderr
    assert api.get(f"/v1/sessions/{session_id}").json()["deleted_at"] is None
    assert session_id not in cli("sessions", "list", "--trash", "--limit", "200").stdout

    # Purging is permanent: it wants an explicit --yes, and nothing happens without it.
    refused = cli("sessions", "delete", session_id, "--purge")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert api.get(f"/v1/sessions/{session_id}").status_code == 200
    purged = cli("sessions", "delete", session_id, "--purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert cli("sessions", "restore", session_id).returncode == 1


def test_export_markdown_to_stdout_and_json_to_a_file(
    api: httpx.Client, cli: Callable[..., CliRun], home: Path
) -> None:
    session_id, body = exchange(api, "export me [[tokens:5]]")
    md = cli("sessions", "export", session_id)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith("# ")
    assert session_id in md.stdout
    assert "export me [[tokens:5]]" in md.stdout
    assert stored_text(body["messages"][1]) in md.stdout

    target = home / "work" / "out" / "session.json"
    target.parent.mkdir()
    written = cli("sessions", "export", session_id, "--format", "json", "-o", str(target))
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    document = json.loads(target.read_text())
    assert document["session"]["id"] == session_id
    assert [m["role"] for m in document["messages"]] == ["user", "assistant"]

    unwritable = cli("sessions", "export", session_id, "-o", str(home / "no" / "such" / "dir.md"))
    assert unwritable.returncode == 1
    assert len(unwritable.stderr.strip().splitlines()) == 1


def test_model_and_user_text_cannot_inject_terminal_escapes(
    api: httpx.Client, cli: Callable[..., CliRun]
) -> None:
    # A title that clears the screen and retitles the window, a message that does the same.
    nasty = "\x1b[2J\x1b]0;pwned\x07 hello \x9b31m red\r overwritten"
    session_id, _ = exchange(api, f"{nasty} [[tokens:3]]")
    api.patch(f"/v1/sessions/{session_id}", json={"title": f"T{nasty}"})
    shown = cli("sessions", "show", session_id)
    listed = cli("sessions", "list", "--q", "hello", "--limit", "200")
    for run in (shown, listed):
        assert run.returncode == 0, run.stderr
        assert not set(run.stdout) & {"\x1b", "\x9b", "\r", "\x07"}
    assert session_id in listed.stdout
    assert "pwned" not in shown.stdout
    assert "hello  red overwritten" in shown.stdout

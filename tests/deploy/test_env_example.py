""".env.example lists every setting once, with its real default, and nothing that is gone."""

from __future__ import annotations

import re
from typing import Any

from streams_service.config import Settings
from tests.support import REPO_ROOT

LINE = re.compile(r"^#?\s?([A-Z][A-Z0-9_]*)=(.*)$")
# Variables read outside the service's Settings: by the console (console/config.py) and by the
# `chatops` terminal client (issue 8).
CLIENT_VARIABLES = {"STREAMS_URL", "STREAMS_TOKEN"}


def _example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        match = LINE.match(line)
        if match:
            name, value = match.groups()
            assert name not in values, f".env.example lists {name} twice"
            values[name] = value
    return values


def _fields() -> dict[str, str]:
    return {name.upper(): name for name in Settings.model_fields}


def _console_variables() -> set[str]:
    source = "\n".join(p.read_text() for p in sorted((REPO_ROOT / "console").glob("*.py")))
    return set(re.findall(r'"((?:STREAMS|CONSOLE)_[A-Z0-9_]+)"', source))


def test_every_setting_has_a_line() -> None:
    missing = sorted(set(_fields()) - set(_example()))
    assert not missing, f"settings missing from .env.example: {missing}"


def test_every_variable_the_console_reads_has_a_line() -> None:
    missing = sorted(_console_variables() - set(_example()))
    assert not missing, f"console variables missing from .env.example: {missing}"


def test_every_line_is_something_that_is_read() -> None:
    known = set(_fields()) | CLIENT_VARIABLES | _console_variables()
    stale = sorted(set(_example()) - known)
    assert not stale, f".env.example lists variables nothing reads: {stale}"


def test_the_values_shown_are_the_defaults() -> None:
    fields = _fields()
    # Everything but the one field under test is the same in both, so only it can differ.
    baseline: dict[str, Any] = {"_env_file": None}
    for name, value in _example().items():
        if name not in fields:
            continue
        field = fields[name]
        default = Settings.model_fields[field].default
        if value == "":
            assert default in (None, ""), (
                f"{name}: .env.example shows no value, default is {default!r}"
            )
            continue
        shown = getattr(Settings(**baseline, **{field: value}), field)
        real = getattr(Settings(**baseline, **{field: default}), field)
        assert shown == real, f"{name}: .env.example shows {value!r}, the default is {default!r}"

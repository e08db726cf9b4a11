"""Readers for the deploy files (Dockerfile, .dockerignore, fly*.toml, workflows) the tests check.

Small on purpose: they understand the subset of each format our files use, and fail loudly on
anything else rather than guess.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO_ROOT

WORKFLOWS_DIR = REPO_ROOT / ".github" / "workflows"
WORKFLOW_FILES = ("ci.yml", "deploy-production.yml", "deploy-preview.yml", "cleanup-preview.yml")
SERVICE_APP = "chatops-streams"
CONSOLE_APP = "chatops-console"


# --- fly.toml ---------------------------------------------------------------------------------


def fly_config(name: str = "fly.toml") -> dict[str, Any]:
    with (REPO_ROOT / name).open("rb") as handle:
        return tomllib.load(handle)


def seconds(value: int | float | str) -> float:
    """A Fly duration: a number of seconds or a string like "40s", "1m", "500ms"."""
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", value.strip())
    assert match, f"unreadable duration {value!r}"
    number, unit = float(match.group(1)), match.group(2)
    return number * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


def megabytes(vm: dict[str, Any]) -> int:
    """Memory of a [[vm]] entry in MB (`memory = "512mb"|"1gb"` or `memory_mb = 512`)."""
    if "memory_mb" in vm:
        return int(vm["memory_mb"])
    raw = str(vm["memory"]).strip().lower()
    match = re.fullmatch(r"(\d+)\s*(mb|gb)?", raw)
    assert match, f"unreadable memory {raw!r}"
    return int(match.group(1)) * (1024 if match.group(2) == "gb" else 1)


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the (continuation-joined) line

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3 :] if "CMD" in text else ""
        text = text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(part, str) for part in value)
        return value


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_stages(path: Path = REPO_ROOT / "Dockerfile") -> list[Stage]:
    """The Dockerfile's build stages, with ARG defaults substituted into FROM."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # comment lines inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            parts = rest.split()
            image = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], parts[0]
            )
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image=image, name=name))
            continue
        assert stages, f"instruction before FROM: {line}"
        stages[-1].instructions.append(Instruction(keyword, rest))
    return stages


def env_assignments(instruction: Instruction) -> list[tuple[str, str]]:
    """`ENV A=1 B="two"` → [("A", "1"), ("B", "two")] (the key=value form only)."""
    pairs = []
    for token in shlex.split(instruction.args):
        name, sep, value = token.partition("=")
        assert sep, f"ENV {instruction.args!r}: only the KEY=value form is supported"
        pairs.append((name, value))
    return pairs


def copy_sources(instruction: Instruction) -> tuple[list[str], str, str | None]:
    """(sources, destination, --from stage) of a COPY instruction (options other than
    --from and --chown are not used by our Dockerfile)."""
    tokens = shlex.split(instruction.args)
    source_stage = None
    while tokens and tokens[0].startswith("--"):
        option = tokens.pop(0)
        if option.startswith("--from="):
            source_stage = option.split("=", 1)[1]
        else:
            assert option.startswith("--chown="), f"unsupported COPY option {option}"
    assert len(tokens) >= 2, f"COPY needs a source and a destination: {instruction.args}"
    return tokens[:-1], tokens[-1], source_stage


# --- .dockerignore ----------------------------------------------------------------------------


def dockerignore_patterns(
    path: Path = REPO_ROOT / ".dockerignore",
) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per pattern, in file order; the last match decides (Docker's rule)."""
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = line.removeprefix("!").strip().strip("/")
        patterns.append((exception, re.compile(_glob_to_regex(line))))
    return patterns


def _glob_to_regex(pattern: str) -> str:
    out = ""
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out += "(?:.*/)?"
            index += 3
            continue
        if pattern.startswith("**", index):
            out += ".*"
            index += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        index += 1
    # A pattern that names a directory excludes everything below it.
    return f"^{out}(?:/.*)?$"


def excluded(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    result = False
    for exception, regex in patterns:
        if regex.match(relative):
            result = not exception
    return result


def build_context_files(root: Path = REPO_ROOT) -> list[str]:
    """Paths (relative, POSIX) that `docker build .` would send, after .dockerignore."""
    patterns = dockerignore_patterns(root / ".dockerignore")
    # Without `!` exceptions an excluded directory can be skipped whole (.venv, .git, ...).
    prune = not any(exception for exception, _ in patterns)
    found: list[str] = []

    def walk(directory: Path) -> None:
        for entry in sorted(directory.iterdir()):
            relative = entry.relative_to(root).as_posix()
            if prune and excluded(relative, patterns):
                continue
            if entry.is_symlink():
                continue
            if entry.is_dir():
                walk(entry)
            elif not excluded(relative, patterns):
                found.append(relative)

    walk(root)
    return found


# --- workflows --------------------------------------------------------------------------------


def workflow(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS_DIR / name).read_text())
    assert isinstance(data, dict)
    # YAML 1.1 reads the bare key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps", []))


def secrets_set_on_apps() -> dict[str, set[str]]:
    """Every variable a workflow hands to a Fly app as a secret, by target app.

    `flyctl secrets set` steps: the step's env entries fed from `secrets.*` (the script reads
    them from there) for the app named by `--app`. fly-pr-review-apps steps: the NAME=... pairs
    of its `secrets` input, for the app its `name` input names (PR number stripped).
    """
    targets: dict[str, set[str]] = {}
    for file in WORKFLOW_FILES:
        for job in workflow(file).get("jobs", {}).values():
            for step in steps(job):
                run = step.get("run", "")
                if "flyctl secrets set" in run or "flyctl secrets import" in run:
                    app_match = re.search(r"--app\s+(\S+)", run)
                    assert app_match, f"{file}: a secrets step without --app: {run!r}"
                    names = {
                        name
                        for name, value in step.get("env", {}).items()
                        if "secrets." in str(value)
                    }
                    for name in names:
                        assert name in run, f"{file}: {name} is in env but the script never uses it"
                    targets.setdefault(app_match.group(1), set()).update(names)
                uses = step.get("uses", "")
                if uses.startswith("superfly/fly-pr-review-apps@"):
                    inputs = step.get("with", {})
                    app = re.sub(r"-pr-\$\{\{.*?\}\}$", "", str(inputs.get("name", "")))
                    names = set(
                        re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", str(inputs.get("secrets", "")))
                    )
                    targets.setdefault(app, set()).update(names)
    return targets

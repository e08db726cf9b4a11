"""Write a pull request's Fly config from fly.toml or fly.console.toml (deploy-preview.yml).

A preview differs from production in three ways, and only those:
- its app name (`chatops-streams-pr-N`, `chatops-console-pr-N`);
- it may stop completely when idle (`min_machines_running = 0`): previews cost nothing unused;
- the console follows the preview's service (`STREAMS_URL`) and has no `[[files]]` (no OIDC
  secrets file: a preview console runs with the clearly marked local user).

Usage: python3 scripts/fly_preview_config.py SRC DEST --app NAME [--streams-url URL]
Standard library only, so the workflow needs no install step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

_TABLE_HEADER = re.compile(r"^\s*\[")


def preview_config(source: str, *, app: str, streams_url: str | None = None) -> str:
    """The preview variant of a Fly config; ValueError if the source lacks an expected key."""
    # Only the top-level key: `[processes]` has an `app = "<command>"` line of its own.
    head, tables = _split_top_level(source)
    text = _replace_one(head, "app", json.dumps(app)) + tables
    text = _replace_one(text, "min_machines_running", "0")
    if streams_url is not None:
        text = _replace_one(text, "STREAMS_URL", json.dumps(streams_url))
    text = _drop_files_tables(text)
    parsed = tomllib.loads(text)  # the result must still be valid TOML
    if parsed.get("app") != app:
        raise ValueError("preview config lost its app name")
    return text


def _replace_one(text: str, key: str, value: str) -> str:
    pattern = re.compile(rf"^(\s*{re.escape(key)}\s*=\s*).*$", re.MULTILINE)
    result, count = pattern.subn(lambda m: m.group(1) + value, text)
    if count != 1:
        raise ValueError(f"expected exactly one `{key} = ...` line, found {count}")
    return result


def _split_top_level(text: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if _TABLE_HEADER.match(line):
            return "".join(lines[:index]), "".join(lines[index:])
    return text, ""


def _drop_files_tables(text: str) -> str:
    kept: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        if _TABLE_HEADER.match(line):
            skipping = line.strip() == "[[files]]"
        if not skipping:
            kept.append(line)
    return "".join(kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--app", required=True)
    parser.add_argument("--streams-url")
    args = parser.parse_args(argv)
    try:
        text = preview_config(args.source.read_text(), app=args.app, streams_url=args.streams_url)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"fly_preview_config: {args.source}: {exc}", file=sys.stderr)
        return 2
    args.dest.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the client finds the service and its token.

Each key resolves on its own, first match wins: the `--url`/`--token` flags, the environment
(`STREAMS_URL`, `STREAMS_TOKEN`), a `.env` file in the current directory, then
`$XDG_CONFIG_HOME/chatops/config.toml` (default `~/.config/chatops/config.toml`, keys `url` and
`token`). The source is kept beside each value so an error can say which one was wrong without
ever printing a token.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "STREAMS_URL"
TOKEN_ENV = "STREAMS_TOKEN"  # noqa: S105 (a variable name, not a secret)


class ConfigError(Exception):
    """The configuration cannot be used (one line, for stderr)."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    url: str
    url_source: str
    token: str | None
    token_source: str | None


def config_file(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or ""
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "chatops" / "config.toml"


def read_dotenv(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines (optional `export `, quotes, `#` comments): the subset `.env` files use.

    Only two keys are read from it, so a small parser beats a dependency; lines it does not
    understand are skipped, as every `.env` reader does."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        if key:
            values[key] = value
    return values


def read_config_file(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    values: dict[str, str] = {}
    for key in ("url", "token"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{path}: '{key}' must be a string")
        values[key] = value
    return values


def resolve(
    *,
    url: str | None = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ClientConfig:
    environ = os.environ if env is None else env
    dotenv_path = (cwd or Path.cwd()) / ".env"
    dotenv = read_dotenv(dotenv_path)
    file_path = config_file(environ)
    from_file = read_config_file(file_path)

    def pick(flag: str | None, flag_name: str, name: str, key: str) -> tuple[str, str] | None:
        # An empty value counts as unset at every layer, as shells make `VAR=` easy to leave.
        layers = (
            (flag, flag_name),
            (environ.get(name), f"{name} (environment)"),
            (dotenv.get(name), f"{name} in {dotenv_path}"),
            (from_file.get(key), f"'{key}' in {file_path}"),
        )
        return next(((v.strip(), src) for v, src in layers if v and v.strip()), None)

    chosen_url = pick(url, "--url", URL_ENV, "url") or (DEFAULT_URL, "the default")
    chosen_token = pick(token, "--token", TOKEN_ENV, "token")
    value, source = chosen_url
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"the service URL from {source} is not an http(s) URL: {value!r}")
    return ClientConfig(
        url=value.rstrip("/"),
        url_source=source,
        token=chosen_token[0] if chosen_token else None,
        token_source=chosen_token[1] if chosen_token else None,
    )

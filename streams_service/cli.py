"""`chatops` command line: serve the service, migrate the database."""

from __future__ import annotations

import argparse
import ipaddress
import math
import sys
from typing import Any

from pydantic import ValidationError

from db.errors import DatabaseURLError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from db.migrate import upgrade
    from streams_service.app import create_app
    from streams_service.config import Settings
    from streams_service.observability.logging import configure_logging

    settings = Settings()
    if not settings.streams_secret and not _is_loopback(args.host):
        print(
            f"chatops: refusing to serve on {args.host} without STREAMS_SECRET: dev mode makes "
            "every caller an admin, so it only binds to loopback (127.0.0.1, ::1, localhost)",
            file=sys.stderr,
        )
        return 2
    if settings.is_sqlite:
        # The embedded default migrates itself; Postgres is migrated by `chatops db upgrade`
        # (the release command of a deploy), never by a serving replica.
        upgrade(settings.database_url)
    workers = args.workers or settings.workers
    if workers > 1 and settings.is_sqlite:
        print(
            "chatops: --workers > 1 needs Postgres (SQLite cannot wake other processes)",
            file=sys.stderr,
        )
        return 2
    # One process serves everything; more worker processes share the port and meet in Postgres.
    target: Any = (
        create_app(settings, handle_signals=True)
        if workers == 1
        else "streams_service.app:app_from_env"
    )
    # uvicorn's own lines go through the service's log pipeline from the first one (the
    # lifespan configures it again, identically); log_config=None keeps uvicorn's handlers out.
    configure_logging(settings)
    uvicorn.run(
        target,
        factory=workers > 1,
        log_config=None,
        workers=workers if workers > 1 else None,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        # Open requests get longer than the drain, which starts with the signal and runs
        # beside this wait: nothing in flight is cut while generations may still finish.
        # Live readers do not hold it up; the drain ends them at once.
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + 5,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=settings.http_keep_alive_s,
    )
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _db_upgrade(args: argparse.Namespace) -> int:
    from db.migrate import upgrade
    from streams_service.config import Settings

    settings = Settings()
    upgrade(settings.database_url, args.revision)
    print(f"database at revision {args.revision}")
    return 0


def _simulator(args: argparse.Namespace) -> int:
    from streams_service.llm.simulator import SimulatorConfig, serve_simulator

    try:
        config = SimulatorConfig(
            ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s, output_tokens=args.output_tokens
        )
    except ValueError as exc:
        print(f"chatops simulator: {exc}", file=sys.stderr)
        return 2
    serve_simulator(config, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatops", description="chatops: Claude chat on durable streams"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the streams service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--workers",
        type=int,
        default=0,
        help="worker processes (Postgres only; default WORKERS or 1)",
    )
    serve.set_defaults(func=_serve)

    simulator = sub.add_parser(
        "simulator", help="run the local Anthropic Messages API simulator (offline Claude)"
    )
    simulator.add_argument("--host", default="127.0.0.1")
    simulator.add_argument("--port", type=int, default=8090)
    simulator.add_argument("--ttft-ms", type=float, default=300.0, help="delay to first event")
    simulator.add_argument("--tokens-per-s", type=float, default=80.0, help="0 = unpaced")
    simulator.add_argument("--output-tokens", type=int, default=60, help="reply length")
    simulator.set_defaults(func=_simulator)

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply migrations to DATABASE_URL")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db_upgrade)

    from streams_service.access.cli import add_commands
    from streams_service.client.commands import add_commands as add_client_commands

    add_commands(sub)
    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except DatabaseURLError as exc:
        print(f"chatops: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        print(f"chatops: invalid settings: {problems}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())

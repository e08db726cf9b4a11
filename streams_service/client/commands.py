"""`chatops chat`, `chatops sessions ...` and `chatops tail`: the terminal client's commands.

Every failure is one line on stderr and a non-zero exit: an unreachable service, a rejected
token, a session that does not exist, a bad request. Never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from console.client import ServiceError, SessionInfo
from console.stream import SessionFollower
from streams_service.client.chat import as_messages, describe_session, run_chat
from streams_service.client.config import ConfigError, resolve
from streams_service.client.follow import LiveFollow
from streams_service.client.http import CliClient, connect, describe
from streams_service.client.render import Screen, TranscriptPrinter, clean, table

Command = Callable[[argparse.Namespace, CliClient], int]
# Rows one list request asks for at most (the service's cap).
PAGE_MAX = 200


def _error(text: str) -> None:
    print(f"chatops: {' '.join(text.split())}", file=sys.stderr, flush=True)


def _notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def client_command(run: Command) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            config = resolve(url=args.url, token=args.token)
        except ConfigError as exc:
            _error(str(exc))
            return 2
        try:
            with connect(config) as client:
                return run(args, client)
        except ServiceError as exc:
            _error(describe(exc, config, getattr(args, "session", None)))
            return 1
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, and keep Python from
            # complaining when it flushes stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1

    return wrapped


# ---------------------------------------------------------------------------------- chat, tail


def _chat(args: argparse.Namespace, client: CliClient) -> int:
    return run_chat(client, args.session, args.model)


def _tail(args: argparse.Namespace, client: CliClient) -> int:
    info = client.get_session(args.session)
    _notice(describe_session(info))
    screen = Screen(sys.stdout)
    printer = TranscriptPrinter(screen)
    if info.ended_at is not None:
        # Nothing more will come, and an ended session's stream may have expired already:
        # the stored messages are the whole story.
        stored = as_messages(info.messages or [])
        printer.update(stored[max(0, len(stored) - args.lines) :])
        screen.newline()
        screen.notice("[the session has ended]")
        return 0
    follower = SessionFollower(info.id)
    follower.catch_up(client)
    # The last N finished messages, and an answer in progress from its beginning.
    finished = [m.id for m in follower.transcript.visible if m.status != "streaming"]
    printer.skip(finished[: max(0, len(finished) - args.lines)])
    printer.update(follower.transcript.visible)
    live = LiveFollow(client, follower, notice=screen.notice)
    while not follower.closed:
        if live.step():
            printer.update(follower.transcript.visible)
    screen.newline()
    screen.notice("[the session has ended]")
    return 0


# ---------------------------------------------------------------------------------- sessions


def _money(value: Decimal) -> str:
    return f"${value:.4f}"


def _when(info: SessionInfo) -> str:
    stamp = info.updated_at or info.created_at
    return stamp.strftime("%Y-%m-%d %H:%M") if stamp else ""


def _list(args: argparse.Namespace, client: CliClient) -> int:
    rows: list[SessionInfo] = []
    cursor: str | None = args.cursor
    # Pages follow the service's keyset cursor until the limit is reached.
    while True:
        want = args.limit - len(rows)
        page = client.list_sessions(
            q=args.q, trash=args.trash, user=args.user, cursor=cursor, limit=min(want, PAGE_MAX)
        )
        rows.extend(page.items)
        cursor = page.next_cursor
        if cursor is None or len(rows) >= args.limit:
            break
    table(
        sys.stdout,
        ["ID", "UPDATED", "MSGS", "COST", "MODEL", "TITLE"],
        [
            [
                s.id,
                _when(s),
                str(s.message_count),
                _money(s.cost_usd),
                s.model,
                (s.title or "untitled")[:60] + (" (deleted)" if s.deleted_at else ""),
            ]
            for s in rows
        ],
    )
    if not rows:
        _notice("no sessions" + (" in the trash" if args.trash else ""))
    if cursor is not None:
        _notice(f"more: add --cursor {cursor}")
    return 0


def _show(args: argparse.Namespace, client: CliClient) -> int:
    info = client.get_session(args.session)
    screen = Screen(sys.stdout)
    screen.line(describe_session(info))
    created = f"created {info.created_at:%Y-%m-%d %H:%M} UTC · " if info.created_at else ""
    screen.line(f"{created}{info.message_count} messages · {_money(info.cost_usd)}", "dim")
    TranscriptPrinter(screen, approval_hint=False).update(as_messages(info.messages or []))
    screen.newline()
    if info.active_generation_id:
        _notice(f"[an answer is being written: follow it with `chatops tail {info.id}`]")
    return 0


def _rename(args: argparse.Namespace, client: CliClient) -> int:
    info = client.rename(args.session, args.title)
    print(f"renamed {info.id}: {clean(info.title or '')}")
    return 0


def _delete(args: argparse.Namespace, client: CliClient) -> int:
    if args.purge:
        if not args.yes:
            _error("--purge deletes the session for good; add --yes to confirm")
            return 2
        client.purge(args.session)
        print(f"purged {args.session}")
        return 0
    client.delete(args.session)
    print(f"deleted {args.session} (`chatops sessions restore {args.session}` brings it back)")
    return 0


def _restore(args: argparse.Namespace, client: CliClient) -> int:
    info = client.restore(args.session)
    print(f"restored {info.id}")
    return 0


def _export(args: argparse.Namespace, client: CliClient) -> int:
    download = client.export(args.session, args.format)
    if args.output is not None:
        path = Path(args.output)
        try:
            path.write_bytes(download.data)
        except OSError as exc:
            _error(f"cannot write {path}: {exc.strerror or exc}")
            return 1
        _notice(f"wrote {path} ({len(download.data)} bytes)")
        return 0
    if sys.stdout.isatty():
        # On a terminal the Markdown is shown, so its text is made safe like any message.
        sys.stdout.write(clean(download.data.decode("utf-8", errors="replace")))
        sys.stdout.flush()
    else:
        sys.stdout.buffer.write(download.data)
        sys.stdout.buffer.flush()
    return 0


# ---------------------------------------------------------------------------------- parser


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return number

    return parse


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--url", help="the service (default: STREAMS_URL, .env, config file, then local)"
    )
    group.add_argument("--token", help="API token (default: STREAMS_TOKEN, .env, config file)")
    return common


def add_commands(sub: Any) -> None:
    common = _connection_options()

    chat = sub.add_parser(
        "chat", parents=[common], help="chat in the terminal (live, resumable sessions)"
    )
    chat.add_argument("--session", help="continue (or reattach to) this session")
    chat.add_argument("--model", help="model for new messages (see GET /v1/models)")
    chat.set_defaults(func=client_command(_chat))

    tail = sub.add_parser("tail", parents=[common], help="follow a session live")
    tail.add_argument("session", metavar="SESSION")
    tail.add_argument(
        "-n",
        "--lines",
        type=_at_least(0),
        default=10,
        help="finished messages to show before following (default 10)",
    )
    tail.set_defaults(func=client_command(_tail))

    sessions = sub.add_parser("sessions", help="list, show, rename, delete, restore, export")
    ss = sessions.add_subparsers(dest="sessions_command", required=True)
    ls = ss.add_parser("list", parents=[common], help="sessions, newest first")
    ls.add_argument("--q", help="full-text search over titles and messages")
    ls.add_argument("--trash", action="store_true", help="deleted sessions only")
    ls.add_argument("--user", help="ops/admin: a user's id, or 'all'")
    ls.add_argument("--limit", type=_at_least(1), default=20, help="rows to show (default 20)")
    ls.add_argument("--cursor", help="continue a list where the last one stopped")
    ls.set_defaults(func=client_command(_list))

    show = ss.add_parser("show", parents=[common], help="print a session's transcript")
    show.add_argument("session", metavar="SESSION")
    show.set_defaults(func=client_command(_show))

    rename = ss.add_parser("rename", parents=[common], help="change a session's title")
    rename.add_argument("session", metavar="SESSION")
    rename.add_argument("title")
    rename.set_defaults(func=client_command(_rename))

    delete = ss.add_parser("delete", parents=[common], help="move a session to the trash")
    delete.add_argument("session", metavar="SESSION")
    delete.add_argument("--purge", action="store_true", help="admin: delete for good")
    delete.add_argument("--yes", action="store_true", help="confirm --purge")
    delete.set_defaults(func=client_command(_delete))

    restore = ss.add_parser("restore", parents=[common], help="bring a session back from the trash")
    restore.add_argument("session", metavar="SESSION")
    restore.set_defaults(func=client_command(_restore))

    export = ss.add_parser("export", parents=[common], help="a session as Markdown or JSON")
    export.add_argument("session", metavar="SESSION")
    export.add_argument("--format", choices=("md", "json"), default="md")
    export.add_argument("-o", "--output", metavar="FILE", help="write here (default stdout)")
    export.set_defaults(func=client_command(_export))

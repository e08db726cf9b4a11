"""`chatops users ...` and `chatops tokens ...`: the arguments. What they do lives in
`admin_cli`, imported only when one of them runs, so every other command starts without
loading SQLAlchemy and FastAPI."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from streams_service.access.roles import ROLES


def _run(name: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from streams_service.access import admin_cli

        handler: Callable[[argparse.Namespace], int] = getattr(admin_cli, f"_{name}")
        return handler(args)

    return command


def add_commands(sub: Any) -> None:
    u = sub.add_parser("users", help="manage users (directly on DATABASE_URL)")
    us = u.add_subparsers(dest="users_command", required=True)
    add = us.add_parser("add", help="add a user")
    add.add_argument("email")
    add.add_argument("--role", choices=ROLES, default="member")
    add.add_argument("--name")
    add.set_defaults(func=_run("users_add"))
    us.add_parser("list", help="list users").set_defaults(func=_run("users_list"))
    role = us.add_parser("role", help="change a user's role")
    role.add_argument("user", help="email or id")
    role.add_argument("role", choices=ROLES)
    role.set_defaults(func=_run("users_role"))
    dis = us.add_parser("disable", help="disable a user (their tokens stop working)")
    dis.add_argument("user", help="email or id")
    dis.set_defaults(func=_run("users_disable"))
    en = us.add_parser("enable", help="enable a disabled user")
    en.add_argument("user", help="email or id")
    en.set_defaults(func=_run("users_enable"))
    budget = us.add_parser("budget", help="set a user's daily budget in USD ('default' unsets)")
    budget.add_argument("user", help="email or id")
    budget.add_argument("usd")
    budget.set_defaults(func=_run("users_budget"))

    t = sub.add_parser("tokens", help="manage personal API tokens (directly on DATABASE_URL)")
    ts = t.add_subparsers(dest="tokens_command", required=True)
    create = ts.add_parser("create", help="create a token; it is printed alone on the last line")
    create.add_argument("--user", required=True, help="email or id")
    create.add_argument("--name")
    create.add_argument("--expires-days", type=int, default=None)
    create.set_defaults(func=_run("tokens_create"))
    tl = ts.add_parser("list", help="list tokens (never the secret part)")
    tl.add_argument("--user", help="email or id")
    tl.set_defaults(func=_run("tokens_list"))
    rev = ts.add_parser("revoke", help="revoke a token")
    rev.add_argument("token_id")
    rev.set_defaults(func=_run("tokens_revoke"))

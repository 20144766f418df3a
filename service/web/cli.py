"""``triage user add|passwd|disable|list`` and ``triage token create|list|revoke``.

Passwords are prompted twice on a terminal, or read from the first line of standard input with
``--password-stdin`` (scripts, CI); they never appear on the command line. A new API token is
printed once, on standard output, and only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from service.config import Settings

logger = logging.getLogger(__name__)

CLI_ACTOR = "cli"


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise SystemExit("passwords differ")
    return first


def _with_session(settings: Settings, work: Callable[[Any], int]) -> int:
    from service.db.session import make_engine, make_session_factory
    from service.web.auth import UserError

    engine = make_engine(settings.db_url)
    try:
        with make_session_factory(engine)() as session:
            try:
                code = work(session)
            except UserError as exc:
                session.rollback()
                print(f"error: {exc}", file=sys.stderr)
                return 2
            session.commit()
            return code
    finally:
        engine.dispose()


def cmd_user_add(args: argparse.Namespace, settings: Settings) -> int:
    from service.web import auth

    role = auth.parse_role(args.role)
    password = _read_password(args)

    def work(session: Any) -> int:
        auth.create_user(session, args.username, password, role, actor=CLI_ACTOR)
        print(f"user {args.username} ({role.value.lower()}) added")
        return 0

    return _with_session(settings, work)


def cmd_user_passwd(args: argparse.Namespace, settings: Settings) -> int:
    from service.web import auth

    password = _read_password(args)

    def work(session: Any) -> int:
        auth.set_password(session, args.username, password, actor=CLI_ACTOR)
        print(f"password of {args.username} changed; their sessions end")
        return 0

    return _with_session(settings, work)


def cmd_user_disable(args: argparse.Namespace, settings: Settings) -> int:
    from service.web import auth

    def work(session: Any) -> int:
        auth.disable_user(session, args.username, actor=CLI_ACTOR)
        print(f"user {args.username} disabled; their sessions and tokens no longer work")
        return 0

    return _with_session(settings, work)


def cmd_user_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.db.tables import User

    def work(session: Any) -> int:
        for user in session.execute(select(User).order_by(User.username)).scalars():
            print(json.dumps({"username": user.username, "role": user.role.value.lower(),
                              "active": user.active,
                              "last_login_at": user.last_login_at.isoformat()
                              if user.last_login_at else None}))
        return 0

    return _with_session(settings, work)


def cmd_token_create(args: argparse.Namespace, settings: Settings) -> int:
    from service.web import auth

    def work(session: Any) -> int:
        row, token = auth.create_token(session, args.username, name=args.name, actor=CLI_ACTOR)
        print(f"token {row.id} for {args.username} (shown once; send it as "
              f"'Authorization: Bearer TOKEN'):", file=sys.stderr)
        print(token)
        return 0

    return _with_session(settings, work)


def cmd_token_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.db.tables import ApiToken, User

    def work(session: Any) -> int:
        query = select(ApiToken, User.username).join(User, User.id == ApiToken.user_id)
        if args.username:
            query = query.where(User.username == args.username)
        for token, username in session.execute(query.order_by(ApiToken.id)).all():
            print(json.dumps({"id": token.id, "username": username, "name": token.name,
                              "prefix": token.prefix,
                              "revoked": token.revoked_at is not None,
                              "last_used_at": token.last_used_at.isoformat()
                              if token.last_used_at else None}))
        return 0

    return _with_session(settings, work)


def cmd_token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from service.web import auth

    def work(session: Any) -> int:
        auth.revoke_token(session, args.token_id, actor=CLI_ACTOR)
        print(f"token {args.token_id} revoked")
        return 0

    return _with_session(settings, work)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = sub.add_parser("user", help="dashboard users").add_subparsers(dest="action",
                                                                         required=True)
    add = user.add_parser("add", help="add a user (password prompted)")
    add.add_argument("username")
    add.add_argument("--role", required=True, choices=["radiologist", "admin"])
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    add.set_defaults(handler=cmd_user_add)
    passwd = user.add_parser("passwd", help="set a user's password (ends their sessions)")
    passwd.add_argument("username")
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.set_defaults(handler=cmd_user_passwd)
    disable = user.add_parser("disable", help="disable a user and revoke their tokens")
    disable.add_argument("username")
    disable.set_defaults(handler=cmd_user_disable)
    user.add_parser("list", help="list users").set_defaults(handler=cmd_user_list)

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="action",
                                                                      required=True)
    create = token.add_parser("create", help="create an API token for a user (printed once)")
    create.add_argument("username")
    create.add_argument("--name", help="what the token is for")
    create.set_defaults(handler=cmd_token_create)
    listing = token.add_parser("list", help="list tokens (never the tokens themselves)")
    listing.add_argument("username", nargs="?")
    listing.set_defaults(handler=cmd_token_list)
    revoke = token.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id", type=int)
    revoke.set_defaults(handler=cmd_token_revoke)

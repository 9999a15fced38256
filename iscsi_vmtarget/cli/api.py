"""``iscsi-vmtarget api token create|list|revoke``: bearer tokens of the HTTPS API.

``create NAME --role read|operate|admin`` prints the token once (only its hash is
kept, in ``<state-dir>/conf/api-tokens.json``); ``revoke NAME`` ends it at once,
also for a running daemon. The API itself: ``serve --api HOST:PORT``.
"""

from __future__ import annotations

import argparse
import time

from ..server.api.tokens import ROLES, TokenStore
from .options import add_state_dir
from .route import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    api = sub.add_parser("api", help="tokens of the HTTPS management API", description=__doc__)
    nouns = api.add_subparsers(dest="api_command", metavar="NOUN", required=True)
    token = nouns.add_parser("token", help="create, list or revoke API tokens")
    verbs = token.add_subparsers(dest="token_command", metavar="VERB", required=True)

    p = verbs.add_parser("create", help="create a token and print it (shown once)")
    p.add_argument("name", help="what the daemon logs with each call of this token")
    p.add_argument(
        "--role",
        choices=ROLES,
        required=True,
        help="read: GET routes; operate: also VMs, snapshots, clones, resize; "
        "admin: also grants and deleting VMs",
    )
    p.add_argument("--json", action="store_true")
    add_state_dir(p)
    p.set_defaults(func=_create)

    p = verbs.add_parser("list", help="list the tokens (names and roles, never secrets)")
    p.add_argument("--json", action="store_true")
    add_state_dir(p)
    p.set_defaults(func=_list)

    p = verbs.add_parser("revoke", help="revoke a token (at once, also for a running daemon)")
    p.add_argument("name")
    add_state_dir(p)
    p.set_defaults(func=_revoke)


def _create(args: argparse.Namespace) -> int:
    secret = TokenStore(args.state_dir).create(args.name, args.role)
    if args.json:
        print_json({"name": args.name, "role": args.role, "token": secret})
    else:
        print(secret)
    return 0


def _list(args: argparse.Namespace) -> int:
    tokens = [t.public() for t in TokenStore(args.state_dir).load().values()]
    if args.json:
        print_json(tokens)
        return 0
    for t in tokens:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t["created"]))
        print(f"{t['name']:<24} {t['role']:<8} created {when} UTC")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    token = TokenStore(args.state_dir).revoke(args.name)
    print(f"revoked token {token.name} ({token.role})")
    return 0

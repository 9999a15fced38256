"""``iscsi-vmtarget portal``: listen on another address (or stop listening) while
running; the portal is kept in ``conf/config.json`` for the next start (where
``serve --portal`` still wins)."""

from __future__ import annotations

import argparse

from ..server.model import parse_portal
from .target import add_common, done, invoke, tpgt


def _portal(text: str) -> str:
    try:
        parse_portal(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    portal = sub.add_parser("portal", help="add and remove portals", description=__doc__)
    verbs = portal.add_subparsers(dest="portal_command", metavar="VERB", required=True)
    p = verbs.add_parser("add", help="add a portal", description="Listen on HOST:PORT.")
    p.add_argument("listen", type=_portal, metavar="HOST:PORT")
    p.add_argument("--tpgt", type=tpgt, default=1, help="portal group tag (default 1)")
    add_common(p)
    p.set_defaults(
        func=lambda a: done(invoke(a, "portal.add", {"listen": a.listen, "tpgt": a.tpgt}))
    )
    p = verbs.add_parser("remove", help="remove a portal", description="Stop listening.")
    p.add_argument("listen", type=_portal, metavar="HOST:PORT")
    add_common(p)
    p.set_defaults(func=lambda a: done(invoke(a, "portal.remove", {"listen": a.listen})))

"""Options of the commands that log in to another target with the project's initiator
(``vm replicate``, ``state|config push|pull``): initiator name, CHAP both ways, and
the ``iscsi://`` URL checked before any connection."""

from __future__ import annotations

import argparse
import sys

from ..client.remote import LunUrl, UrlError, parse_url


def add_login_options(p: argparse.ArgumentParser, initiator: str, peer: str) -> None:
    """``--initiator-name`` (default ``initiator``) and the CHAP secrets for ``peer``."""
    p.add_argument("--initiator-name", default=initiator, metavar="IQN")
    p.add_argument("--chap-user", metavar="U", help=f"CHAP name to prove to the {peer}")
    p.add_argument("--chap-secret", metavar="S", help="its CHAP secret")
    p.add_argument("--mutual-secret", metavar="S", help=f"the secret the {peer} proves")


def login_url(args: argparse.Namespace, text: str) -> LunUrl | None:
    """``text`` parsed, CHAP options checked; None after a message (usage error)."""
    try:
        url = parse_url(text)
    except UrlError as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return None
    if bool(args.chap_user) != bool(args.chap_secret) and not url.user:
        print("iscsi-vmtarget: give both --chap-user and --chap-secret", file=sys.stderr)
        return None
    return url

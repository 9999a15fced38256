"""``iscsi-vmtarget acl``: who may log into a target and which LUNs each one sees.

Once a target has an ACL, initiators without one are refused (login status 02/02,
and SendTargets does not list the target) unless the target is in ``--allow-all``
mode. ``acl add`` replaces an existing ACL of the same initiator, so running it
twice changes nothing; ``acl remove`` logs that initiator's sessions out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

from ..server.acl import AclError, parse_lun_list
from .target import _describe_acl, add_chap, add_common, chap_args, done, invoke


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    acl = sub.add_parser("acl", help="manage initiator ACLs and LUN maps", description=__doc__)
    verbs = acl.add_subparsers(dest="acl_command", metavar="VERB", required=True)

    p = verbs.add_parser(
        "add",
        help="allow an initiator and map its LUNs",
        description="Allow INITIATOR on TARGET. --luns 0,1 shows target LUNs 0 and 1 "
        "under their own numbers; 5=2 shows target LUN 2 as LUN 5; a :ro suffix makes "
        "one read-only. Without --luns the initiator sees every LUN of the target.",
    )
    p.add_argument("target")
    p.add_argument("initiator")
    p.add_argument("--luns", type=_luns, metavar="LIST", help="e.g. 0,1 or 0=3,1=4:ro")
    p.add_argument(
        "--source",
        action="append",
        metavar="NET",
        help="only from this address or network (repeatable), e.g. 10.0.0.0/24",
    )
    p.add_argument("--view", choices=("guest", "raw"), help="view of VM units (default guest)")
    p.add_argument("--read-only", action="store_true", help="every mapped LUN read-only")
    add_chap(p)
    add_common(p)
    p.set_defaults(func=_add)

    p = verbs.add_parser(
        "remove",
        help="remove an initiator's ACL",
        description="Remove the ACL; its sessions are logged out.",
    )
    p.add_argument("target")
    p.add_argument("initiator")
    add_common(p)
    p.set_defaults(
        func=lambda a: done(invoke(a, "acl.remove", {"target": a.target, "initiator": a.initiator}))
    )

    p = verbs.add_parser("list", help="list ACLs", description="List ACLs (of one target).")
    p.add_argument("target", nargs="?")
    add_common(p)
    p.set_defaults(func=_list)


def _luns(text: str) -> list[dict[str, object]]:
    try:
        return [m.to_dict() for m in parse_lun_list(text)]
    except AclError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add(args: argparse.Namespace) -> int:
    payload = {
        "target": args.target,
        "initiator": args.initiator,
        "luns": args.luns,
        "sources": args.source or [],
        "view": args.view,
        "read_only": args.read_only,
        **chap_args(args),
    }
    return done(invoke(args, "acl.add", payload))


def _list(args: argparse.Namespace) -> int:
    json_out, args.json = args.json, True
    with contextlib.redirect_stdout(io.StringIO()):
        result = invoke(args, "acl.list", {"target": args.target})
    if result is None:
        return 1
    if json_out:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for acl in result["acls"]:
            print(f"{acl['target']}  {_describe_acl(acl)}")
    return 0

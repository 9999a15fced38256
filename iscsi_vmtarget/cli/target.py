"""``iscsi-vmtarget target``: create, delete, list and configure targets.

Like every management command it talks to the running daemon over its admin socket
(``<state-dir>/admin.sock``) and changes it live; with no daemon it edits the state
directory's ``conf/config.json``, which the next ``serve`` applies. Changes print one
line each (``+`` added, ``-`` removed, ``~`` changed); ``--json`` prints the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..scsi.lun_address import MAX_FLAT_LUN
from ..server.admin import AdminError
from ..server.config_changes import CHAP_KEYS
from .options import add_state_dir
from .route import router

Args = dict[str, Any]


def _bounded(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not a number") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} {text} is out of range ({low} to {high})")
    return value


def lun_number(text: str) -> int:
    """A LUN we can address: peripheral or flat space (SAM-5 §4.7)."""
    return _bounded(text, "LUN", 0, MAX_FLAT_LUN)


def tpgt(text: str) -> int:
    """A target portal group tag: 16 bits (RFC 7143 §13.9)."""
    return _bounded(text, "portal group tag", 0, 0xFFFF)


def add_common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    """--state-dir (where the daemon's socket and conf/ are) and --json."""
    add_state_dir(p, "the daemon's state directory")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON")


def add_chap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chap-user", metavar="U", help="CHAP name the initiator must prove")
    p.add_argument(
        "--chap-secret", metavar="S", help="its secret (at least 12 bytes, RFC 7143 §12.1.3)"
    )
    p.add_argument("--mutual-user", metavar="U", help="the target's name for mutual CHAP")
    p.add_argument("--mutual-secret", metavar="S", help="the target's mutual CHAP secret")


def chap_args(args: argparse.Namespace) -> Args:
    return {
        k: getattr(args, k)
        for k in CHAP_KEYS
        if getattr(args, k, None) is not None
    }


def invoke(args: argparse.Namespace, op: str, payload: Args) -> dict[str, Any] | None:
    """Run ``op``; print its changes (or JSON). None (after a message) on refusal."""
    try:
        result, live = router(args).operation(op, payload)
    except AdminError as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return None
    if getattr(args, "json", False):
        print(json.dumps({**result, "live": live}, indent=2, sort_keys=True))
    elif "changes" in result:
        for line in result["changes"]:
            print(line)
        if not result["changes"]:
            print("no change")
        elif not live and result.get("applied"):
            print("(no daemon running: saved for the next start)")
    return result


def done(result: dict[str, Any] | None) -> int:
    return 0 if result is not None else 1


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    target = sub.add_parser("target", help="manage targets", description=__doc__)
    verbs = target.add_subparsers(dest="target_command", metavar="VERB", required=True)

    p = verbs.add_parser("create", help="create a target", description="Create a target.")
    p.add_argument("name", help="target IQN")
    p.add_argument("--alias", help="TargetAlias (RFC 7143 §13.6)")
    p.add_argument("--tpgt", type=tpgt, default=1, help="portal group tag (default 1)")
    p.add_argument(
        "--allow-all",
        action="store_true",
        help="demo mode: initiators without an ACL may log in and see every LUN",
    )
    add_common(p)
    p.set_defaults(func=_create)

    p = verbs.add_parser(
        "delete",
        help="delete a target",
        description="Delete a target: its sessions are logged out; backing files stay.",
    )
    p.add_argument("name")
    add_common(p)
    p.set_defaults(func=lambda a: done(invoke(a, "target.delete", {"name": a.name})))

    p = verbs.add_parser("list", help="list targets", description="List targets.")
    add_common(p)
    p.set_defaults(func=_list)

    p = verbs.add_parser(
        "set",
        help="change a target's access settings",
        description="Set a target's CHAP secrets and allow-all mode (also for targets "
        "defined by --config or a VM pool; on a target of a VM, --allow-all and "
        "--deny-unknown apply to the VM: every export of it).",
    )
    p.add_argument("name")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--allow-all", dest="allow_all", action="store_true", default=None)
    mode.add_argument("--deny-unknown", dest="allow_all", action="store_false")
    p.add_argument("--alias")
    p.add_argument("--no-chap", action="store_true", help="drop the target's CHAP secrets")
    add_chap(p)
    add_common(p)
    p.set_defaults(func=_set)


def _create(args: argparse.Namespace) -> int:
    payload = {"name": args.name, "alias": args.alias, "tpgt": args.tpgt}
    payload["allow_all"] = args.allow_all
    return done(invoke(args, "target.create", payload))


def _set(args: argparse.Namespace) -> int:
    payload: Args = {"name": args.name, "allow_all": args.allow_all, "alias": args.alias}
    payload["no_chap"] = args.no_chap
    return done(invoke(args, "target.set", {**payload, **chap_args(args)}))


def _list(args: argparse.Namespace) -> int:
    result = invoke(args, "target.list", {})
    if result is None:
        return 1
    if not args.json:
        for t in result["targets"]:
            luns = ", ".join(f"{n}:{size}" for n, size in t["luns"].items()) or "-"
            flags = [t["origin"]] + (["allow-all"] if t["allow_all"] else [])
            flags += ["chap"] if t["chap"] else []
            print(f"{t['name']}  [{' '.join(flags)}]  luns {luns}  sessions {t['sessions']}")
            for acl in t["acls"]:
                print(f"  acl {describe_acl(acl)}")
    return 0


def describe_acl(acl: dict[str, Any]) -> str:
    if acl.get("luns") is None:
        luns = "all" + (" ro" if acl.get("read_only") else "")
    else:
        luns = ",".join(
            f"{m['number']}={m['lun']}"
            + (":ro" if m["read_only"] else "")
            + (":raw" if m["view"] == "raw" else "")
            for m in acl["luns"]
        )
    out = f"{acl['initiator']} luns {luns or '-'}"
    if acl.get("sources"):
        out += f" from {','.join(acl['sources'])}"
    if acl.get("chap"):
        out += f" chap {acl['chap']}" + (" mutual" if acl.get("mutual_chap") else "")
    return out

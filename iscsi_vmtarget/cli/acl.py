"""``iscsi-vmtarget acl``: who may log into a target and which LUNs each one sees.

A target of a VM (its own ``<base>:vm.NAME``, an exported snapshot
``<base>:vm.NAME.snap.SNAP``, any other export derived from it) admits no initiator
until one is granted. A grant belongs to the VM, keyed by its identity, and applies
to every export of it: ``acl add --vm NAME INITIATOR`` (``acl add <a target of the
VM> INITIATOR`` is the same). ``acl default add INITIATOR`` grants every VM of the
state directory (the hypervisor hosts that may see them all).

Other targets (``target create``, ``--config``) are open until they have an ACL, then
refuse initiators without one (login status 02/02, and SendTargets does not list the
target) unless the target is in ``--allow-all`` mode. ``acl add`` replaces an existing
ACL or grant of the same initiator, so running it twice changes nothing; ``acl
remove`` logs that initiator's sessions out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from typing import Any

from ..server.masking import VIEWS, AclError, parse_lun_list
from .target import add_chap, add_common, chap_args, describe_acl, done, invoke


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    acl = sub.add_parser(
        "acl",
        help="manage initiator ACLs, VM grants and LUN maps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = acl.add_subparsers(dest="acl_command", metavar="VERB", required=True)

    p = verbs.add_parser(
        "add",
        help="allow an initiator on a target, or grant it a VM",
        description="Allow INITIATOR on TARGET, or (--vm NAME, or TARGET a target of "
        "a VM) grant it the VM: every export of the VM then admits it. --luns 0,1 shows "
        "LUNs 0 and 1 under their own numbers; 5=2 shows LUN 2 as LUN 5; a :ro suffix "
        "makes one read-only. Without --luns the initiator sees every LUN.",
    )
    p.add_argument("names", nargs="+", metavar="[TARGET] INITIATOR")
    p.add_argument("--vm", metavar="NAME", help="grant VM NAME (instead of a TARGET)")
    add_grant_options(p)
    add_common(p)
    p.set_defaults(func=_add)

    p = verbs.add_parser(
        "remove",
        help="remove an initiator's ACL or VM grant",
        description="Remove the ACL (or the VM's grant, --vm NAME); its sessions are logged out.",
    )
    p.add_argument("names", nargs="+", metavar="[TARGET] INITIATOR")
    p.add_argument("--vm", metavar="NAME", help="the grant of VM NAME")
    add_common(p)
    p.set_defaults(func=_remove)

    p = verbs.add_parser(
        "list",
        help="list ACLs and VM grants",
        description="List the VMs' grants (with the VM's name), the default grants, "
        "the ACLs of other targets and the targets open to every initiator (allow-all).",
    )
    p.add_argument("target", nargs="?")
    add_common(p)
    p.set_defaults(func=_list)

    default = verbs.add_parser(
        "default",
        help="grants that apply to every VM",
        description="Default grants: every VM of the state directory (each export of "
        "it) admits these initiators, e.g. the hypervisor hosts. A VM's own grant of "
        "the same initiator replaces the default one for that VM.",
    )
    default_verbs = default.add_subparsers(dest="default_command", metavar="VERB", required=True)
    p = default_verbs.add_parser("add", help="grant INITIATOR every VM")
    p.add_argument("initiator")
    add_grant_options(p)
    add_common(p)
    p.set_defaults(func=lambda a: done(invoke(a, "acl.default.add", _grant_payload(a))))
    p = default_verbs.add_parser("remove", help="remove a default grant")
    p.add_argument("initiator")
    add_common(p)
    p.set_defaults(func=lambda a: done(invoke(a, "acl.default.remove", {"initiator": a.initiator})))
    p = default_verbs.add_parser("list", help="list the default grants")
    add_common(p)
    p.set_defaults(func=lambda a: _list(a, defaults_only=True))


def add_grant_options(p: argparse.ArgumentParser) -> None:
    """What an ACL or grant says beyond its initiator: LUN map, sources, view, CHAP."""
    p.add_argument("--luns", type=_luns, metavar="LIST", help="e.g. 0,1 or 0=3,1=4:ro")
    p.add_argument(
        "--source",
        action="append",
        metavar="NET",
        help="only from this address or network (repeatable), e.g. 10.0.0.0/24",
    )
    p.add_argument(
        "--view",
        choices=VIEWS,
        help="view of VM units (default guest; hypervisor: also the state and config LUNs)",
    )
    p.add_argument("--read-only", action="store_true", help="every mapped LUN read-only")
    add_chap(p)


def _luns(text: str) -> list[dict[str, object]]:
    try:
        return [m.to_dict() for m in parse_lun_list(text)]
    except AclError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _grant_payload(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "initiator": args.initiator,
        "luns": args.luns,
        "sources": args.source or [],
        "view": args.view,
        "read_only": args.read_only,
        **chap_args(args),
    }


def _whom(args: argparse.Namespace) -> dict[str, Any] | None:
    """TARGET and INITIATOR, or --vm NAME and INITIATOR; None (after a message) if
    the words do not fit."""
    want = 1 if args.vm else 2
    if len(args.names) != want:
        usage = "--vm NAME INITIATOR" if args.vm else "TARGET INITIATOR (or --vm NAME INITIATOR)"
        print(f"iscsi-vmtarget: acl {args.acl_command}: give {usage}", file=sys.stderr)
        return None
    args.initiator = args.names[-1]
    if args.vm:
        return {"vm": args.vm}
    return {"target": args.names[0]}


def _add(args: argparse.Namespace) -> int:
    whom = _whom(args)
    if whom is None:
        return 2
    return done(invoke(args, "acl.add", {**whom, **_grant_payload(args)}))


def _remove(args: argparse.Namespace) -> int:
    whom = _whom(args)
    if whom is None:
        return 2
    return done(invoke(args, "acl.remove", {**whom, "initiator": args.initiator}))


def _list(args: argparse.Namespace, defaults_only: bool = False) -> int:
    json_out, args.json = args.json, True
    with contextlib.redirect_stdout(io.StringIO()):
        result = invoke(args, "acl.list", {"target": getattr(args, "target", None)})
    if result is None:
        return 1
    if json_out:
        if defaults_only:
            result = {"default_grants": result["default_grants"]}
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    for grant in result["default_grants"]:
        print(f"default (every VM)  {describe_acl(grant)}")
    if defaults_only:
        return 0
    for vm in result["vms"]:
        if vm["allow_all"]:
            print(f"vm {vm['vm']}  * allow-all (any initiator, every LUN)")
        for grant in vm["grants"]:
            print(f"vm {vm['vm']}  {describe_acl(grant)}")
    for target in result["allow_all"]:
        print(f"{target}  * allow-all (any initiator, every LUN)")
    for acl in result["acls"]:
        if acl.get("vm_uuid") is None:  # a VM's targets: its grants, above
            print(f"{acl['target']}  {describe_acl(acl)}")
    return 0

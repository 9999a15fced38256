"""``iscsi-vmtarget vm``: create, list, show, resize and delete VMs; their state and config.

Each VM is a base unit (its state, config and primary disk) plus secondary-disk units,
exported as ``<base IQN>:vm.<name>`` with LUN 0 the primary disk. Errors are printed as
``iscsi-vmtarget: <message>`` with exit status 1, and leave what is stored unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

from ..server.actions.catalog import vm_json
from ..server.admin import AdminError
from ..server.vm_luns import vm_target_name
from ..sizes import format_size
from ..storage import atomic_file
from ..vm import Mode, VmError, VmManager
from ..vm.operations.resize import resize_vm
from ..vm.units.scan import FoundVm
from . import vm_replicate, vm_snapshot
from .options import add_common, size_arg
from .route import Router, print_json, router, run_offline, run_vm_verb
from .vm_grants import drop_grants, drop_grants_of

# -- the parser ---------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    vm = sub.add_parser("vm", help="manage VMs", description=__doc__)
    verbs = vm.add_subparsers(dest="vm_command", metavar="VERB", required=True)

    p = verbs.add_parser(
        "create",
        help="allocate a VM's units",
        description="Allocate the base unit (disk, state sized for --memory plus "
        "headroom, config) and one unit per --secondary disk.",
    )
    p.add_argument("name")
    p.add_argument("--disk", type=size_arg, required=True, metavar="SIZE", help="primary disk")
    p.add_argument("--memory", type=size_arg, required=True, metavar="SIZE", help="VM RAM")
    p.add_argument(
        "--secondary",
        type=size_arg,
        action="append",
        default=[],
        metavar="SIZE",
        help="a secondary disk (repeatable): LUN 1, 2, ...",
    )
    p.add_argument(
        "--mode",
        choices=[m.name.lower() for m in Mode],
        default="truncate",
        help="how the hidden data is concealed from the guest (default truncate)",
    )
    p.add_argument("--pool", default="default", help="pool to allocate from (default: default)")
    p.add_argument("--json", action="store_true")
    add_common(p)
    p.set_defaults(func=lambda a: run_offline(a, _create))

    p = verbs.add_parser("list", help="list VMs", description="List the VMs of every pool.")
    p.add_argument("--pool")
    p.add_argument("--json", action="store_true")
    add_common(p, key=False)
    p.set_defaults(func=lambda a: run_offline(a, _list))

    p = verbs.add_parser("show", help="show one VM", description="Show a VM's units and LUNs.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    add_common(p, key=False)
    p.set_defaults(func=lambda a: run_offline(a, _show))

    p = verbs.add_parser(
        "delete",
        help="delete a VM",
        description="Delete a VM's units. Refused while initiators are logged in to it "
        "(asked of the running daemon) or a running server exports it, unless --force. "
        "With --force, a running daemon deletes it: it stops serving the VM first (its "
        "sessions are logged out, its units closed).",
    )
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="delete even if a server exports it")
    add_common(p, key=False)
    p.set_defaults(func=_delete_routed)

    p = verbs.add_parser(
        "resize",
        help="grow a VM's disk or memory",
        description="Grow the primary disk (--disk), the state region (--memory) and/or "
        "secondary disks (--secondary LUN=SIZE), crash-safely. When a running daemon "
        "exports the VM, the daemon resizes it live and its initiators see CAPACITY DATA "
        "HAS CHANGED.",
    )
    p.add_argument("name")
    p.add_argument("--disk", type=size_arg, metavar="SIZE", help="new primary disk size")
    p.add_argument("--memory", type=size_arg, metavar="SIZE", help="new VM RAM size")
    p.add_argument(
        "--secondary",
        type=_lun_size,
        action="append",
        default=[],
        metavar="LUN=SIZE",
        help="new size of a secondary disk (repeatable), e.g. 1=20G",
    )
    p.add_argument("--json", action="store_true")
    add_common(p)
    p.set_defaults(func=_resize_routed)

    vm_snapshot.add_parsers(verbs)
    vm_replicate.add_parsers(verbs)

    state = verbs.add_parser(
        "state", help="read or write the encrypted state", description="The VM's state image."
    )
    state_verbs = state.add_subparsers(dest="state_command", metavar="VERB", required=True)
    p = state_verbs.add_parser("write", help="store FILE as the state image (encrypted)")
    p.add_argument("name")
    p.add_argument("file")
    add_common(p)
    p.set_defaults(func=lambda a: run_vm_verb(a, "vm state write", {}, _state_write))
    p = state_verbs.add_parser("read", help="write the decrypted state image to FILE ('-')")
    p.add_argument("name")
    p.add_argument("file")
    add_common(p)
    p.set_defaults(func=lambda a: run_offline(a, _state_read))

    config = verbs.add_parser(
        "config", help="show or set the virtual hardware", description="The VM's config."
    )
    config_verbs = config.add_subparsers(dest="config_command", metavar="VERB", required=True)
    p = config_verbs.add_parser("show", help="print the config")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    add_common(p)
    p.set_defaults(func=lambda a: run_offline(a, _config_show))
    p = config_verbs.add_parser("set", help="set KEY=VALUE pairs")
    p.add_argument("name")
    p.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    add_common(p)
    p.set_defaults(func=lambda a: run_vm_verb(a, "vm config set", {}, _config_set))


# -- handlers -----------------------------------------------------------------------------


def _summary(vm: FoundVm) -> str:
    luns = " ".join(f"{n}:{format_size(vm.disk_size(u))}" for n, u in enumerate(vm.units))
    return (
        f"{vm.name:<16} {vm.base.pool:<10} {vm.base.header.mode.name.lower():<9} "
        f"{luns}  {vm_target_name(vm.name)}"
    )


def _create(args: argparse.Namespace, manager: VmManager) -> int:
    vm = manager.create(
        args.name,
        disk=args.disk,
        memory=args.memory,
        secondaries=tuple(args.secondary),
        mode=Mode.parse(args.mode),
        pool=args.pool,
    )
    if args.json:
        print_json(vm_json(vm, manager))
    else:
        print(f"created VM {vm.name}: {_summary(vm)}")
        print(f"initiators see it once granted: acl add --vm {vm.name} INITIATOR")
    Router(manager.state.root).serve_now(vm.name, quiet=args.json)
    return 0


def _list(args: argparse.Namespace, manager: VmManager) -> int:
    found = manager.discover(args.pool, repair=False)
    if args.json:
        print_json([vm_json(vm, manager) for vm in found.vms])
        return 0
    for vm in found.vms:
        print(_summary(vm))
    return 0


def _show(args: argparse.Namespace, manager: VmManager) -> int:
    vm = manager.find(args.name)
    data = vm_json(vm, manager)
    if args.json:
        print_json(data)
        return 0
    print(f"VM {vm.name}  target {data['target']}  mode {data['mode']}")
    print(f"  served by a running server: {'yes' if data['served'] else 'no'}")
    for lun in data["luns"]:  # type: ignore[attr-defined]
        print(
            f"  LUN {lun['lun']}: {lun['role']} unit {lun['uuid']} naa {lun['naa']} "
            f"disk {lun['disk_bytes']} bytes ({lun['location']})"
        )
        for region in lun["regions"]:
            flag = " encrypted" if region["encrypted"] else ""
            print(f"      {region['kind']:<10} @{region['offset']:<12} {region['length']}{flag}")
    for naa in data["missing_secondaries"]:  # type: ignore[attr-defined]
        print(f"  MISSING secondary unit naa {naa}")
    return 0


def _delete_routed(args: argparse.Namespace) -> int:
    """``vm delete --force`` of a VM the running daemon may serve goes to the daemon
    (``vm.delete``): it stops serving the VM, then deletes the units. Deleted offline
    under it, the daemon would keep the units open (their space held, sessions reading
    deleted units) until it restarts. Without --force a served VM is refused offline."""
    if args.force:
        try:
            result = router(args).vm_action("vm.delete", {"name": args.name, "force": True})
        except AdminError as exc:
            print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
            return 1
        if result is not None:
            print(f"deleted VM {args.name} ({result['units']} units) by the running daemon")
            identity = uuid.UUID(str(result["uuid"]))
            try:
                dropped = drop_grants_of(args.state_dir, identity, args.name)
            except VmError as exc:
                print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
                return 1
            if dropped:
                print(dropped)
            return 0
    return run_offline(args, _delete)


def _delete(args: argparse.Namespace, manager: VmManager) -> int:
    manager.find(args.name)  # a clear "no VM named" first
    sessions = Router(manager.state.root).logged_in(vm_target_name(args.name))
    if sessions and not args.force:
        raise VmError(
            f"VM {args.name!r} has {len(sessions)} session(s) logged in "
            f"({', '.join(sorted(set(sessions)))}); log them out first or give --force"
        )
    vm = manager.delete(args.name, force=args.force)
    print(f"deleted VM {vm.name} ({len(vm.units)} units)")
    if dropped := drop_grants(manager.state.root, vm):
        print(dropped)
    return 0


def _lun_size(text: str) -> tuple[int, int]:
    lun, sep, size = text.partition("=")
    if not sep or not lun.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not LUN=SIZE (e.g. 1=20G)")
    return int(lun), size_arg(size)


def _resize_routed(args: argparse.Namespace) -> int:
    """``vm resize``: the running daemon resizes a VM it exports live; else offline."""
    request = {
        "name": args.name,
        "disk": args.disk,
        "memory": args.memory,
        "secondaries": {str(k): v for k, v in args.secondary},
    }
    return run_vm_verb(
        args,
        "vm resize",
        request,
        _resize,
        done=lambda _r: f"resized VM {args.name} live (initiators see CAPACITY DATA HAS CHANGED)",
        as_json=lambda r: r["vm"],
    )


def _resize(args: argparse.Namespace, manager: VmManager) -> int:
    vm = resize_vm(
        manager,
        args.name, disk=args.disk, memory=args.memory, secondaries=dict(args.secondary)
    )
    if args.json:
        print_json(vm_json(vm, manager))
    else:
        print(f"resized VM {vm.name}: {_summary(vm)}")
    return 0


def _state_write(args: argparse.Namespace, manager: VmManager) -> int:
    with open(args.file, "rb") as source:
        length = os.fstat(source.fileno()).st_size
        manager.write_state(args.name, source, length)
    print(f"stored {length} bytes of state for VM {args.name} (encrypted)")
    return 0


def _state_read(args: argparse.Namespace, manager: VmManager) -> int:
    """Decrypt into a temporary file and rename it into place only when every chunk
    authenticated: a tampered image leaves no partial plaintext behind."""
    if args.file == "-":
        for piece in manager.read_state(args.name):
            sys.stdout.buffer.write(piece)
        sys.stdout.buffer.flush()
        return 0
    with atomic_file.writing(args.file, tmp=f"{args.file}.partial", mode=0o600) as out:
        for piece in manager.read_state(args.name):
            out.write(piece)
    return 0


def _config_show(args: argparse.Namespace, manager: VmManager) -> int:
    config = manager.config(args.name)
    if args.json:
        print_json(config)
    else:
        for key, value in sorted(config.items()):
            print(f"{key} = {json.dumps(value)}")
    return 0


def _config_set(args: argparse.Namespace, manager: VmManager) -> int:
    config = manager.set_config(args.name, args.assignments)
    for key, value in sorted(config.items()):
        print(f"{key} = {json.dumps(value)}")
    return 0

"""``iscsi-vmtarget vm snapshot|revert|clone``: snapshots of a VM (seed: snapshot,
revert, delete-merge, clone), through the running daemon where it exports the VM (the
daemon quiesces the VM's LUNs), offline otherwise.

* ``vm snapshot NAME SNAP [--description TEXT]``
* ``vm snapshot list NAME [--json]`` (the tree)
* ``vm snapshot delete NAME SNAP``
* ``vm snapshot export NAME SNAP [--lun N] [--output FILE] [--stop]``: a read-only LUN
  of the snapshot (target ``<base IQN>:vm.NAME.snap.SNAP``, its own designator) from
  the next ``serve``; ``--output`` writes the LUN's image to a file instead
* ``vm revert NAME SNAP``
* ``vm clone SRC DST [--from-snapshot SNAP] [--full]``
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..server.admin import AdminError, DaemonNotRunning, call_daemon
from ..vm import VmManager
from ..vm import snapshot as snaps
from .progress import progress_bar
from .vm import add_common, print_json, run_managed

_SNAPSHOT_VERBS = ("list", "delete", "export", "create")


def add_parsers(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = verbs.add_parser(
        "snapshot",
        help="snapshot a VM; list, delete or export its snapshots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("words", nargs="+", metavar="[list|delete|export] NAME [SNAP]")
    p.add_argument("--json", action="store_true")
    p.add_argument("--description", default="")
    p.add_argument("--lun", type=int, default=0, help="export: which LUN (default 0)")
    p.add_argument("--output", metavar="FILE", help="export: write the image to FILE")
    p.add_argument("--stop", action="store_true", help="export: stop exporting it")
    add_common(p)
    p.set_defaults(func=_snapshot)

    p = verbs.add_parser(
        "revert",
        help="revert a VM to a snapshot",
        description="Bind every disk of the VM (secondaries included), its state and its "
        "config to snapshot SNAP. Unsnapshotted changes are discarded. Guests keep seeing "
        "each volume's own designator and serial (VPD 0x83/0x80).",
    )
    p.add_argument("name")
    p.add_argument("snapshot")
    p.add_argument("--json", action="store_true")
    add_common(p)
    p.set_defaults(func=_revert)
    add_clone_parser(verbs)


def add_clone_parser(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = verbs.add_parser(
        "clone",
        help="clone a VM (or one of its snapshots) as a new VM",
        description="Make VM DST from VM SRC's snapshot --from-snapshot SNAP (or its live "
        "disks: a linked clone then first snapshots SRC as clone-DST; a full one needs SRC "
        "not served): new units, new designators and serials; state and config copied. "
        "Linked by default (shares the snapshot's blocks copy-on-write until 'vm unlink "
        "DST'); --full copies every block (progress on stderr).",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--from-snapshot", metavar="SNAP")
    p.add_argument("--full", action="store_true", help="copy every block now")
    _progress_flag(p)
    add_common(p)
    p.set_defaults(func=lambda a: run_managed(a, _clone))

    p = verbs.add_parser(
        "unlink",
        help="make a linked clone independent of its source",
        description="Copy the blocks a linked clone shares with its source into its own "
        "units (progress on stderr); the source may then be deleted.",
    )
    p.add_argument("name")
    _progress_flag(p)
    add_common(p)
    p.set_defaults(func=lambda a: run_managed(a, _unlink))

    p = verbs.add_parser(
        "move",
        help="move a VM's units to another pool (live when the daemon serves it)",
        description="Copy every unit of the VM (disks, snapshot layers and records) to "
        "directory pool --pool, then switch, crash-safely; identities do not change. "
        "When the running daemon exports the VM it moves it live: its LUNs keep "
        "serving while the units are copied and the writes made meanwhile caught up, "
        "then are held for the switch (in-flight commands drain, new ones wait). "
        "Progress on stderr.",
    )
    p.add_argument("name")
    p.add_argument("--pool", required=True)
    p.add_argument("--json", action="store_true")
    _progress_flag(p)
    add_common(p)
    p.set_defaults(func=_move_routed)


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action="store_true",
        help="draw the progress bar even when stderr is not a terminal",
    )


def _clone(args: argparse.Namespace, manager: VmManager) -> int:
    from ..vm.clone import clone

    bar = progress_bar("cloning", args.progress)
    try:
        clone(
            manager,
            args.src,
            args.dst,
            from_snapshot=args.from_snapshot,
            full=args.full,
            progress=bar,
        )
    finally:
        bar.close()
    kind = "full copy" if args.full else "linked clone"
    print(f"cloned {args.src} as {args.dst} ({kind})")
    return 0


def _unlink(args: argparse.Namespace, manager: VmManager) -> int:
    from ..vm.clone import unlink

    bar = progress_bar("unlinking", args.progress)
    try:
        changed = unlink(manager, args.name, progress=bar)
    finally:
        bar.close()
    print(f"VM {args.name} is independent" + ("" if changed else " (it already was)"))
    return 0


def _move_routed(args: argparse.Namespace) -> int:
    """``vm move``: the running daemon moves a VM it exports live; else offline."""
    bar = progress_bar("moving", args.progress)
    request = {"name": args.name, "pool": args.pool, "key_file": args.key_file}
    try:
        result = call_daemon(args.state_dir, "vm.move", request, timeout=3600, progress=bar)
    except DaemonNotRunning:
        return run_managed(args, _move)
    except AdminError as exc:
        if "does not export" in str(exc):
            return run_managed(args, _move)
        bar.close()
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    bar.close()
    report = result["moved"]
    if args.json:
        print_json({"vm": args.name, "pool": args.pool, "live": True, **report})
    else:
        print(
            f"moved VM {args.name} to pool {args.pool} live ({report['units']} units; "
            f"{report['passes']} catch-up passes, {report['recopied']} bytes copied again, "
            f"{report['held']} while I/O was held for {report['held_ms']} ms)"
        )
    return 0


def _move(args: argparse.Namespace, manager: VmManager) -> int:
    from ..vm.move import move

    bar = progress_bar("moving", args.progress)
    try:
        count = move(manager, args.name, args.pool, progress=bar)
    finally:
        bar.close()
    if args.json:
        print_json({"vm": args.name, "pool": args.pool, "live": False, "units": count})
    else:
        print(f"moved VM {args.name} to pool {args.pool} ({count} units)")
    return 0


def _daemon_or_offline(
    args: argparse.Namespace, op: str, request: dict[str, Any], offline: Any
) -> int:
    try:
        result = call_daemon(args.state_dir, op, request, timeout=3600)
    except DaemonNotRunning:
        return run_managed(args, offline)
    except AdminError as exc:
        if "does not export" in str(exc):
            return run_managed(args, offline)
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
    else:
        print(f"{op}: done by the running daemon (its LUNs were quiesced)")
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    words = list(args.words)
    verb = "create"
    if (
        words[0] in _SNAPSHOT_VERBS
        and len(words) >= 2
        and not (words[0] == "create" and len(words) == 2)
    ):
        verb = words.pop(0)
    need = 1 if verb == "list" else 2
    if len(words) != need:
        print(f"iscsi-vmtarget: vm snapshot {verb} takes {need} argument(s)", file=sys.stderr)
        return 2
    args.name = words[0]
    args.snapshot = words[1] if need == 2 else None
    request = {"name": args.name, "snapshot": args.snapshot, "key_file": args.key_file}
    if verb == "create":
        request["description"] = args.description
        return _daemon_or_offline(args, "vm.snapshot", request, _create)
    if verb == "delete":
        return _daemon_or_offline(args, "vm.snapshot.delete", request, _delete)
    if verb == "list":
        return run_managed(args, _list)
    return run_managed(args, _export)


def _create(args: argparse.Namespace, manager: VmManager) -> int:
    info = snaps.create_snapshot(manager, args.name, args.snapshot, description=args.description)
    if args.json:
        print_json(info.to_json())
    else:
        print(f"snapshot {info.name} of VM {args.name} taken (naa.{info.record.header.naa.hex()})")
    return 0


def _delete(args: argparse.Namespace, manager: VmManager) -> int:
    snaps.delete_snapshot(manager, args.name, args.snapshot)
    print(f"snapshot {args.snapshot} of VM {args.name} deleted")
    return 0


def _list(args: argparse.Namespace, manager: VmManager) -> int:
    infos = snaps.list_snapshots(manager, args.name)
    if args.json:
        print_json([i.to_json() for i in infos])
    elif infos:
        print(snaps.describe(infos))
    else:
        print(f"VM {args.name} has no snapshots")
    return 0


def _export(args: argparse.Namespace, manager: VmManager) -> int:
    if args.output:
        backend = snaps.open_snapshot(manager, args.name, args.snapshot, args.lun)
        try:
            with open(args.output, "wb") as out:
                step = 4 << 20
                for offset in range(0, backend.size, step):
                    out.write(backend.read(offset, min(step, backend.size - offset)))
                    print(f"\r{offset * 100 // max(1, backend.size)}%", end="", file=sys.stderr)
            print("\r100%", file=sys.stderr)
        finally:
            backend.close()
        return 0
    target = snaps.set_exported(manager, args.name, args.snapshot, not args.stop)
    if args.stop:
        print(f"snapshot {args.snapshot} of VM {args.name} no longer exported")
    else:
        print(
            f"snapshot {args.snapshot} of VM {args.name} exported read-only as {target} "
            "(served from the next start of 'serve')"
        )
    return 0


def _revert(args: argparse.Namespace) -> int:
    request = {"name": args.name, "snapshot": args.snapshot, "key_file": args.key_file}

    def offline(a: argparse.Namespace, manager: VmManager) -> int:
        info = snaps.revert(manager, a.name, a.snapshot)
        if a.json:
            print_json(info.to_json())
        else:
            print(f"VM {a.name} reverted to snapshot {info.name}")
        return 0

    return _daemon_or_offline(args, "vm.revert", request, offline)

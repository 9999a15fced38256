"""``iscsi-vmtarget vm snapshot|revert|clone``: snapshots of a VM (US 9,354,927: snapshot,
revert, delete-merge, clone), through the running daemon where it exports the VM (the
daemon quiesces the VM's LUNs), offline otherwise.

* ``vm snapshot NAME SNAP [--description TEXT] [--full]``: ``--full`` then copies
  into the snapshot every grain it shares with its predecessors (progress on stderr),
  so it holds all its data, not only its difference
* ``vm snapshot fill NAME SNAP``: make an existing snapshot full (finishes a
  ``--full`` that was interrupted)
* ``vm snapshot list NAME [--json]`` (the tree; full or delta, bytes held)
* ``vm snapshot delete NAME SNAP``
* ``vm snapshot export NAME SNAP [--lun N] [--output FILE] [--stop]``: a read-only
  target of the snapshot (``<base IQN>:vm.NAME.snap.SNAP``, its own designators), at
  once when the running daemon exports the VM and from every later ``serve``;
  ``--stop`` removes it (its sessions are logged out); ``--output`` writes LUN N's
  image to a file instead
* ``vm revert NAME SNAP``
* ``vm clone SRC DST [--from-snapshot SNAP] [--full]``, ``vm unlink NAME``, ``vm move
  NAME --pool P``: by the running daemon too where it exports the VM (live)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..server.snapshot_luns import snapshot_target_name
from ..vm import StateDir, VmError, VmManager
from ..vm.operations import snapshot as snaps
from ..vm.operations.clone import clone, unlink
from ..vm.operations.export_marks import set_exported
from ..vm.operations.move import move
from ..vm.operations.snapshot_fill import fill_snapshot
from .options import add_common
from .progress import add_progress_flag, progress_bar
from .route import Router, print_json, run_offline, run_vm_verb
from .target import lun_number
from .vm_grants import add_no_grants_flag, copy_grants

_SNAPSHOT_VERBS = ("list", "delete", "export", "fill", "create")


def add_parsers(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = verbs.add_parser(
        "snapshot",
        help="snapshot a VM; list, delete or export its snapshots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("words", nargs="+", metavar="[list|delete|export|fill] NAME [SNAP]")
    p.add_argument("--json", action="store_true")
    p.add_argument("--description", default="")
    p.add_argument("--full", action="store_true", help="hold every grain, not a difference")
    add_progress_flag(p)
    p.add_argument("--lun", type=lun_number, default=0, help="export: which LUN (default 0)")
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
        "disks: a linked clone then first snapshots SRC as clone-DST, kept, and rests on "
        "it): new units, new designators and serials; state and config copied. Linked by "
        "default (shares the snapshot's blocks copy-on-write until 'vm unlink DST'); "
        "--full copies every block (progress on stderr). When the running daemon exports "
        "SRC it clones it live - the snapshot is taken with SRC's LUNs quiesced, as 'vm "
        "snapshot' does (a --full copy then reads it and deletes it) - and serves DST at "
        "once; otherwise a --full copy of the live disks needs SRC not served. "
        "The clone starts with SRC's grants (who may see it), unless --no-grants.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--from-snapshot", metavar="SNAP")
    p.add_argument("--full", action="store_true", help="copy every block now")
    add_no_grants_flag(p)
    add_progress_flag(p)
    add_common(p)
    p.set_defaults(func=_clone_routed)

    p = verbs.add_parser(
        "unlink",
        help="make a linked clone independent of its source",
        description="Copy the blocks a linked clone shares with its source into its own "
        "units (progress on stderr); the source may then be deleted. When the running "
        "daemon exports the clone it unlinks it live: the clone (and its source) keep "
        "serving and being written meanwhile.",
    )
    p.add_argument("name")
    add_progress_flag(p)
    add_common(p)
    p.set_defaults(func=_unlink_routed)

    p = verbs.add_parser(
        "move",
        help="move a VM's units to another pool (live when the daemon serves it)",
        description="Copy every unit of the VM (disks, snapshot layers and records) to "
        "pool --pool (a directory or a device pool), then switch, crash-safely; "
        "identities do not change. "
        "When the running daemon exports the VM it moves it live: its LUNs keep "
        "serving while the units are copied and the writes made meanwhile caught up, "
        "then are held for the switch (in-flight commands drain, new ones wait). "
        "Progress on stderr.",
    )
    p.add_argument("name")
    p.add_argument("--pool", required=True)
    p.add_argument("--json", action="store_true")
    add_progress_flag(p)
    add_common(p)
    p.set_defaults(func=_move_routed)


def _clone_routed(args: argparse.Namespace) -> int:
    """``vm clone``: the running daemon clones a VM it exports live; else offline."""
    request = {
        "src": args.src,
        "dst": args.dst,
        "from_snapshot": args.from_snapshot,
        "full": args.full,
    }

    def cloned(result: dict[str, Any]) -> str:
        lines = _cloned(args, result["snapshot"], live=True)
        # served deny-by-default already; the grants open it (applied live)
        try:
            with VmManager(StateDir.at(args.state_dir, args.key_file)) as manager:
                lines.append(copy_grants(manager, args.src, args.dst, none=args.no_grants))
        except VmError as exc:
            lines.append(f"VM {args.dst} has no grants yet ({exc}): see 'acl add --vm'")
        if "target" in result:
            lines.append(f"served by the running daemon as {result['target']}")
        else:
            lines.append(
                f"the running daemon could not serve VM {args.dst} now "
                f"({result.get('serve_error')}); it will from its next start"
            )
        return "\n".join(lines)

    return run_vm_verb(args, "vm clone", request, _clone, label="cloning", done=cloned)


def _cloned(args: argparse.Namespace, snapshot: str | None, *, live: bool) -> list[str]:
    """What ``vm clone`` did, as lines for the operator."""
    lines = []
    if snapshot:
        how = " (its LUNs were quiesced)" if live else ""
        lines.append(f"snapshot {snapshot} of {args.src} taken{how}; the clone rests on it")
    kind = "full copy" if args.full else "linked clone"
    lines.append(f"cloned {args.src} as {args.dst} ({kind}{', live' if live else ''})")
    return lines


def _clone(args: argparse.Namespace, manager: VmManager) -> int:
    with progress_bar("cloning", args.progress) as bar:
        taken = clone(
            manager,
            args.src,
            args.dst,
            from_snapshot=args.from_snapshot,
            full=args.full,
            progress=bar,
        )
    print("\n".join(_cloned(args, taken, live=False)))
    print(copy_grants(manager, args.src, args.dst, none=args.no_grants))
    Router(manager.state.root).serve_now(args.dst)
    return 0


def _unlink_routed(args: argparse.Namespace) -> int:
    """``vm unlink``: the running daemon unlinks a clone it exports live; else offline."""
    return run_vm_verb(
        args,
        "vm unlink",
        {"name": args.name},
        _unlink,
        label="unlinking",
        done=lambda r: _independent(args.name, r["changed"], live=True),
    )


def _independent(name: str, changed: bool, *, live: bool) -> str:
    how = " (unlinked live by the running daemon)" if live else ""
    return f"VM {name} is independent" + (how if changed else " (it already was)")


def _unlink(args: argparse.Namespace, manager: VmManager) -> int:
    with progress_bar("unlinking", args.progress) as bar:
        changed = unlink(manager, args.name, progress=bar)
    print(_independent(args.name, changed, live=False))
    return 0


def _move_routed(args: argparse.Namespace) -> int:
    """``vm move``: the running daemon moves a VM it exports live; else offline."""

    def moved(result: dict[str, Any]) -> str:
        report = result["moved"]
        return (
            f"moved VM {args.name} to pool {args.pool} live ({report['units']} units; "
            f"{report['passes']} catch-up passes, {report['recopied']} bytes copied again, "
            f"{report['held']} while I/O was held for {report['held_ms']} ms)"
        )

    return run_vm_verb(
        args,
        "vm move",
        {"name": args.name, "pool": args.pool},
        _move,
        label="moving",
        done=moved,
        as_json=lambda r: {"vm": args.name, "pool": args.pool, "live": True, **r["moved"]},
    )


def _move(args: argparse.Namespace, manager: VmManager) -> int:
    with progress_bar("moving", args.progress) as bar:
        count = move(manager, args.name, args.pool, progress=bar)
    if args.json:
        print_json({"vm": args.name, "pool": args.pool, "live": False, "units": count})
    else:
        print(f"moved VM {args.name} to pool {args.pool} ({count} units)")
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
    request = {"name": args.name, "snapshot": args.snapshot}
    if verb == "create":
        request.update(description=args.description, full=args.full)
        return run_vm_verb(
            args,
            "vm snapshot",
            request,
            _create,
            label="filling" if args.full else "",
            done=lambda r: (
                f"snapshot {args.snapshot} of VM {args.name} taken by the running daemon "
                f"(its LUNs were quiesced; {_kind(r['snapshot'])})"
            ),
        )
    if verb == "fill":
        return run_vm_verb(
            args,
            "vm snapshot fill",
            request,
            _fill,
            label="filling",
            done=lambda r: (
                f"snapshot {args.snapshot} of VM {args.name} is full "
                f"({r['filled']} bytes filled by the running daemon while it served)"
            ),
        )
    if verb == "delete":
        return run_vm_verb(args, "vm snapshot delete", request, _delete)
    if verb == "list":
        return run_offline(args, _list)
    if args.output:
        return run_offline(args, _export)
    request["stop"] = args.stop
    return run_vm_verb(
        args,
        "vm snapshot export",
        request,
        _export,
        done=lambda r: (
            f"snapshot {args.snapshot} of VM {args.name} "
            + ("no longer exported" if args.stop else f"exported read-only as {r['target']}")
            + " (by the running daemon, at once)"
        ),
    )


def _kind(info: dict[str, Any]) -> str:
    """What a snapshot's JSON says it holds: everything, or its difference."""
    return "full" if info.get("full") else "delta"


def _create(args: argparse.Namespace, manager: VmManager) -> int:
    with progress_bar("filling", args.progress) as bar:
        info = snaps.create_snapshot(
            manager,
            args.name,
            args.snapshot,
            description=args.description,
            full=args.full,
            progress=bar,
        )
    if args.json:
        print_json(info.to_json())
    else:
        naa = info.record.header.naa.hex()
        print(f"snapshot {info.name} of VM {args.name} taken (naa.{naa}, {_kind(info.to_json())})")
    return 0


def _fill(args: argparse.Namespace, manager: VmManager) -> int:
    with progress_bar("filling", args.progress) as bar:
        filled = fill_snapshot(manager, args.name, args.snapshot, progress=bar)
    info = snaps.snapshot_info(manager, args.name, args.snapshot)
    if args.json:
        print_json({"snapshot": info.to_json(), "filled": filled})
    else:
        print(f"snapshot {args.snapshot} of VM {args.name} is full ({filled} bytes filled)")
    return 0


def _delete(args: argparse.Namespace, manager: VmManager) -> int:
    snaps.delete_snapshot(manager, args.name, args.snapshot)
    print(f"snapshot {args.snapshot} of VM {args.name} deleted")
    return 0


def _list(args: argparse.Namespace, manager: VmManager) -> int:
    infos = snaps.list_snapshots(manager, args.name, fullness=True)
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
    set_exported(manager, args.name, args.snapshot, not args.stop)
    target = snapshot_target_name(args.name, args.snapshot)
    if args.json:
        print_json({"target": target, "exported": not args.stop, "live": False})
    elif args.stop:
        print(f"snapshot {args.snapshot} of VM {args.name} no longer exported")
    else:
        print(
            f"snapshot {args.snapshot} of VM {args.name} exported read-only as {target} "
            "(served from the next start of 'serve')"
        )
    return 0


def _revert(args: argparse.Namespace) -> int:
    request = {"name": args.name, "snapshot": args.snapshot}

    def offline(a: argparse.Namespace, manager: VmManager) -> int:
        info = snaps.revert(manager, a.name, a.snapshot)
        if a.json:
            print_json(info.to_json())
        else:
            print(f"VM {a.name} reverted to snapshot {info.name}")
        return 0

    return run_vm_verb(args, "vm revert", request, offline)

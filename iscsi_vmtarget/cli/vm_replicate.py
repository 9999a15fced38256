"""``iscsi-vmtarget vm replicate|receive|promote``: continuous data protection to another
target (US 9,354,927: periodic checkpoints "coincident with the replica updates"; resume "based
on the last coherent replica").

* on the destination, ``vm receive NAME --size SIZE`` makes an empty replica file
  ``<state-dir>/replicas/NAME.replica`` and exports it as LUN 0 of
  ``<base IQN>:replica.NAME`` to the replicating initiator (``--initiator``, CHAP with
  ``--chap-user/--chap-secret``);
* on the source, ``vm replicate NAME --to iscsi://HOST[:PORT]/IQN[/LUN]`` takes a
  checkpoint (a snapshot, through the daemon when it serves the VM, so its LUNs are
  quiesced) and pushes what changed since the last one, coherently; ``--continuous``
  does it every ``--interval`` seconds until interrupted. ``--disk-only`` mirrors one
  guest disk's bytes to any plain LUN (e.g. tgtd) instead;
* on the destination, ``vm promote NAME [--grant INITIATOR]...`` makes the last
  coherent checkpoint a VM of its pools (the receiving target goes away), granted to
  the ``--grant`` initiators only (and the default grants); a running daemon serves it
  at once, else ``serve`` from its next start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ..client.initiator import InitiatorError
from ..client.remote import LunUrl, open_lun
from ..server.admin import AdminError
from ..server.grants import acl_from_args
from ..server.masking import AclError
from ..server.persist import ConfigStore
from ..server.vm_luns import DEFAULT_BASE_IQN
from ..sizes import format_size
from ..storage import FileBackend, atomic_file, create_sparse_file
from ..storage.backend import BlockBackend
from ..vm import VmError, VmManager
from ..vm.format.crypto import load_key_file
from ..vm.manager import check_vm_name
from ..vm.operations import snapshot as snaps
from ..vm.operations.promote import promote
from ..vm.operations.replica import read_superblock
from ..vm.operations.replicate import RoundReport, replicate
from .options import add_common, size_arg
from .progress import add_progress_flag, progress_bar
from .remote_options import add_login_options, login_url
from .route import VM_VERBS, Router, print_json, router, run_offline
from .target import add_chap, chap_args, lun_number
from .vm_grants import add_grant_flag, set_grants

REPLICATOR = "iqn.2026-11.org.iscsi-vmtarget:replicator"


def replica_target(name: str) -> str:
    return f"{DEFAULT_BASE_IQN}:replica.{name}"


def replica_path(state_dir: str, name: str) -> str:
    return os.path.join(os.path.abspath(state_dir), "replicas", f"{name}.replica")


def add_parsers(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = verbs.add_parser(
        "replicate",
        help="push consistent checkpoints of a VM to another target",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name")
    p.add_argument("--to", required=True, metavar="URL", help="iscsi://HOST[:PORT]/IQN[/LUN]")
    p.add_argument("--continuous", action="store_true", help="a round every --interval seconds")
    p.add_argument("--interval", type=float, metavar="SECONDS", help="default 60 (--continuous)")
    p.add_argument("--disk-only", action="store_true", help="mirror one disk to a plain LUN")
    p.add_argument("--lun", type=lun_number, default=0, help="--disk-only: which disk (default 0)")
    add_login_options(p, REPLICATOR, "destination")
    p.add_argument("--json", action="store_true", help="one JSON object per round")
    add_progress_flag(p)
    add_common(p)
    p.set_defaults(func=_replicate)

    p = verbs.add_parser(
        "receive",
        help="export an empty replica LUN for 'vm replicate'",
        description="Create <state-dir>/replicas/NAME.replica (sparse, --size bytes: "
        "'vm replicate' says how many it needs; more leaves the disks room to grow "
        "between rounds) and export it as LUN 0 of target "
        f"{replica_target('NAME')} to --initiator (default {REPLICATOR}).",
    )
    p.add_argument("name")
    p.add_argument("--size", type=size_arg, required=True, metavar="SIZE")
    p.add_argument("--initiator", default=REPLICATOR, metavar="IQN")
    add_chap(p)
    add_common(p, key=False)
    p.set_defaults(func=_receive)

    p = verbs.add_parser(
        "promote",
        help="resume a replicated VM here from its last coherent checkpoint",
        description="Finish the replica's journal (a committed round is replayed, an "
        "uncommitted one discarded), check every header, grain hash and sealed chunk, "
        "and make the checkpoint VM NAME of --pool: same volume identities (VPD 0x83/0x80) "
        "as the source, state and config sealed under this state directory's key. It "
        "starts with no grants of its own: only --grant initiators and the default "
        "grants may see it.",
    )
    p.add_argument("name")
    p.add_argument("--replica", metavar="FILE", help="default <state-dir>/replicas/NAME.replica")
    p.add_argument("--source-key", metavar="FILE", help="the source's master key file")
    p.add_argument("--pool", default="default")
    p.add_argument("--json", action="store_true")
    add_grant_flag(p)
    add_progress_flag(p)
    add_common(p)
    p.set_defaults(func=lambda a: run_offline(a, _promote))


# -- replicate ---------------------------------------------------------------------------


@dataclass
class DaemonCheckpointer:
    """Checkpoint snapshots through the running daemon's admin actions where it exports
    the VM (its LUNs are quiesced, as for ``vm snapshot``), on the pools otherwise:
    the verbs ``vm snapshot`` and ``vm snapshot delete`` of the router."""

    router: Router
    manager: VmManager
    name: str

    def _daemon(self, verb: str, request: dict[str, Any]) -> bool:
        """Whether the daemon did ``verb`` (False: do it offline)."""
        op = VM_VERBS[verb]
        assert op is not None
        try:
            result = self.router.vm_action(op, request)
        except AdminError as exc:
            raise VmError(f"the daemon refused {op}: {exc}") from exc
        return result is not None

    def take(self, snap: str, description: str) -> None:
        request = {"name": self.name, "snapshot": snap, "description": description}
        if not self._daemon("vm snapshot", request):
            snaps.create_snapshot(self.manager, self.name, snap, description=description)

    def delete(self, snap: str) -> None:
        if not self._daemon("vm snapshot delete", {"name": self.name, "snapshot": snap}):
            snaps.delete_snapshot(self.manager, self.name, snap)


def _describe(report: RoundReport) -> str:
    kind = "full" if report.full else "incremental"
    line = (
        f"round {report.seq}: checkpoint {report.checkpoint} ({kind}): {report.grains} "
        f"grains, {report.payload} bytes sent, {report.zeroed} bytes zeroed"
    )
    if report.sealed:
        line += f", {' and '.join(report.sealed)} sent"
    if report.replayed:
        line += f"; finished the interrupted round first ({report.replayed} entries)"
    if report.deleted:
        line += f"; deleted {', '.join(report.deleted)}"
    return line


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops a continuous run like Ctrl-C (the replica stays coherent)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _replicate(args: argparse.Namespace) -> int:
    if args.interval is not None and not args.continuous:
        print("iscsi-vmtarget: --interval needs --continuous", file=sys.stderr)
        return 2
    if args.interval is not None and args.interval < 0:
        print("iscsi-vmtarget: --interval must not be negative", file=sys.stderr)
        return 2
    url = login_url(args, args.to)
    if url is None:
        return 2
    return run_offline(args, lambda a, m: _run_rounds(a, m, url))


def _run_rounds(args: argparse.Namespace, manager: VmManager, url: LunUrl) -> int:
    manager.find(args.name)  # a clear "no VM named" before any connection

    def connect() -> BlockBackend:
        return open_lun(
            url,
            initiator_name=args.initiator_name,
            chap_user=args.chap_user,
            chap_secret=args.chap_secret,
            mutual_secret=args.mutual_secret,
        )

    bar = progress_bar("replicating", args.progress)

    def on_round(report: RoundReport) -> None:
        bar.close()
        if args.json:
            print_json(report.to_json())
        else:
            print(_describe(report), flush=True)

    def on_error(exc: Exception) -> None:
        bar.close()
        stamp = time.strftime("%H:%M:%S")
        print(f"iscsi-vmtarget: {stamp} round failed, retrying: {exc}", file=sys.stderr)

    checkpointer = DaemonCheckpointer(router(args), manager, args.name)
    interval = (args.interval if args.interval is not None else 60.0) if args.continuous else None
    rounds = 0
    try:
        with _sigterm_interrupts():
            rounds = replicate(
                manager,
                args.name,
                connect,
                checkpointer,
                url=str(url),
                disk_only=args.disk_only,
                lun=args.lun,
                interval=interval,
                on_round=on_round,
                on_error=on_error,
                progress=bar,
            )
    except KeyboardInterrupt:
        bar.close()
        print(f"replication of VM {args.name} stopped", file=sys.stderr)
        return 0
    except InitiatorError as exc:
        bar.close()
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    return 0 if rounds else 1


# -- receive -----------------------------------------------------------------------------


def _receive(args: argparse.Namespace) -> int:
    try:
        check_vm_name(args.name)
    except VmError as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    path = replica_path(args.state_dir, args.name)
    if args.size <= 0:
        print("iscsi-vmtarget: --size must be more than 0", file=sys.stderr)
        return 1
    iqn = replica_target(args.name)
    try:
        undone = _undo_cut_receive(args, path, iqn)
    except (VmError, AdminError) as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    if undone:
        print(undone)
    directory = os.path.dirname(path)
    made = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    try:
        create_sparse_file(path, args.size)
    except OSError:
        if made:
            os.rmdir(directory)  # a failed receive leaves nothing behind
        raise
    try:  # the target is born with its one ACL: only the replicating initiator, ever
        acl = acl_from_args({"initiator": args.initiator, **chap_args(args)}, f"target {iqn}")
    except AclError as exc:
        os.unlink(path)
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    created = {"name": iqn, "alias": f"replica of VM {args.name}", "acls": [acl.to_dict()]}
    steps = [
        ("target.create", created),
        ("lun.map", {"target": iqn, "number": 0, "path": path, "size": args.size}),
    ]
    live = False
    try:
        for op, payload in steps:
            _result, live = router(args).operation(op, payload)
    except AdminError as exc:
        with contextlib.suppress(AdminError):
            router(args).operation("target.delete", {"name": iqn})
        os.unlink(path)
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    when = "now" if live else "from the next start of 'serve'"
    print(
        f"receiving VM {args.name}: LUN 0 of {iqn} ({format_size(args.size)}, {path}), "
        f"exported {when} to {args.initiator}"
    )
    return 0


def _undo_cut_receive(args: argparse.Namespace, path: str, iqn: str) -> str:
    """A receive is three steps (the replica file, its target, LUN 0 on it): one a
    crash cut short leaves its file without its target, or its target without that
    LUN. Undo such a one so this receive starts afresh; refuse when VM ``name`` is
    received already or the file holds a replica (rounds reached it: ``vm promote``
    resumes it). Returns what was undone ("" if nothing)."""
    spec = ConfigStore(args.state_dir).load().target(iqn)
    lun = next((n for n in spec.luns if n.number == 0), None) if spec is not None else None
    exists = os.path.exists(path)
    if exists and lun is not None and os.path.basename(lun.path) == os.path.basename(path):
        raise VmError(f"already receiving VM {args.name} ({path})")
    if exists:
        with contextlib.closing(FileBackend(path, read_only=True)) as held:
            written = held.size > 0 and read_superblock(held) is not None
        if written:
            raise VmError(
                f"{path} holds a replica of VM {args.name} but no target receives it: "
                f"'vm promote {args.name}' resumes the VM from it (or remove the file)"
            )
    undone = []
    if spec is not None:
        router(args).operation("target.delete", {"name": iqn})
        undone.append(f"target {iqn}")
    if exists:
        atomic_file.remove(path)
        undone.append(path)
    return f"undid a receive cut short: removed {' and '.join(undone)}" if undone else ""


# -- promote -----------------------------------------------------------------------------


def _promote(args: argparse.Namespace, manager: VmManager) -> int:
    path = os.path.abspath(args.replica or replica_path(manager.state.root, args.name))
    if not os.path.exists(path):
        raise VmError(f"no replica of VM {args.name!r} here ({path}); see 'vm receive'")
    if args.replica is None:  # stop receiving first: no round may write meanwhile
        try:
            Router(manager.state.root).operation(
                "target.delete", {"name": replica_target(args.name)}
            )
        except AdminError as exc:
            if "no target" not in str(exc):
                raise VmError(f"cannot stop receiving: {exc}") from exc
    keys = [load_key_file(args.source_key)] if args.source_key else []

    bar = progress_bar("promoting", args.progress)
    replica = FileBackend(path)
    try:
        report = promote(
            manager, args.name, replica, source_keys=keys, pool=args.pool, progress=bar
        )
    finally:
        replica.close()
        bar.close()
    if args.replica is None:  # durably: a power cut must not bring a promoted replica back
        atomic_file.remove(path)
    granted = "" if report.already else set_grants(manager, args.name, args.grant)
    if args.json:
        print_json({**report.__dict__, "replica": path, "grants": args.grant})
    elif report.already:
        print(f"VM {args.name} was already promoted; replica {path} removed")
    else:
        print(
            f"VM {args.name} promoted from checkpoint {report.seq} ({report.checkpoint}); "
            f"{report.journal}; {report.volumes} disk(s) verified"
        )
        print(granted)
    Router(manager.state.root).serve_now(args.name, quiet=args.json)
    return 0

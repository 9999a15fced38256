"""What the VM lifecycle commands do to grants (:mod:`iscsi_vmtarget.server.grants`).

A clone starts with its source's grants (``--no-grants``: none), a promoted replica
with only ``--grant`` initiators, a deleted VM's grants go with it. Each is one
management operation, through the running daemon (applied live) or on the state
directory's configuration; the default grants apply to every VM regardless.
"""

from __future__ import annotations

import argparse
import uuid

from ..server.admin import AdminError
from ..server.persist import ConfigStore
from ..vm import VmError, VmManager
from ..vm.units.scan import FoundVm
from .route import Router


def add_no_grants_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-grants",
        action="store_true",
        help="start with no grants of its own (default: the source's; default grants apply)",
    )


def add_grant_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grant",
        action="append",
        default=[],
        metavar="INITIATOR",
        help="grant INITIATOR the VM (repeatable); without it only default grants apply",
    )


def _run(state_dir: str, op: str, args: dict[str, object], what: str) -> None:
    try:
        Router(state_dir).operation(op, args)
    except AdminError as exc:
        raise VmError(f"{what}: {exc}") from exc


def _identity(vm: FoundVm) -> uuid.UUID:
    return vm.base.header.unit_uuid


def copy_grants(manager: VmManager, src: str, dst: str, *, none: bool = False) -> str:
    """Give clone ``dst`` the grants of ``src`` (``none``: no grants); says what it did."""
    root = manager.state.root
    clone = _identity(manager.find(dst))
    if none:
        _run(root, "grant.drop", {"uuid": str(clone)}, f"grants of VM {dst}")
        return f"VM {dst} starts with no grants (--no-grants; default grants apply)"
    source = _identity(manager.find(src))
    record = ConfigStore(root).load().vm(source)
    count = len(record.grants) if record else 0
    args = {"from": str(source), "to": str(clone), "name": dst}
    _run(root, "grant.copy", args, f"grants of VM {dst}")
    everyone = " and allow-all" if record and record.allow_all else ""
    return f"grants copied from {src}: {count} initiator{'s' * (count != 1)}{everyone}"


def set_grants(manager: VmManager, name: str, initiators: list[str]) -> str:
    """VM ``name`` is granted to ``initiators`` only (a promoted replica)."""
    key = _identity(manager.find(name))
    args = {"uuid": str(key), "name": name, "initiators": initiators}
    _run(manager.state.root, "grant.set", args, f"grants of VM {name}")
    if not initiators:
        return f"VM {name} has no grants (only default grants apply; see 'acl add --vm')"
    return f"VM {name} granted to {', '.join(initiators)}"


def drop_grants(state_dir: str, vm: FoundVm) -> str:
    """Forget the grants of deleted VM ``vm``."""
    return drop_grants_of(state_dir, _identity(vm), vm.name)


def drop_grants_of(state_dir: str, identity: uuid.UUID, name: str) -> str:
    """Forget the grants of the deleted VM whose base unit was ``identity``."""
    record = ConfigStore(state_dir).load().vm(identity)
    if record is None:
        return ""
    _run(state_dir, "grant.drop", {"uuid": str(record.uuid)}, f"grants of VM {name}")
    return f"dropped the grants of VM {name} ({len(record.grants)} initiators)"

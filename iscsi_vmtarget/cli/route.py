"""Where a management command runs: through the running daemon, or offline on the
state directory. Every verb of the CLI goes through this one module.

Three routes, by what the verb changes (:data:`VM_VERBS` lists the VM verbs):

* configuration (targets, LUNs, ACLs, portals, grants): :meth:`Router.operation`;
  the daemon when one runs (applied live), else the state directory's
  ``conf/config.json`` under its lock, read by the next ``serve``
  (:func:`iscsi_vmtarget.server.admin.call`);
* a VM the daemon may serve, with a daemon action (:data:`VM_VERBS` names it):
  :func:`run_vm_verb`; the daemon does it where it exports the VM (its LUNs keep
  serving: quiesced, rebound, resized live), offline on the pools otherwise
  (:func:`~iscsi_vmtarget.server.admin.call_for_vm`);
* a VM verb without a daemon action (``None`` in :data:`VM_VERBS`): offline on the
  pools, also while the daemon serves the VM; each says why that is safe.

Offline work holds the pool locks (:class:`iscsi_vmtarget.vm.VmManager`), which every
daemon action takes too, so the two never interleave; a state directory whose
daemon is starting refuses configuration changes until its socket answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..server.admin import AdminError, DaemonNotRunning, call, call_daemon, call_for_vm
from ..vm import StateDir, VmError, VmManager
from .progress import progress_bar

#: Work on the pools: ``(parsed args, manager) -> exit status``.
Handler = Callable[[argparse.Namespace, VmManager], int]

#: The VM verbs that change a VM, and the daemon action that does it live; None: no
#: action, the verb works offline also while the daemon serves the VM.
VM_VERBS: dict[str, str | None] = {
    "vm resize": "vm.resize",
    "vm snapshot": "vm.snapshot",
    "vm snapshot fill": "vm.snapshot.fill",
    "vm snapshot delete": "vm.snapshot.delete",
    "vm snapshot export": "vm.snapshot.export",
    "vm revert": "vm.revert",
    "vm clone": "vm.clone",
    "vm unlink": "vm.unlink",
    "vm move": "vm.move",
    # The daemon reads neither region (guest views serve the disks only; a raw view
    # reads the unit as it is): the sealed write commits the unit header under the
    # pool locks, the way the daemon's own actions do after reopening the unit.
    "vm state write": None,
    "vm config set": None,
}


@dataclass(frozen=True)
class Router:
    """The daemon of ``state_dir`` (if one runs), asked for one request at a time."""

    state_dir: str
    key_file: str | None = None

    def operation(self, op: str, args: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """A configuration operation, live or on the files: (result, live)."""
        return call(self.state_dir, op, args)

    def vm_action(
        self,
        op: str,
        request: dict[str, Any],
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any] | None:
        """The daemon's result of VM action ``op``; None when no daemon runs or it does
        not export the VM: the caller then works offline. AdminError: it refused."""
        return call_for_vm(
            self.state_dir, op, {**request, "key_file": self.key_file}, progress=progress
        )

    def ask(self, op: str, args: dict[str, Any], timeout: float = 10) -> dict[str, Any] | None:
        """A question (``status``) or notice (``vm.serve``) to a running daemon; None
        when none answers. AdminError or OSError: it answered with an error."""
        try:
            return call_daemon(self.state_dir, op, args, timeout=timeout)
        except DaemonNotRunning:
            return None

    def serve_now(self, name: str, *, quiet: bool = False) -> None:
        """Have a running daemon export VM ``name``, just made, at once (``vm.serve``);
        without a daemon the next ``serve`` exports it, as every VM in its pools."""
        try:
            result = self.ask("vm.serve", {"name": name}, timeout=600)
        except (AdminError, OSError) as exc:
            print(
                f"iscsi-vmtarget: the running daemon could not serve VM {name} now ({exc}); "
                "it will from its next start",
                file=sys.stderr,
            )
            return
        if result is not None and not quiet:
            print(f"served by the running daemon as {result['target']}")

    def logged_in(self, target: str) -> list[str] | None:
        """Initiators with a session on ``target``; None when no daemon answers."""
        try:
            status = self.ask("status", {})
        except (AdminError, OSError, ValueError):
            return None
        if status is None:
            return None
        return [
            str(s.get("initiator") or "?")
            for s in status.get("sessions", [])
            if str(s.get("target") or "").lower() == target.lower()
        ]


def router(args: argparse.Namespace) -> Router:
    """The router of a parsed command line (``--state-dir``, ``--key-file``)."""
    return Router(args.state_dir, getattr(args, "key_file", None))


def run_offline(args: argparse.Namespace, handler: Handler) -> int:
    """Run ``handler`` on the pools with a manager; VmError -> message on stderr,
    status 1."""
    state = StateDir.at(args.state_dir, getattr(args, "key_file", None))
    try:
        with VmManager(state) as manager:
            return handler(args, manager)
    except VmError as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"iscsi-vmtarget: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def run_vm_verb(
    args: argparse.Namespace,
    verb: str,
    request: dict[str, Any],
    offline: Handler,
    *,
    label: str = "",
    done: Callable[[dict[str, Any]], str] | None = None,
    as_json: Callable[[dict[str, Any]], Any] | None = None,
) -> int:
    """VM verb ``verb`` (:data:`VM_VERBS`): by the running daemon where it exports the
    VM, else ``offline``. A ``label`` draws a progress bar of the daemon's work;
    ``done`` says what was done, ``as_json`` what ``--json`` prints of the daemon's
    result (default: all of it)."""
    op = VM_VERBS[verb]
    if op is None:
        return run_offline(args, offline)
    bar = progress_bar(label, args.progress) if label else None
    try:
        with bar or contextlib.nullcontext():  # the bar's line ends before any message
            result = router(args).vm_action(op, request, progress=bar)
    except AdminError as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    if result is None:
        return run_offline(args, offline)
    if getattr(args, "json", False):
        print_json(as_json(result) if as_json is not None else result)
    elif done is not None:
        print(done(result))
    else:
        print(f"{op}: done by the running daemon (its LUNs were quiesced)")
    return 0

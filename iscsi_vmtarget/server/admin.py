"""Management over the admin socket: the daemon's server, the CLI's client, and the
:class:`Manager` that runs each request.

A request is a configuration operation (:data:`.config_changes.OPERATIONS`), a query
(:data:`.config_changes.QUERIES`) or, in the daemon only, an action on a VM it serves
(:data:`.actions.ACTIONS`). For an operation the :class:`Manager`

1. computes the difference (:func:`~.persist.diff`, secrets never shown),
2. when a daemon runs, applies it to the live registry (:class:`~.runtime.Runtime`),
3. writes the document atomically (:class:`~.persist.ConfigStore`).

The daemon serves the requests on ``<state-dir>/admin.sock`` (a UNIX socket, mode
0600): one JSON object per line each way, ``{"op": ..., "args": {...}}`` ->
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``, after
``{"progress": ...}`` lines when a long action was asked with ``"progress": true``
(:data:`PROGRESS_ARG`). Requests are handled one at a time on the event loop, so
concurrent commands never interleave.
Without a daemon, :func:`call` runs the same operation on the state directory's
files under an exclusive lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from ..errors import IscsiVmtargetError
from ..vm import StateDir, VmManager
from ..vm.units.locks import state_dir_holder
from ..vm.vm_errors import VmError
from . import grants
from .actions import ACTIONS
from .actions.served import NOT_EXPORTED, PROGRESS_ARG
from .config_changes import OPERATIONS, QUERIES, VM_OPERATIONS, Transform
from .grants import summary
from .masking import AclError
from .persist import ConfigStore, ManagedConfig, PersistError, diff, redacted
from .runtime import AdminError, Args, Runtime
from .vm_luns import vm_of_target, vm_target_name

log = logging.getLogger("iscsi_vmtarget")
SOCKET_NAME = "admin.sock"
MAX_REQUEST = 1 << 20

__all__ = [
    "PROGRESS_ARG",
    "AdminError",
    "AdminServer",
    "DaemonNotRunning",
    "Manager",
    "call",
    "call_daemon",
    "call_for_vm",
]


class DaemonNotRunning(IscsiVmtargetError):
    """No daemon answers on the admin socket."""


class Manager:
    """Runs operations against the store, and the live runtime when there is one."""

    def __init__(self, store: ConfigStore, runtime: Runtime | None = None) -> None:
        self.store = store
        self.runtime = runtime
        self.current = store.load() if runtime is not None else None

    def start(self) -> None:
        """Daemon start: bring the registry to the persisted document (the portals
        were chosen by ``serve`` before binding). ACLs that an older version kept on
        a VM target's overlay become the VM's grants first (and are saved so)."""
        assert self.runtime is not None and self.current is not None
        own_targets = {}
        for key, target in self.runtime.registry.targets.items():
            name = vm_of_target(key)
            if target.vm_uuid is not None and name and key == vm_target_name(name).lower():
                own_targets[key] = (target.vm_uuid, name)
        migrated, notes = grants.migrate_overlays(self.current, own_targets)
        if notes:
            with self.store.locked():
                self.store.save(migrated)
            self.current = migrated
            for note in notes:
                log.warning("config: %s", note)
        self.runtime.apply(ManagedConfig(), self.current)

    def _vm_identity(self, op: str, args: Args, cfg: ManagedConfig) -> Args:
        """``args`` with ``vm_uuid`` and ``vm_name`` of the VM an operation of
        :data:`VM_OPERATIONS` names: ``vm``, or a target derived from a VM (its own,
        a snapshot export...). Unchanged for other targets."""
        field = VM_OPERATIONS.get(op)
        if field is None:
            return args
        args = {k: v for k, v in args.items() if k not in ("vm_uuid", "vm_name")}
        name = args.get("vm")
        if name is None:
            target = str(args.get(field) or "")
            name = vm_of_target(target)
            spec = cfg.target(target)
            live = self.runtime.registry.targets.get(target.lower()) if self.runtime else None
            if name is None or (spec is not None and spec.luns) or (live and not live.vm_uuid):
                return args  # a target of its own (managed, TOML), not a VM's
        name = str(name).lower()
        key = None
        if self.runtime is not None:  # the daemon knows the VMs it serves
            live = self.runtime.registry.targets.get(vm_target_name(name).lower())
            key = live.vm_uuid if live is not None else None
        if key is None:  # discovery reads unit headers without the pool locks
            try:
                with VmManager(StateDir.at(self.store.state_dir)) as manager:
                    key = manager.find(name).base.header.unit_uuid
            except VmError:
                if args.get("vm") is None and cfg.target(str(args.get(field))) is not None:
                    return args  # a deleted VM's old overlay entry: still editable
                raise
        return {
            **args,
            field: args.get(field) or vm_target_name(name),
            "vm_name": name,
            "vm_uuid": str(key),
        }

    async def execute(self, op: str, args: Args) -> dict[str, Any]:
        try:
            if op in QUERIES:
                return self._query(op, args)
            if op in ACTIONS:
                if self.runtime is None:
                    raise AdminError(f"{op} needs a running daemon")
                # Unit I/O (copying regions, fsync): keep the event loop serving.
                loop = self.runtime.loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    None, ACTIONS[op], self.store.state_dir, self.runtime, args
                )
            transform = OPERATIONS.get(op)
            if transform is None:
                raise AdminError(f"unknown operation {op!r}")
            if self.runtime is None:
                with self.store.locked():
                    cfg = self.store.load()
                    return self._change(cfg, transform, self._vm_identity(op, args, cfg))
            assert self.current is not None
            args = self._vm_identity(op, args, self.current)
            return await self._change_live(self.current, transform, args)
        except (AclError, PersistError, VmError, KeyError, TypeError, ValueError) as exc:
            message = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise AdminError(message) from exc

    def _change(self, old: ManagedConfig, transform: Transform, args: Args) -> dict[str, Any]:
        new = transform(old, args, None)
        changes = diff(old, new)
        if changes and not args.get("dry_run"):
            self.store.save(new)
        return {"changes": changes, "applied": bool(changes) and not args.get("dry_run")}

    async def _change_live(
        self, old: ManagedConfig, transform: Transform, args: Args
    ) -> dict[str, Any]:
        assert self.runtime is not None
        new = transform(old, args, self.runtime)
        changes = diff(old, new)
        if not changes or args.get("dry_run"):
            self.runtime.check(new)
            return {"changes": changes, "applied": False}
        self.runtime.apply(old, new)
        try:
            await self.runtime.apply_portals(old, new)
        except OSError as exc:
            self.runtime.apply(new, old)
            raise AdminError(f"cannot listen: {exc.strerror or exc}") from exc
        with self.store.locked():
            self.store.save(new)
        self.current = new
        for line in changes:
            log.info("config: %s", line)
        return {"changes": changes, "applied": True}

    def _query(self, op: str, args: Args) -> dict[str, Any]:
        cfg = self.current if self.current is not None else self.store.load()
        if op == "ping":
            return {"live": self.runtime is not None}
        if op == "config.export":
            doc = cfg.to_dict()
            return {"document": doc if args.get("secrets", True) else redacted(cfg)}
        if op == "status":
            if self.runtime is None:
                raise AdminError("status needs a running daemon")
            return self.runtime.status()
        if op == "target.list":
            if self.runtime is not None:
                return {"targets": self.runtime.targets()}
            return {
                "targets": [
                    {
                        "name": t.name,
                        "alias": t.alias,
                        "origin": "managed" if t.luns else "overlay",
                        "allow_all": t.allow_all,
                        "chap": t.chap is not None,
                        "luns": {str(lun.number): lun.size for lun in t.luns},
                        "acls": [summary(a) for a in t.acls],
                        "sessions": 0,
                        "vm_uuid": None,
                    }
                    for t in cfg.targets
                ]
            }
        # acl.list: every target's ACLs in force (a VM target's: its grants), the
        # targets open to all, and the grants by VM with the defaults
        wanted = args.get("target")
        targets = [
            t
            for t in self._query("target.list", {})["targets"]
            if wanted is None or t["name"].lower() == str(wanted).lower()
        ]
        if wanted is not None and not targets:
            raise AdminError(f"no target named {wanted}")
        return {
            "acls": [
                {"target": t["name"], "vm_uuid": t["vm_uuid"], **acl}
                for t in targets
                for acl in t["acls"]
            ],
            "allow_all": [t["name"] for t in targets if t["allow_all"]],
            **grants.report(cfg),
        }


# ---------------------------------------------------------------------------------------
# The socket
# ---------------------------------------------------------------------------------------


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


class AdminServer:
    """JSON lines over a UNIX socket (mode 0600) in the state directory."""

    def __init__(self, manager: Manager, state_dir: str) -> None:
        self.manager = manager
        self.path = socket_path(state_dir)
        self._server: asyncio.base_events.Server | None = None
        self._lock = asyncio.Lock()
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket

    async def start(self) -> None:
        """Bind the socket; ``serve`` holds the state-directory lock
        (:func:`~iscsi_vmtarget.vm.units.locks.hold_state_dir`), so a socket already there
        is a dead daemon's."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket of a dead daemon
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, self.path, limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        info = os.stat(self.path)
        self._bound = (info.st_dev, info.st_ino)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._unlink_own()

    def _unlink_own(self) -> None:
        """Remove the socket only if it is still the one we bound: never another
        daemon's, whatever happened to the state directory meanwhile."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return
        if self._bound == (info.st_dev, info.st_ino):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()

        def send(message: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(json.dumps(message).encode() + b"\n")

        def progress(done: int, total: int) -> None:  # called from an executor thread
            loop.call_soon_threadsafe(send, {"progress": {"done": done, "total": total}})

        try:
            while line := await reader.readline():
                send(await self._answer(line, progress))
                await writer.drain()
        except (ConnectionError, ValueError) as exc:
            log.debug("admin connection: %r", exc)
        finally:
            writer.close()

    async def _answer(
        self, line: bytes, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op, args = str(request["op"]), dict(request.get("args") or {})
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": 'bad request: want {"op": ..., "args": {...}}'}
        args.pop(PROGRESS_ARG, None)  # only ever the daemon's own callback
        if request.get("progress") and progress is not None:
            args[PROGRESS_ARG] = progress
        try:
            return {"ok": True, "result": await self.run(op, args)}
        except AdminError as exc:
            return {"ok": False, "error": str(exc)}

    async def run(self, op: str, args: Args) -> dict[str, Any]:
        """Run one request in turn with every other (the socket's, the HTTPS API's):
        its result, or AdminError (a bug's exception is logged and reported as one)."""
        async with self._lock:  # one change at a time, in order
            try:
                return await self.manager.execute(op, args)
            except AdminError:
                raise
            except Exception as exc:  # never let a bug take the daemon down
                log.exception("admin operation %s failed", op)
                raise AdminError(f"internal error: {exc!r}") from exc


def call_daemon(
    state_dir: str,
    op: str,
    args: Args,
    timeout: float = 60,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """One request to the running daemon; DaemonNotRunning if none answers.
    ``progress``: asks for progress lines and calls it with each (done, total)."""
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    request: dict[str, Any] = {"op": op, "args": args}
    if progress is not None:
        request["progress"] = True
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(path) from exc
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while True:
            line, sep, rest = data.partition(b"\n")
            if not sep:
                chunk = sock.recv(65536)
                if not chunk:
                    raise AdminError("the daemon closed the admin connection")
                data += chunk
                continue
            data = rest
            reply = json.loads(line)
            if "progress" not in reply:
                break
            if progress is not None:
                progress(int(reply["progress"]["done"]), int(reply["progress"]["total"]))
    finally:
        sock.close()
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error")))
    return dict(reply["result"])


def call_for_vm(
    state_dir: str,
    op: str,
    args: Args,
    timeout: float = 3600,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | None:
    """A VM action (``vm.*``) by the running daemon; None when no daemon runs or it
    does not export that VM, so the caller does the work on the pools offline."""
    try:
        return call_daemon(state_dir, op, args, timeout=timeout, progress=progress)
    except DaemonNotRunning:
        return None
    except AdminError as exc:
        if str(exc).startswith(NOT_EXPORTED):
            return None
        raise


def call(state_dir: str, op: str, args: Args) -> tuple[dict[str, Any], bool]:
    """Run an operation: through the daemon when one runs, else on the state
    directory's files. Returns (result, live)."""
    try:
        return call_daemon(state_dir, op, args), True
    except DaemonNotRunning:
        holder = state_dir_holder(state_dir)
        if holder is not None:  # starting (or its socket was removed): not offline
            raise AdminError(
                f"state directory {state_dir} is served by {holder}, but its admin socket "
                f"{socket_path(state_dir)} does not answer (yet); try again"
            ) from None
    manager = Manager(ConfigStore(state_dir))
    return asyncio.run(manager.execute(op, args)), False

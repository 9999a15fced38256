"""The thin asyncio layer: accept TCP connections and pump bytes through the
sans-I/O :class:`~iscsi_vmtarget.iscsi.connection.TargetConnection`.

Everything protocol-shaped happens in ``iscsi/``; this module only moves bytes,
runs SCSI commands (in a thread when they may block on fsync; a remote LU's READ
and WRITE started on the backend's asynchronous I/O where it has some), keeps the NOP-In
ping timer, and closes sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..iscsi import send_targets
from ..iscsi.connection import ConnectionSettings, TargetConnection
from ..iscsi.directory import Portal
from ..iscsi.events import ConnectionClosing, ExecuteCommand, LoginComplete, ResetRequested
from ..iscsi.login import LoginMachine, TargetPreferences
from ..iscsi.pdu import TmfCode, TmfResponse
from ..iscsi.transfer import Task
from ..scsi import ScsiTarget
from ..scsi.medium_transfer import MediumTransfer
from ..scsi.target_device import BlockedCommand
from ..scsi.task import Nexus, ScsiResponse, Status
from ..storage import MergeCounting
from ..vm import faults
from . import fabric, pr_abort
from .completions import Inbox
from .fast_lane import session_lane
from .metrics import Metrics, SessionInfo
from .registry import Registry

log = logging.getLogger("iscsi_vmtarget")


class ConnectionHandler(asyncio.BufferedProtocol):
    """One TCP connection: feeds bytes in, writes bytes out, executes commands."""

    def __init__(self, server: TargetServer, portal: Portal) -> None:
        self.server = server
        self.portal = portal
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.source: str | None = None
        self.conn = TargetConnection(
            LoginMachine(
                directory=server.registry,
                sessions=server.registry.sessions,
                portal=portal,
                random_bytes=os.urandom,
                prefs=server.prefs,
                throttle=server.registry.throttle,
            ),
            decode_lun=fabric.decode_lun,
            refusal_sense=fabric.refusal_sense,
            settings=ConnectionSettings(cmd_window=server.prefs.cmdsn_window),
            send_targets=self._send_targets,
        )
        self.tsih = 0
        self.target_name = ""
        self.scsi: ScsiTarget | None = None
        self.nexus: Nexus | None = None
        self.lun_names: dict[int, int] = {}  # LUN number shown -> the target's LUN number
        self._idle = True
        self._ping_handle: asyncio.TimerHandle | None = None
        self.running = 0
        self._writing_paused = False
        self.lane_blocked: set[int] = set()  # ITTs the fast lane found would block
        self._inbox: Inbox | None = None  # the server's, once a session runs on a loop

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.source = str(peer[0]) if peer else None
        self.conn.login.source = self.source  # ACL source rules (server/masking.py)
        self.server.handlers.add(self)
        self._arm_ping()

    # Received into the connection's own buffer (BufferedProtocol): no bytes object
    # per receive for framing to copy again (iscsi/framing.py)
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._idle = False
        self.conn.received(nbytes)
        self._pump()
        self._drain_stalled()

    # Back-pressure: while the peer does not read our responses (the transport's buffer
    # is above its high-water mark) we stop reading its requests, and the connection
    # stops handling buffered PDUs once 1 MiB of output waits (``conn.stalled``).
    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._drain_stalled()

    def _drain_stalled(self) -> None:
        while self.conn.stalled and not self._writing_paused:
            self.conn.receive_data(b"")
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.handlers.discard(self)
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        self.conn.close("connection lost")
        self._end_session()

    # -- event pump --------------------------------------------------------------------
    def _pump(self) -> None:
        conn = self.conn
        while (event := conn.next_event()) is not None:
            if isinstance(event, ExecuteCommand):
                self._execute(event.task)
            elif isinstance(event, LoginComplete):
                self._logged_in(event)
            elif isinstance(event, ResetRequested):
                self._reset(event)
            elif isinstance(event, ConnectionClosing):
                if event.reason != "logout":
                    why = self.conn.login.failure_reason if self.conn.login.failed else None
                    log.info(
                        "closing connection from %s: %s%s",
                        self.peer,
                        event.reason,
                        f" ({why})" if why else "",
                    )
                self._flush()
                if self.transport is not None:
                    self.transport.close()
                return
        self._flush()

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def _execute(self, task: Task) -> None:
        scsi, nexus = self.scsi, self.nexus
        assert scsi is not None and nexus is not None
        data = task.buffer  # the SCSI layer takes a memoryview of it
        start = time.perf_counter()
        if self.lane_blocked and task.itt in self.lane_blocked:  # server/fast_lane.py
            self.lane_blocked.discard(task.itt)
            self._count_fallback(task)
            self._in_thread(task, start, _run_lane_blocked, scsi, nexus, task.lun, task.cdb, data)
            return
        if scsi.may_block(task.cdb, task.lun):
            self._in_thread(task, start, scsi.execute, nexus, task.lun, task.cdb, data)
            return
        # inline: a READ or WRITE of a file LU without blocking (storage/nowait.py), or
        # started on a backend with asynchronous I/O (RBD; scsi/medium_transfer.py)
        response = scsi.submit(nexus, task.lun, task.cdb, data)
        if isinstance(response, MediumTransfer):
            self._start_transfer(task, response, start)
            return
        if isinstance(response, BlockedCommand):  # not in the page cache, or throttled
            self._count_fallback(task)
            self._in_thread(task, start, _run_blocked, response)
            return
        self._account(task, response, start)
        self.conn.command_completed(task, response)

    def _start_transfer(self, task: Task, transfer: MediumTransfer, start: float) -> None:
        """Start a READ/WRITE on a backend with asynchronous I/O (RBD): no thread
        waits for the round trip; the backend's completion is handed back to the
        loop. When an overlapping command holds its range, a worker thread waits
        for it instead (scsi/medium_transfer.py)."""
        self.running += 1
        inbox = self.server.inbox()

        def complete() -> None:
            self.running -= 1
            response = transfer.response()
            self._account(task, response, start)
            self.conn.command_completed(task, response)

        if not transfer.start(lambda: inbox.post(complete, self._pump)):  # librbd's thread
            fut = asyncio.get_running_loop().run_in_executor(self.server.executor, transfer.run)
            fut.add_done_callback(lambda f: (complete(), self._pump()))

    def post_completion(self, complete: Callable[[], None]) -> None:
        """The end of a command the fast lane started (server/fast_lane.py), from the
        backend's thread: run on the loop as _start_transfer's completions are."""
        assert self._inbox is not None
        self._inbox.post(complete, self._pump)

    def _in_thread(
        self, task: Task, start: float, call: Callable[..., ScsiResponse], *args: object
    ) -> None:
        """Run ``call(*args)`` in a worker thread; complete ``task`` with its response."""
        self.running += 1
        fut = asyncio.get_running_loop().run_in_executor(self.server.executor, call, *args)
        fut.add_done_callback(lambda f: self._threaded_done(task, f, start))

    def _threaded_done(self, task: Task, fut: asyncio.Future, start: float) -> None:  # type: ignore[type-arg]
        self.running -= 1
        exc = fut.exception()
        if exc is not None:
            log.error("command 0x%02x failed: %r", task.cdb[0], exc)
            self.conn.close("internal error")
        else:
            self._account(task, fut.result(), start)
            self.conn.command_completed(task, fut.result())
        self._pump()

    def _count_fallback(self, task: Task) -> None:
        lun = self.lun_names.get(task.lun)
        if lun is not None:
            self.server.metrics.nowait_fallback(self.target_name, lun, self.tsih)

    def _account(self, task: Task, response: ScsiResponse, start: float) -> None:
        """Per-LUN and per-session counters (server/metrics.py)."""
        lun = self.lun_names.get(task.lun)
        if lun is None:
            return  # an unmapped LUN: nothing to count against
        self.server.metrics.record(
            self.target_name,
            lun,
            self.tsih,
            task.cdb[0],
            response.status == Status.GOOD,
            len(response.data_in) or response.data_out_length,
            time.perf_counter() - start,
        )

    def _logged_in(self, event: LoginComplete) -> None:
        result = event.result
        params = result.params
        registry = self.server.registry
        if result.reinstated_tsih:
            old = registry.connections.get(result.reinstated_tsih)
            if old is not None:
                log.info("session reinstatement: closing old session tsih=%d", old.tsih)
                old.abort_session("session reinstated")
        self.tsih = result.tsih
        registry.connections[self.tsih] = self
        isid = result.isid.hex()
        kind = params.session_type
        if result.target is not None:
            self.target_name = result.target.name.lower()
            self.scsi = registry.scsi_for(result.target.name, params.initiator_name, self.source)
            if self.scsi is None:  # the ACL went away while this login ran
                self.abort_session("access revoked")
                return
            self.lun_names = registry.lun_names(result.target.name, self.scsi)
            tpgt = result.target.tpgt
            self.nexus = Nexus(
                initiator_name=params.initiator_name,
                initiator_port=f"{params.initiator_name},i,0x{isid}",
                target_name=result.target.name,
                target_port=f"{result.target.name},t,0x{tpgt:04x}",
                relative_port=tpgt,
                transport_id=_iscsi_transport_id(params.initiator_name, isid),
            )
            if self.scsi is not None:
                self.scsi.nexus_added(self.nexus)
                with contextlib.suppress(RuntimeError):  # no loop: driven by hand
                    # (tools/small-io-profile), no other gateway to abort tasks for
                    # and no completions handed back (the lane starts nothing)
                    self._inbox = self.server.inbox()
                    pr_abort.attach(registry, self.scsi, asyncio.get_running_loop())
                self.conn.fast_lane = session_lane(
                    self.scsi, self.nexus, self.server.metrics, self.target_name,
                    self.lun_names, self.tsih, self.lane_blocked,
                    self if self._inbox is not None else None,
                )  # fmt: skip
        self.server.metrics.session_started(
            SessionInfo(self.tsih, params.initiator_name, isid, self.target_name, self.peer)
        )
        log.info(
            "login: %s session tsih=%d initiator=%s isid=%s target=%s from %s "
            "(HeaderDigest=%s DataDigest=%s MaxRecvDataSegmentLength=%d)",
            kind,
            self.tsih,
            params.initiator_name,
            isid,
            result.target.name if result.target else "-",
            self.peer,
            "CRC32C" if params.header_digest else "None",
            "CRC32C" if params.data_digest else "None",
            params.max_recv_data_segment_length,
        )

    def _reset(self, event: ResetRequested) -> None:
        scsi, nexus = self.scsi, self.nexus
        if scsi is None or nexus is None:
            self.conn.task_management_completed(event.itt, TmfResponse.LUN_DOES_NOT_EXIST)
            return
        response, remainder = fabric.begin_task_management(scsi, nexus, event.function, event.lun)
        if response is TmfResponse.COMPLETE:
            lun = event.lun if event.function is TmfCode.LOGICAL_UNIT_RESET else None
            for other in self.server.registry.connections_of(self.target_name):
                if other is not self:
                    other.conn.abort_tasks(lun)
        if remainder is None:
            self._reset_done(event, response)
            return
        # the LU's other gateways take the reset before it completes, up to their notify
        # timeout: waited for in a worker thread while the loop serves every session
        fut = asyncio.get_running_loop().run_in_executor(self.server.executor, remainder)
        fut.add_done_callback(lambda f: self._remainder_done(f, event, response))

    def _remainder_done(
        self,
        fut: asyncio.Future,  # type: ignore[type-arg]
        event: ResetRequested,
        response: TmfResponse,
    ) -> None:
        exc = fut.exception()
        if exc is not None:  # done here all the same; the others read the state again
            log.error("telling the other gateways of a reset failed: %r", exc)
        self._reset_done(event, response)
        self._pump()

    def _reset_done(self, event: ResetRequested, response: TmfResponse) -> None:
        self.conn.task_management_completed(event.itt, response)
        if event.function is TmfCode.TARGET_COLD_RESET and response is TmfResponse.COMPLETE:
            # A cold reset ends every session of the target (RFC 7143 §11.5.1).
            self._flush()
            for other in self.server.registry.connections_of(self.target_name):
                other.abort_session("target cold reset")

    def abort_session(self, reason: str) -> None:
        self.conn.close(reason)
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _end_session(self) -> None:
        registry = self.server.registry
        if self.tsih and registry.connections.get(self.tsih) is self:
            del registry.connections[self.tsih]
            registry.sessions.remove(self.tsih)
            self.server.metrics.session_ended(self.tsih)
            if self.scsi is not None and self.nexus is not None:
                self.scsi.nexus_removed(self.nexus)
            log.info("logout: session tsih=%d initiator=%s", self.tsih, self._initiator())
        self.tsih = 0

    def _initiator(self) -> str:
        return self.nexus.initiator_name if self.nexus else "-"

    def _send_targets(self, value: str, session_target: str | None) -> list[tuple[str, str]]:
        initiator = self.conn.result.params.initiator_name if self.conn.result else ""
        return send_targets.send_targets(
            self.server.registry, initiator, value, session_target, source=self.source
        )

    # -- NOP-In keepalive (RFC 7143 §11.19) ------------------------------------------------
    def _arm_ping(self) -> None:
        interval = self.server.nop_interval
        if interval > 0:
            loop = asyncio.get_running_loop()
            self._ping_handle = loop.call_later(interval, self._ping_tick)

    def _ping_tick(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.conn.ping_outstanding and self._idle:
            log.warning("no NOP-Out answer from %s: closing connection", self.peer)
            self.abort_session("ping timeout")
            return
        if self._idle:
            self.conn.ping()
            self._flush()
        self._idle = True
        self._arm_ping()


def _run_blocked(command: BlockedCommand) -> ScsiResponse:
    """A command the kernel would have blocked inline, run again in a worker thread
    (a test holds it at the pause point to see other sessions served meanwhile)."""
    faults.pause("nowait.fallback")
    return command.run()


def _run_lane_blocked(
    scsi: ScsiTarget, nexus: Nexus, lun: int, cdb: bytes, data: bytes | bytearray | None
) -> ScsiResponse:
    """A command the fast lane found the kernel would block, run whole in a worker
    thread (the same pause point as :func:`_run_blocked`)."""
    faults.pause("nowait.fallback")
    return scsi.execute(nexus, lun, cdb, data)


def _iscsi_transport_id(name: str, isid: str) -> bytes:
    """SPC-4 §7.6.4.6 iSCSI TransportID, format 01b (initiator port)."""
    body = f"{name},i,0x{isid}".encode() + b"\x00"
    body += b"\x00" * (-len(body) % 4)
    return bytes((0x45, 0)) + len(body).to_bytes(2, "big") + body


class TargetServer:
    """Listens on every portal and serves the registry's targets."""

    def __init__(
        self,
        registry: Registry,
        prefs: TargetPreferences | None = None,
        nop_interval: float = 30.0,
    ) -> None:
        self.registry = registry
        self.prefs = prefs or TargetPreferences(cmdsn_window=128)
        self.nop_interval = nop_interval
        self.metrics = Metrics()
        self.metrics.merge_source = self._merged_requests
        self.handlers: set[ConnectionHandler] = set()
        # enough for a queue of 16-32 commands on a remote (RBD) LU; made lazily
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="scsi-io")
        self._inbox: Inbox | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._by_portal: dict[tuple[str, int], asyncio.base_events.Server] = {}

    def _merged_requests(self) -> dict[tuple[str, int], tuple[int, int]]:
        """Reads and writes each LU's backend sent on merged (server/metrics.py), for
        the LUs whose backend merges (RBD)."""
        out = {}
        for key, target in self.registry.targets.items():
            for n, lu in target.scsi.luns.items():
                backend = lu.backend
                if isinstance(backend, MergeCounting):
                    out[(key, n)] = backend.merged_requests()
        return out

    def inbox(self) -> Inbox:
        """Where backend threads hand completions to the running loop."""
        if self._inbox is None:
            self._inbox = Inbox(asyncio.get_running_loop())
        return self._inbox

    async def start(self) -> list[Portal]:
        """Bind every portal; returns them with their actual ports (port 0 = any)."""
        bound = [await self._bind(portal) for portal in self.registry.portals]
        self.registry.portals = bound
        return bound

    async def _bind(self, portal: Portal) -> Portal:
        loop = asyncio.get_running_loop()
        holder: dict[str, Portal] = {}
        srv = await loop.create_server(
            lambda holder=holder: ConnectionHandler(self, holder["portal"]),
            host=portal.host,
            port=portal.port,
            reuse_address=True,
        )
        port = srv.sockets[0].getsockname()[1]
        actual = Portal(portal.host, port, portal.tpgt)
        holder["portal"] = actual
        self._servers.append(srv)
        self._by_portal[(actual.host, actual.port)] = srv
        return actual

    async def add_portal(self, portal: Portal) -> Portal:
        """Listen on one more portal while running (management ``portal add``)."""
        actual = await self._bind(portal)
        self.registry.portals = [*self.registry.portals, actual]
        return actual

    async def remove_portal(self, host: str, port: int) -> bool:
        """Stop listening on a portal; sessions that came in through it stay."""
        srv = self._by_portal.pop((host, port), None)
        if srv is None:
            return False
        srv.close()
        self._servers.remove(srv)
        self.registry.portals = [
            p for p in self.registry.portals if (p.host, p.port) != (host, port)
        ]
        return True

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        for handler in list(self.handlers):
            handler.abort_session("target shutting down")
        for srv in self._servers:
            await srv.wait_closed()
        self.executor.shutdown(wait=True)

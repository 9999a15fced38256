"""The target side of one iSCSI connection, sans-I/O (RFC 7143, ErrorRecoveryLevel 0).

Bytes in (:meth:`TargetConnection.receive_data`), events out (:meth:`next_event`),
completions in (:meth:`command_completed`, :meth:`task_management_completed`), bytes
out (:meth:`data_to_send`). No sockets, clocks or randomness: the server drives it.

Phases (one table, :data:`HANDLERS`): LOGIN until the login machine reaches full
feature phase, then FULL_FEATURE; LOGGED_OUT / CLOSED are terminal. A PDU whose
(phase, opcode) pair has no row is a protocol error: a Reject in full feature phase
(§11.17), a closed connection during login (§6.3).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from . import pdu as P
from .completion import CommandResult, command_end, residual_flags
from .events import ConnectionClosing, Event, ExecuteCommand, LoginComplete, ResetRequested
from .fast_lane import SCSI_COMMAND_BYTE, FastCommands, limits
from .framing import FramingError, PduReader, encode_pdu
from .serial import in_window, sn_add, sn_lt
from .settings import ConnectionSettings
from .transfer import Burst, DataOutError, DataSequenceError, Task

if TYPE_CHECKING:
    from .login import LoginMachine, LoginResult

# What the connection needs of the SCSI layer is injected by the server (which knows
# both sides), so that iscsi/ never imports scsi/:
# SAM LUN decoding (SAM-5 §4.7) ...
LunDecoder = Callable[[bytes], int]


class Refusal(Enum):
    """Why the transport itself ends a command with CHECK CONDITION (§11.4)."""

    TRANSFER_TOO_LONG = "transfer too long"  # EDTL beyond any CDB we accept
    DATA_PHASE_ERROR = "data phase error"  # Data-Out out of sequence at ERL 0 (§7.1.4)


# ... and the sense data (SPC-4 §4.5) that reports a refusal.
SenseBuilder = Callable[[Refusal], bytes]


#: The functions the connection hands to the server as :class:`ResetRequested`.
RESETS = frozenset(
    {P.TmfCode.LOGICAL_UNIT_RESET, P.TmfCode.TARGET_WARM_RESET, P.TmfCode.TARGET_COLD_RESET}
)

LOGOUT_CLOSE_SESSION = 0
LOGOUT_CLOSE_CONNECTION = 1
LOGOUT_REMOVE_FOR_RECOVERY = 2


class Phase(Enum):
    LOGIN = "login"
    FULL_FEATURE = "full_feature"
    LOGGED_OUT = "logged_out"
    CLOSED = "closed"


class TargetConnection(FastCommands):
    """One connection of one session (MaxConnections=1, so also the session). The
    server may set ``fast_lane`` once logged in (:mod:`.fast_lane`)."""

    def __init__(
        self,
        login: LoginMachine,
        decode_lun: LunDecoder,
        refusal_sense: SenseBuilder,
        settings: ConnectionSettings | None = None,
        send_targets: Callable[[str, str | None], list[tuple[str, str]]] | None = None,
    ) -> None:
        self.phase = Phase.LOGIN
        self.login = login
        self.decode_lun = decode_lun
        self.refusal_sense = refusal_sense
        self.settings = settings or ConnectionSettings()
        self._send_targets = send_targets
        self.reader = PduReader(max_data_length=8192)
        self.result: LoginResult | None = None
        self._out: list[P.Payload] = []
        self._events: deque[Event] = deque()
        self._header_digest = False
        self._data_digest = False
        self._discovery = False
        self.statsn = 0
        self.expcmdsn = 0
        self._pending: dict[int, P.Pdu] = {}  # out-of-order non-immediate PDUs by CmdSN
        self.tasks: dict[int, Task] = {}  # by ITT
        self._next_ttt = 1
        self._ping_ttt: int | None = None
        self._text: _TextExchange | None = None
        self._logout_pdu: P.LogoutRequest | None = None
        self.closing = False
        self._queued = 0  # bytes in self._out
        self._buffered = 0  # bytes of Data-Out buffers held by self.tasks
        self.stalled = False  # PDUs left unhandled until the output is taken

    # ------------------------------------------------------------------ public API
    @property
    def maxcmdsn(self) -> int:
        return (self.expcmdsn + self.settings.cmd_window - 1) & 0xFFFFFFFF  # sn_add, inline

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the socket; handles every complete PDU in them."""
        if self.phase in (Phase.CLOSED, Phase.LOGGED_OUT):
            return
        self.reader.feed(data)
        self._handle_received()

    def receive_buffer(self) -> memoryview:
        """Where the socket should put the next bytes it receives (asyncio's
        ``BufferedProtocol.get_buffer``): the reader's own buffer
        (:class:`.framing.PduReader`); then call :meth:`received`."""
        return self.reader.get_buffer()

    def received(self, nbytes: int) -> None:
        """``nbytes`` arrived in :meth:`receive_buffer`'s buffer; handles every
        complete PDU, as :meth:`receive_data`."""
        self.reader.buffer_updated(nbytes)
        if self.phase not in (Phase.CLOSED, Phase.LOGGED_OUT):
            self._handle_received()

    def _handle_received(self) -> None:
        self.stalled = False
        while self.phase not in (Phase.CLOSED, Phase.LOGGED_OUT):
            if self._queued >= self.settings.max_queued_output:
                # Back-pressure: the server takes the output, then calls
                # receive_data(b"") while ``stalled`` to handle the rest.
                self.stalled = True
                return
            try:
                raw = self.reader.next_pdu()
            except FramingError as exc:
                self._close(f"framing error: {exc}")
                return
            if raw is None:
                return
            if raw.bhs[0] == SCSI_COMMAND_BYTE and self._fast_command(raw):
                continue
            self._handle_raw(raw)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> list[P.Payload]:
        out, self._out = self._out, []
        self._queued = 0
        return out

    def command_completed(self, task: Task, response: CommandResult) -> None:
        """The SCSI layer finished ``task``: queue Data-In and status (§11.4, §11.7)."""
        task.dispatched = True
        self._drop_task(task)
        if task.aborted or self.phase is not Phase.FULL_FEATURE:
            self._maybe_finish_logout()
            return
        self._send_status(task, response)
        self._maybe_finish_logout()

    def task_management_completed(self, itt: int, response: P.TmfResponse) -> None:
        self._send(P.TaskMgmtResponse(itt=itt, response=response, **self._status_fields()))

    def abort_tasks(self, lun: int | None = None) -> None:
        """Abort every task (of one LUN): used for resets arriving from other sessions."""
        for task in list(self.tasks.values()):
            if lun is None or task.lun == lun:
                self._abort(task)

    def ping(self) -> None:
        """Send a NOP-In that asks for a NOP-Out (target-initiated ping, §11.19)."""
        if self.phase is not Phase.FULL_FEATURE or self._ping_ttt is not None:
            return
        self._ping_ttt = self._new_ttt()
        self._send(
            P.NopIn(
                ttt=self._ping_ttt,
                statsn=self.statsn,
                expcmdsn=self.expcmdsn,
                maxcmdsn=self.maxcmdsn,
            )
        )

    @property
    def ping_outstanding(self) -> bool:
        return self._ping_ttt is not None

    def close(self, reason: str) -> None:
        self._close(reason)

    # ------------------------------------------------------------------ dispatch
    def _handle_raw(self, raw: P.RawPdu) -> None:
        opcode = P.opcode_of(raw.bhs)
        handler = HANDLERS.get((self.phase, opcode))
        if self.phase is Phase.LOGIN and handler is None:
            self._close(f"opcode 0x{opcode:02x} during login")
            return
        try:
            pdu = raw.decode()
        except P.PduFormatError as exc:
            self._reject(raw.bhs, exc.reason)
            return
        if raw.digest_error:
            # §7.8: answer with a Reject (Data-Digest-Error) and discard the PDU.
            self._reject(raw.bhs, P.RejectReason.DATA_DIGEST_ERROR)
            return
        if handler is None:
            self._reject(raw.bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        handler(self, pdu, raw.bhs)

    def _handle_login(self, pdu: P.Pdu, bhs: bytes) -> None:
        assert isinstance(pdu, P.LoginRequest)
        response = self.login.receive(pdu)
        self._send(response)
        if self.login.failed:
            self._close("login failed")
            return
        if self.login.done:
            result = self.login.result
            assert result is not None
            self.result = result
            params = result.params
            self.statsn = result.statsn
            self.expcmdsn = result.exp_cmdsn
            self._header_digest = params.header_digest
            self._data_digest = params.data_digest
            self.reader.header_digest = params.header_digest
            self.reader.data_digest = params.data_digest
            self.reader.max_data_length = params.target_max_recv_data_segment_length
            self._discovery = params.session_type.lower() == "discovery"
            self.fast_limits = limits(params, self.settings.max_data_out_length)
            self.phase = Phase.FULL_FEATURE
            self._events.append(LoginComplete(result))

    def _handle_sequenced(self, pdu: P.Pdu, bhs: bytes) -> None:
        """CmdSN ordering for every PDU that carries a CmdSN (§4.2.2.1, §4.2.2.2)."""
        if pdu.immediate:
            self._deliver(pdu, bhs)
            return
        cmdsn: int = pdu.cmdsn  # type: ignore[attr-defined]
        if cmdsn != self.expcmdsn:  # (ExpCmdSN itself is always in the window)
            if not in_window(cmdsn, self.expcmdsn, self.maxcmdsn):
                return  # outside the window: silently discarded (§4.2.2.1)
            self._pending.setdefault(cmdsn, pdu)
            if isinstance(pdu, P.ScsiCommand):
                self._start_command(pdu, bhs, delivered=False)
            return
        self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF  # sn_add, inline
        self._deliver(pdu, bhs)
        while self.expcmdsn in self._pending and self.phase is Phase.FULL_FEATURE:
            nxt = self._pending.pop(self.expcmdsn)
            self.expcmdsn = sn_add(self.expcmdsn, 1)
            self._deliver(nxt, None)

    def _deliver(self, pdu: P.Pdu, bhs: bytes | None) -> None:
        """A PDU whose turn has come (bhs is None when it was held back)."""
        if isinstance(pdu, P.ScsiCommand):
            task = self.tasks.get(pdu.itt)
            if bhs is None and task is not None:
                task.delivered = True
                self._maybe_dispatch(task)
            elif bhs is not None:
                self._start_command(pdu, bhs, delivered=True)
        elif isinstance(pdu, P.NopOut):
            self._nop_out(pdu)
        elif isinstance(pdu, P.TextRequest):
            self._text_request(pdu, bhs)
        elif isinstance(pdu, P.TaskMgmtRequest):
            self._task_management(pdu)
        elif isinstance(pdu, P.LogoutRequest):
            self._logout(pdu)

    # ------------------------------------------------------------------ SCSI commands
    def _start_command(self, cmd: P.ScsiCommand, bhs: bytes, delivered: bool) -> None:
        result = self.result
        assert result is not None
        params = result.params
        if self._discovery:
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        if cmd.itt in self.tasks:
            self._reject(bhs, P.RejectReason.TASK_IN_PROGRESS)
            return
        try:
            lun = self.decode_lun(cmd.lun)
        except ValueError:
            lun = -1  # the SCSI layer answers LOGICAL UNIT NOT SUPPORTED
        edtl = cmd.expected_length
        immediate_len = len(cmd.data)
        if immediate_len and (not cmd.write or not params.immediate_data):
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        if immediate_len > min(params.first_burst_length, edtl):
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        if cmd.write and edtl > self.settings.max_data_out_length:
            # More than any CDB we accept may transfer (SBC-3 §6.5.3): refuse it before
            # buffering, as the SCSI layer refuses a too long TRANSFER LENGTH.
            self._send_early_status(cmd.itt, 0x02, Refusal.TRANSFER_TOO_LONG)
            return
        if len(self.tasks) >= self.settings.max_tasks or (
            cmd.write and edtl and edtl + self._buffered > self.settings.max_buffered_data_out
        ):
            self._send_early_status(cmd.itt, 0x28)  # TASK SET FULL
            return
        task = Task(
            itt=cmd.itt,
            cmdsn=cmd.cmdsn,
            lun=lun,
            lun_raw=cmd.lun,
            cdb=cmd.cdb,
            read=cmd.read,
            write=cmd.write,
            expected_length=edtl,
            immediate=cmd.immediate,
            delivered=delivered,
        )
        if cmd.write and edtl and immediate_len == edtl:
            # All the data came as immediate data: the SCSI layer gets the PDU's own
            # data segment, no buffer and no copy (checked above: within FirstBurstLength).
            task.buffer = cmd.data
            task.unsolicited_end = task.unsolicited_received = task.received = edtl
            task.next_r2t_offset = edtl  # nothing to solicit
        elif cmd.write and edtl:
            task.buffer = bytearray(edtl)
            if params.initial_r2t:
                task.unsolicited_end = immediate_len
            else:
                task.unsolicited_end = min(params.first_burst_length, edtl)
            if immediate_len:
                task.accept_data(0, cmd.data, P.RESERVED_TAG)
            # Data beyond the unsolicited part is solicited with R2Ts (§11.8).
            task.next_r2t_offset = task.unsolicited_end
        else:
            task.write = False
        self.tasks[cmd.itt] = task
        self._buffered += len(task.buffer) if task.buffer is not None else 0
        if task.write:
            self._issue_r2ts(task)
        self._maybe_dispatch(task)

    def _send_early_status(self, itt: int, status: int, refusal: Refusal | None = None) -> None:
        """End a command the transport refuses itself (§11.4): the status, and for
        CHECK CONDITION the sense data of ``refusal`` (SenseLength + sense, §11.4.7)."""
        data = b""
        if refusal is not None:
            sense = self.refusal_sense(refusal)
            data = len(sense).to_bytes(2, "big") + sense
        self._send(P.ScsiResponsePdu(itt=itt, status=status, data=data, **self._status_fields()))

    def _issue_r2ts(self, task: Task) -> None:
        params = self.result.params  # type: ignore[union-attr]
        while (
            task.next_r2t_offset < task.expected_length
            and len(task.bursts) < params.max_outstanding_r2t
        ):
            length = min(params.max_burst_length, task.expected_length - task.next_r2t_offset)
            ttt = self._new_ttt()
            task.bursts[ttt] = Burst(task.r2tsn, task.next_r2t_offset, length)
            self._send(
                P.R2T(
                    lun=task.lun_raw,
                    itt=task.itt,
                    ttt=ttt,
                    statsn=self.statsn,
                    expcmdsn=self.expcmdsn,
                    maxcmdsn=self.maxcmdsn,
                    r2tsn=task.r2tsn,
                    buffer_offset=task.next_r2t_offset,
                    desired_length=length,
                )
            )
            task.r2tsn += 1
            task.next_r2t_offset += length

    def _handle_data_out(self, pdu: P.Pdu, bhs: bytes) -> None:
        assert isinstance(pdu, P.DataOut)
        task = self.tasks.get(pdu.itt)
        if task is None or task.aborted:
            return  # a task we aborted or completed: its late data is dropped (§4.2.3.3)
        try:
            task.accept_data(pdu.buffer_offset, pdu.data, pdu.ttt, pdu.datasn)
        except DataSequenceError:
            # ERL 0 has no within-command recovery (RFC 7143 §7.1.4): end the task with
            # CHECK CONDITION, ABORTED COMMAND / DATA PHASE ERROR; its late Data-Out is
            # dropped. The connection stays up, so other tasks are not disturbed.
            self._abort(task)
            self._send_early_status(task.itt, 0x02, Refusal.DATA_PHASE_ERROR)
            return
        except DataOutError:
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        if pdu.ttt != P.RESERVED_TAG:
            burst = task.bursts[pdu.ttt]
            if pdu.final or burst.received >= burst.length:
                del task.bursts[pdu.ttt]
                self._issue_r2ts(task)
        self._maybe_dispatch(task)

    def _maybe_dispatch(self, task: Task) -> None:
        if task.ready:
            task.dispatched = True
            self._events.append(ExecuteCommand(task))

    def _send_status(self, task: Task, rsp: CommandResult) -> None:
        """Data-In PDUs, then status: collapsed into the last Data-In when GOOD (§11.7.4)."""
        params = self.result.params  # type: ignore[union-attr]
        edtl = task.expected_length
        data = rsp.data_in
        produced = len(data)
        overflow = underflow = False
        residual = 0
        if rsp.data_out_length or (task.write and not task.read):
            # A write: the CDB's length against EDTL (W may be clear when EDTL is 0).
            wanted = rsp.data_out_length
            if wanted > edtl:
                overflow, residual = True, wanted - edtl
            elif wanted < edtl:
                underflow, residual = True, edtl - wanted
        else:
            limit = edtl if task.read else 0
            if produced > limit:
                overflow, residual = True, produced - limit
            elif produced < limit:
                underflow, residual = True, limit - produced
            produced = min(produced, limit)
        # A CDB may describe more than 4 GiB (WRITE(16) of 2^32 blocks): the 32-bit
        # Residual Count (§11.4.5) saturates instead of failing to encode.
        residual = min(residual, 0xFFFFFFFF)
        status = int(rsp.status)
        sense = rsp.sense
        collapse = status == 0 and not sense
        burst_length = params.max_burst_length
        # The common ends, packed directly (iscsi/completion.py): no data, or all of it
        # in one Data-In that also carries GOOD status.
        one_pdu = produced <= params.max_recv_data_segment_length and produced <= burst_length
        if not sense and (not produced or (collapse and one_pdu)):
            if len(data) != produced:
                data = memoryview(data).cast("B")[:produced]
            self._end_without_sense(task, status, overflow, underflow, residual, data)
            return
        if produced:
            view = (
                memoryview(data).cast("B")[:produced]
                if not isinstance(data, memoryview)
                else data[:produced]
            )
            seg = params.max_recv_data_segment_length
            burst = params.max_burst_length
            offset = 0
            datasn = 0
            while offset < produced:
                n = min(seg, produced - offset, burst - offset % burst)
                last = offset + n >= produced
                end_of_burst = last or (offset + n) % burst == 0
                status_here = last and collapse
                din = P.DataIn(
                    itt=task.itt,
                    final=end_of_burst,
                    status_present=status_here,
                    status=status if status_here else 0,
                    overflow=overflow and status_here,
                    underflow=underflow and status_here,
                    residual=residual if status_here else 0,
                    lun=task.lun_raw if not status_here else bytes(8),
                    statsn=self.statsn if status_here else 0,
                    expcmdsn=self.expcmdsn,
                    maxcmdsn=self.maxcmdsn,
                    datasn=datasn,
                    buffer_offset=offset,
                    data=view[offset : offset + n],
                )
                if status_here:
                    self.statsn = sn_add(self.statsn, 1)
                self._send(din)
                offset += n
                datasn += 1
            if collapse:
                return
            expdatasn = datasn
        else:
            expdatasn = 0
        body = len(sense).to_bytes(2, "big") + sense if sense else b""
        self._send(
            P.ScsiResponsePdu(
                itt=task.itt,
                status=status,
                overflow=overflow,
                underflow=underflow,
                residual=residual,
                expdatasn=expdatasn if task.read else task.r2tsn,
                data=body,
                **self._status_fields(),
            )
        )

    def _end_without_sense(
        self,
        task: Task,
        status: int,
        overflow: bool,
        underflow: bool,
        residual: int,
        data: bytes | bytearray | memoryview,
    ) -> None:
        """The common ends: a read's data and status in one Data-In (§11.7.4), or a
        SCSI Response without sense (a write, most often; §11.4)."""
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        self._emit(
            command_end(
                task.itt, status, residual_flags(overflow, underflow), residual, statsn,
                self.expcmdsn, self.maxcmdsn, data, 0 if task.read else task.r2tsn,
                self._header_digest, self._data_digest,
            ),
            P.BHS_LEN + len(data),
        )  # fmt: skip

    # ------------------------------------------------------------------ other requests
    def _nop_out(self, pdu: P.NopOut) -> None:
        """NOP-Out (§11.18): answer pings; a reply to our ping ends it."""
        if pdu.itt == P.RESERVED_TAG:
            if pdu.ttt == self._ping_ttt:
                self._ping_ttt = None
            return
        self._send(P.NopIn(itt=pdu.itt, lun=pdu.lun, data=pdu.data, **self._status_fields()))

    def _text_request(self, pdu: P.TextRequest, bhs: bytes | None) -> None:
        """Text Request in full feature phase (§11.10): SendTargets, with continuation."""
        from .text import TextFormatError, encode_text, parse_text

        ex = self._text
        if ex is not None and pdu.ttt != P.RESERVED_TAG:
            if pdu.ttt != ex.ttt or pdu.itt != ex.itt:
                self._reject(bhs or pdu.encode_bhs(), P.RejectReason.INVALID_PDU_FIELD)
                return
            if ex.response:  # the initiator asks for our next response piece
                self._send_text_chunk(ex)
                return
            # else it is the next piece of a request it sent with C=1 (§11.10.2)
        elif pdu.ttt != P.RESERVED_TAG:
            self._reject(bhs or pdu.encode_bhs(), P.RejectReason.INVALID_PDU_FIELD)
            return
        if ex is None or ex.itt != pdu.itt:
            ex = self._text = _TextExchange(itt=pdu.itt, ttt=P.RESERVED_TAG)
        ex.request += bytes(pdu.data)
        if len(ex.request) > self.settings.max_text_response:
            self._text = None
            self._reject(bhs or pdu.encode_bhs(), P.RejectReason.PROTOCOL_ERROR)
            return
        if pdu.cont:
            # More request text follows: acknowledge with an empty response (§11.10.2).
            ex.ttt = self._new_ttt()
            self._send(
                P.TextResponse(itt=pdu.itt, final=False, ttt=ex.ttt, **self._status_fields())
            )
            return
        try:
            pairs = parse_text(ex.request)
        except TextFormatError:
            self._text = None
            self._reject(bhs or pdu.encode_bhs(), P.RejectReason.PROTOCOL_ERROR)
            return
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets" and self._send_targets is not None:
                assert self.result is not None
                answer += self._send_targets(value, self._session_target_name())
            else:
                answer.append((key, "NotUnderstood"))
        ex.response = encode_text(answer)
        ex.sent = 0
        self._send_text_chunk(ex)

    def _session_target_name(self) -> str | None:
        target = self.result.target if self.result else None
        return target.name if target is not None else None

    def _send_text_chunk(self, ex: _TextExchange) -> None:
        limit = self.result.params.max_recv_data_segment_length  # type: ignore[union-attr]
        chunk = ex.response[ex.sent : ex.sent + limit]
        ex.sent += len(chunk)
        more = ex.sent < len(ex.response)
        if more:
            ex.ttt = self._new_ttt()
        else:
            self._text = None
        self._send(
            P.TextResponse(
                itt=ex.itt,
                final=not more,
                cont=more,
                ttt=ex.ttt if more else P.RESERVED_TAG,
                data=chunk,
                **self._status_fields(),
            )
        )

    def _task_management(self, pdu: P.TaskMgmtRequest) -> None:
        """Task management (§11.5); resets go to the server, aborts stay here."""
        try:
            fn = P.TmfCode(pdu.function)
        except ValueError:
            self.task_management_completed(pdu.itt, P.TmfResponse.NOT_SUPPORTED)
            return
        try:
            lun = self.decode_lun(pdu.lun)
        except ValueError:
            lun = -1
        if fn is P.TmfCode.ABORT_TASK:
            task = self.tasks.get(pdu.referenced_task_tag)
            if task is not None and task.lun == lun:
                self._abort(task)
                rsp = P.TmfResponse.COMPLETE
            elif in_window(pdu.refcmdsn, self.expcmdsn, self.maxcmdsn) and sn_lt(
                pdu.refcmdsn, pdu.cmdsn
            ):
                # §11.5.1: not received yet, within the window and before this TMF:
                # consider it received (and done) and report Function Complete.
                self._pending.pop(pdu.refcmdsn, None)
                rsp = P.TmfResponse.COMPLETE if task is None else P.TmfResponse.TASK_DOES_NOT_EXIST
            else:
                rsp = P.TmfResponse.TASK_DOES_NOT_EXIST
            self.task_management_completed(pdu.itt, rsp)
        elif fn in (P.TmfCode.ABORT_TASK_SET, P.TmfCode.CLEAR_TASK_SET):
            for task in list(self.tasks.values()):
                if task.lun == lun and task.itt != pdu.itt:
                    self._abort(task)
            self.task_management_completed(pdu.itt, P.TmfResponse.COMPLETE)
        elif fn in RESETS:
            self.abort_tasks(lun if fn is P.TmfCode.LOGICAL_UNIT_RESET else None)
            self._events.append(ResetRequested(pdu.itt, fn, lun))
        elif fn is P.TmfCode.TASK_REASSIGN:  # needs ErrorRecoveryLevel 2 (§7.2.2)
            self.task_management_completed(pdu.itt, P.TmfResponse.REASSIGN_NOT_SUPPORTED)
        else:  # CLEAR ACA: we never establish an ACA
            self.task_management_completed(pdu.itt, P.TmfResponse.NOT_SUPPORTED)

    def _abort(self, task: Task) -> None:
        task.aborted = True
        if not task.dispatched:
            self._drop_task(task)
        # A held-back command stays in _pending: its CmdSN still counts when the gap
        # fills (delivering it finds no task), so ExpCmdSN moves past it.

    def _drop_task(self, task: Task) -> None:
        """Forget a task; the one place that keeps ``_buffered`` in step with ``tasks``."""
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
            self._buffered -= len(task.buffer) if task.buffer is not None else 0

    def _logout(self, pdu: P.LogoutRequest) -> None:
        """Logout (§11.14): answer once every running task is done, then close."""
        self._logout_pdu = pdu
        for task in list(self.tasks.values()):
            if not task.dispatched:
                self._abort(task)
        self._maybe_finish_logout()

    def _maybe_finish_logout(self) -> None:
        pdu = self._logout_pdu
        if pdu is None or any(t.dispatched for t in self.tasks.values()):
            return
        self._logout_pdu = None
        response = 0
        if pdu.reason == LOGOUT_REMOVE_FOR_RECOVERY:
            response = 2  # connection recovery is not supported (ERL 0)
        elif pdu.reason not in (LOGOUT_CLOSE_SESSION, LOGOUT_CLOSE_CONNECTION):
            response = 3  # cleanup failed for various reasons
        self._send(P.LogoutResponse(itt=pdu.itt, response=response, **self._status_fields()))
        self.phase = Phase.LOGGED_OUT
        self.closing = True
        self._events.append(ConnectionClosing("logout"))

    def _snack(self, pdu: P.Pdu, bhs: bytes) -> None:
        self._reject(bhs, P.RejectReason.SNACK_REJECT)  # no SNACK at ErrorRecoveryLevel 0

    # ------------------------------------------------------------------ helpers
    def _status_fields(self) -> dict[str, int]:
        """StatSN (advanced), ExpCmdSN, MaxCmdSN for a PDU that carries status."""
        statsn = self.statsn
        self.statsn = sn_add(statsn, 1)
        return {"statsn": statsn, "expcmdsn": self.expcmdsn, "maxcmdsn": self.maxcmdsn}

    def _reject(self, bhs: bytes, reason: int) -> None:
        self._send(P.Reject(reason=reason, data=bytes(bhs), **self._status_fields()))

    def _send(self, pdu: P.Pdu) -> None:
        self._emit(
            encode_pdu(pdu, self._header_digest, self._data_digest), P.BHS_LEN + len(pdu.data)
        )

    def _emit(self, buffers: list[P.Payload], size: int) -> None:
        """Queue one encoded PDU (``size``: BHS + data segment, for back-pressure)."""
        self._out += buffers
        self._queued += size

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (ttt % 0x7FFFFFFF) + 1
        return ttt

    def _close(self, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.closing = True
        for task in self.tasks.values():
            task.aborted = True
        self._events.append(ConnectionClosing(reason))


@dataclass(slots=True)
class _TextExchange:
    """A multi-PDU text exchange in progress (§11.10, continuation by TTT)."""

    itt: int
    ttt: int
    request: bytes = b""
    response: bytes = b""
    sent: int = 0


_Handler = Callable[[TargetConnection, P.Pdu, bytes], None]

# The (phase, opcode) table. A missing pair is a protocol error (see module docstring).
HANDLERS: dict[tuple[Phase, int], _Handler] = {
    (Phase.LOGIN, P.Opcode.LOGIN_REQUEST): TargetConnection._handle_login,
    (Phase.FULL_FEATURE, P.Opcode.SCSI_COMMAND): TargetConnection._handle_sequenced,
    (Phase.FULL_FEATURE, P.Opcode.NOP_OUT): TargetConnection._handle_sequenced,
    (Phase.FULL_FEATURE, P.Opcode.TEXT_REQUEST): TargetConnection._handle_sequenced,
    (Phase.FULL_FEATURE, P.Opcode.TASK_MGMT_REQUEST): TargetConnection._handle_sequenced,
    (Phase.FULL_FEATURE, P.Opcode.LOGOUT_REQUEST): TargetConnection._handle_sequenced,
    (Phase.FULL_FEATURE, P.Opcode.DATA_OUT): TargetConnection._handle_data_out,
    (Phase.FULL_FEATURE, P.Opcode.SNACK_REQUEST): TargetConnection._snack,
}

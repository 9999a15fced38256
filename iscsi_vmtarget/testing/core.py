"""A sans-I/O harness around one real :class:`TargetConnection`.

Everything is real except the sockets and the asyncio loop: the login machine with a
:class:`StaticDirectory` and a :class:`SessionTable`, the connection, and a
:class:`ScsiTarget` with one LU over a :class:`MemoryBackend`. :meth:`CoreHarness.feed`
plays the server's part (run ExecuteCommand events synchronously, answer resets) and
returns the PDUs the target sent, which the fuzz tests check against what is allowed.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

from ..iscsi import pdu as P
from ..iscsi import send_targets
from ..iscsi.connection import ConnectionSettings, Phase, TargetConnection
from ..iscsi.directory import Portal, StaticDirectory, TargetEntry
from ..iscsi.events import ConnectionClosing, ExecuteCommand, LoginComplete, ResetRequested
from ..iscsi.framing import PduReader, encode_pdu
from ..iscsi.login import LoginMachine, SessionTable
from ..iscsi.params import TargetPreferences
from ..iscsi.text import encode_text
from ..iscsi.transfer import Task
from ..scsi import LogicalUnit, Nexus, ScsiTarget, UnitIdentity
from ..server import fabric
from ..storage import MemoryBackend

TARGET_NAME = "iqn.2026-11.org.iscsi-vmtarget:fuzz"
INITIATOR_NAME = "iqn.2026-11.org.iscsi-vmtarget.test:fuzzer"
PORTAL = Portal("127.0.0.1", 3260, 1)
BLOCK = 512


class _Counter:
    """Deterministic "random" bytes for CHAP challenges (the core takes them injected)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, length: int) -> bytes:
        self.n += 1
        return hashlib.sha256(self.n.to_bytes(8, "big")).digest()[:length].ljust(length, b"\0")


class RecordingConnection(TargetConnection):
    """A TargetConnection that also keeps every PDU it queued, as objects decoded back
    from the wire bytes (so the packed fast paths of iscsi/completion.py are checked too)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sent: list[P.Pdu] = []

    def _emit(self, buffers: list[P.Payload], size: int) -> None:
        reader = PduReader(
            max_data_length=1 << 24,
            header_digest=self._header_digest,
            data_digest=self._data_digest,
        )
        reader.feed(b"".join(bytes(b) for b in buffers))
        raw = reader.next_pdu()
        assert raw is not None and not raw.digest_error and not reader.buffered, buffers
        assert size == P.BHS_LEN + len(raw.data), (size, raw)
        self.sent.append(raw.decode())
        super()._emit(buffers, size)


@dataclass
class CoreHarness:
    """One target connection plus the device server behind it."""

    lun_bytes: int = 1 << 20
    prefs: TargetPreferences = field(
        default_factory=lambda: TargetPreferences(
            cmdsn_window=32,
            max_recv_data_segment_length=8192,
            max_outstanding_r2t=2,
        )
    )
    settings: ConnectionSettings = field(
        default_factory=lambda: ConnectionSettings(cmd_window=32, max_text_response=8192)
    )

    def __post_init__(self) -> None:
        self.backend = MemoryBackend(self.lun_bytes)
        unit = LogicalUnit(self.backend, UnitIdentity.from_uuid(uuid.UUID(int=9), "fuzz"))
        self.scsi = ScsiTarget({0: unit})
        self.directory = StaticDirectory([TargetEntry(name=TARGET_NAME, portals=(PORTAL,))])
        self.sessions = SessionTable()
        login = LoginMachine(
            directory=self.directory,
            sessions=self.sessions,
            portal=PORTAL,
            random_bytes=_Counter(),
            prefs=self.prefs,
        )
        self.conn = RecordingConnection(
            login,
            decode_lun=fabric.decode_lun,
            refusal_sense=fabric.refusal_sense,
            settings=self.settings,
            send_targets=self._send_targets,
        )
        self.nexus: Nexus | None = None
        self.closed: str | None = None
        self.logged_in = False
        self.pdus_in = 0
        self.cmdsn = 1
        self.expstatsn = 0

    # -- the server's part ---------------------------------------------------------------
    def feed(self, data: bytes) -> list[P.Pdu]:
        """Give the connection ``data``; run what it asks; return the PDUs it sent."""
        start = len(self.conn.sent)
        self.conn.receive_data(data)
        self._pump()
        self.conn.data_to_send()  # the wire bytes: already checked as objects
        return self.conn.sent[start:]

    def _pump(self) -> None:
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, ExecuteCommand):
                self._execute(event.task)
            elif isinstance(event, LoginComplete):
                self.logged_in = True
                params = event.result.params
                self.nexus = Nexus(
                    initiator_name=params.initiator_name,
                    initiator_port=f"{params.initiator_name},i,0x{event.result.isid.hex()}",
                    target_name=TARGET_NAME,
                    target_port=f"{TARGET_NAME},t,0x0001",
                )
                self.scsi.nexus_added(self.nexus)
            elif isinstance(event, ResetRequested):
                assert self.nexus is not None
                response = fabric.task_management(self.scsi, self.nexus, event.function, event.lun)
                self.conn.task_management_completed(event.itt, response)
            elif isinstance(event, ConnectionClosing):
                self.closed = event.reason

    def _execute(self, task: Task) -> None:
        """Run a command to completion, synchronously (a subclass may start it)."""
        assert self.nexus is not None
        data = memoryview(task.buffer) if task.buffer is not None else None
        rsp = self.scsi.execute(self.nexus, task.lun, task.cdb, data)
        self.conn.command_completed(task, rsp)

    def _send_targets(self, value: str, session_target: str | None) -> list[tuple[str, str]]:
        return send_targets.send_targets(self.directory, INITIATOR_NAME, value, session_target)

    # -- a well-behaved initiator's login --------------------------------------------------
    def login(self, discovery_session: bool = False, digests: bool = False) -> None:
        """Log in (security stage, then operational) the way a real initiator would."""
        first = [("InitiatorName", INITIATOR_NAME)]
        if discovery_session:
            first.append(("SessionType", "Discovery"))
        else:
            first += [("SessionType", "Normal"), ("TargetName", TARGET_NAME)]
        sec = P.LoginRequest(
            itt=0, transit=True, csg=0, nsg=1, isid=bytes.fromhex("400001370000"), cmdsn=1,
            data=encode_text([*first, ("AuthMethod", "None")]),
        )  # fmt: skip
        digest = "CRC32C" if digests else "None"
        ops = [
            ("HeaderDigest", digest),
            ("DataDigest", digest),
            ("MaxRecvDataSegmentLength", "8192"),
            ("ErrorRecoveryLevel", "0"),
        ]
        if not discovery_session:
            ops += [("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxOutstandingR2T", "2")]
        op = P.LoginRequest(
            itt=0, transit=True, csg=1, nsg=3, isid=sec.isid, cmdsn=1, data=encode_text(ops)
        )
        for req in (sec, op):
            out = self.feed(wire(req))
            assert out and isinstance(out[-1], P.LoginResponse), out
            assert out[-1].status_class == 0, (out[-1].status_class, out[-1].status_detail)
        assert self.logged_in and self.conn.phase is Phase.FULL_FEATURE
        self.cmdsn = self.conn.expcmdsn
        self.header_digest = self.data_digest = digests

    def wire(self, *pdus: P.Pdu) -> bytes:
        """Encode with the digests this connection negotiated."""
        hd = self.conn.reader.header_digest
        dd = self.conn.reader.data_digest
        return wire(*pdus, hd=hd, dd=dd)

    # -- bounds ------------------------------------------------------------------------------
    def buffered_task_bytes(self) -> int:
        return sum(len(t.buffer) for t in self.conn.tasks.values() if t.buffer is not None)


def wire(*pdus: P.Pdu, hd: bool = False, dd: bool = False) -> bytes:
    return b"".join(bytes(b) for p in pdus for b in encode_pdu(p, hd, dd))

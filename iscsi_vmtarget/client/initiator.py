"""A small blocking iSCSI initiator built on the sans-I/O codec (RFC 7143, client role).

It logs in (AuthMethod None or CHAP, optionally mutual), negotiates digests and burst
sizes, runs SCSI commands (immediate data, R2T/Data-Out, Data-In): one at a time with
:meth:`Initiator.command`, or several in flight with :meth:`Initiator.start_command` and
:meth:`Initiator.handle_pdu` (:mod:`.window`), and can send raw PDUs for protocol
tests. Used by tests and tools, by replication and by ``state push|pull``.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field

from ..errors import IscsiVmtargetError
from ..iscsi import pdu as P
from ..iscsi.framing import PduReader, encode_pdu
from ..iscsi.serial import sn_gt
from ..scsi.lun_address import encode_lun
from ..scsi.sense import parse_sense

DEFAULT_INITIATOR = "iqn.2026-11.org.iscsi-vmtarget:initiator"


class InitiatorError(IscsiVmtargetError):
    pass


class LoginFailed(InitiatorError):
    def __init__(self, status_class: int, status_detail: int, text: str = "") -> None:
        super().__init__(
            f"login failed: class 0x{status_class:02x} detail 0x{status_detail:02x} {text}"
        )
        self.status_class = status_class
        self.status_detail = status_detail


class ScsiCommandError(InitiatorError):
    """A command ended in CHECK CONDITION (or another non-GOOD status)."""

    def __init__(self, what: str, status: int, sense: tuple[int, int, int]) -> None:
        key, asc, ascq = sense
        super().__init__(
            f"{what} failed: status 0x{status:02x}, sense key 0x{key:x} "
            f"ASC/ASCQ {asc:02x}h/{ascq:02x}h"
        )
        self.status = status
        self.sense = sense


#: SCSI status and sense key values the helpers below act on (SAM-5 §5.3, SPC-4 §4.5.6).
GOOD = 0x00
CHECK_CONDITION = 0x02
UNIT_ATTENTION = 0x6
ILLEGAL_REQUEST = 0x5


@dataclass
class ScsiResult:
    status: int
    data: bytes = b""
    sense: bytes = b""
    residual: int = 0
    overflow: bool = False
    underflow: bool = False

    @property
    def sense_key(self) -> int:
        return parse_sense(self.sense)[0]

    @property
    def asc_ascq(self) -> tuple[int, int]:
        _, asc, ascq = parse_sense(self.sense)
        return (asc, ascq)


@dataclass
class Task:
    """One SCSI command in flight: what its R2Ts take Data-Out from, its Data-In so far."""

    itt: int
    lun: bytes
    data_out: memoryview
    buf: bytearray = field(default_factory=bytearray)
    result: ScsiResult | None = None

    def gather(self, offset: int, data: P.Payload) -> None:
        if offset == len(self.buf):  # in order (DataPDUInOrder=Yes): one copy
            self.buf += data
            return
        end = offset + len(data)
        if len(self.buf) < end:
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data

    def data_in(self, last: P.DataIn) -> bytes:
        """All Data-In, ``last`` included: a single PDU's segment as it is, uncopied."""
        if not self.buf and last.buffer_offset == 0:
            return bytes(last.data)
        self.gather(last.buffer_offset, last.data)
        return bytes(self.buf)


def _text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\x00" for k, v in pairs)


def _parse(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in bytes(data).split(b"\x00"):
        if item:
            k, _, v = item.decode().partition("=")
            out[k] = v
    return out


def _hex_or_b64(value: str) -> bytes:
    import base64

    if value[:2].lower() == "0x":
        return bytes.fromhex(value[2:])
    if value[:2].lower() == "0b":
        return base64.b64decode(value[2:])
    raise InitiatorError(f"bad CHAP value {value!r}")


@dataclass
class Initiator:
    """One session over one connection to ``host:port``."""

    host: str = "127.0.0.1"
    port: int = 3260
    initiator_name: str = DEFAULT_INITIATOR
    target_name: str | None = None  # None: discovery session
    chap_user: str | None = None
    chap_secret: bytes | None = None
    mutual_secret: bytes | None = None  # expect the target to prove this
    header_digest: bool = False
    data_digest: bool = False
    isid: bytes = bytes.fromhex("400001370000")
    tsih: int = 0
    max_recv_data_segment_length: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = False
    timeout: float = 10.0
    params: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock: socket.socket | None = None
        self.reader = PduReader(max_data_length=1 << 24)
        self.cmdsn = 1
        self.expstatsn = 0
        self.itt = 1
        self.maxcmdsn: int | None = None  # None until the target names its window
        self._rx = memoryview(bytearray(1 << 20))
        self._hd = self._dd = False

    # -- transport ----------------------------------------------------------------------
    def connect(self) -> Initiator:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> Initiator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_pdu(self, pdu: P.Pdu) -> None:
        assert self.sock is not None
        # join takes the buffers as they are: the payload is copied once, into the frame
        self.sock.sendall(b"".join(encode_pdu(pdu, self._hd, self._dd)))

    def send_raw(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def recv_pdu(self) -> P.Pdu:
        """The next PDU from the target; InitiatorError on a closed connection."""
        assert self.sock is not None
        while True:
            raw = self.reader.next_pdu()
            if raw is not None:
                pdu = raw.decode()
                statsn = getattr(pdu, "statsn", None)
                if statsn is not None and not isinstance(pdu, (P.R2T,)):
                    self.expstatsn = (statsn + 1) & 0xFFFFFFFF
                maxcmdsn = getattr(pdu, "maxcmdsn", None)
                if maxcmdsn is not None and (
                    self.maxcmdsn is None or sn_gt(maxcmdsn, self.maxcmdsn)
                ):
                    self.maxcmdsn = maxcmdsn  # it only grows (§4.2.2.1)
                return pdu
            n = self.sock.recv_into(self._rx)  # a reused buffer: no new 1 MiB per call
            if not n:
                raise InitiatorError("connection closed by target")
            self.reader.feed(self._rx[:n])

    def next_itt(self) -> int:
        self.itt = (self.itt + 1) & 0x7FFFFFFF
        return self.itt

    # -- login (RFC 7143 §6) ---------------------------------------------------------------
    def login(self, extra: list[tuple[str, str]] | None = None) -> dict[str, str]:
        if self.sock is None:
            self.connect()
        first = [("InitiatorName", self.initiator_name)]
        if self.target_name:
            first += [("SessionType", "Normal"), ("TargetName", self.target_name)]
        else:
            first += [("SessionType", "Discovery")]
        itt = self.next_itt()
        if self.chap_secret is not None:
            rsp = self._login_step(itt, 0, 0, False, first + [("AuthMethod", "CHAP,None")])
            if rsp.get("AuthMethod") == "CHAP":
                rsp = self._login_step(itt, 0, 0, False, [("CHAP_A", "5")])
                ident = int(rsp["CHAP_I"])
                challenge = _hex_or_b64(rsp["CHAP_C"])
                resp = hashlib.md5(bytes([ident]) + self.chap_secret + challenge).digest()
                pairs = [
                    ("CHAP_N", self.chap_user or self.initiator_name),
                    ("CHAP_R", "0x" + resp.hex()),
                ]
                my_ident, my_chal = 0x42, os.urandom(16)
                if self.mutual_secret is not None:
                    pairs += [("CHAP_I", str(my_ident)), ("CHAP_C", "0x" + my_chal.hex())]
                rsp = self._login_step(itt, 0, 1, True, pairs)
                if self.mutual_secret is not None:
                    want = hashlib.md5(bytes([my_ident]) + self.mutual_secret + my_chal).digest()
                    if _hex_or_b64(rsp.get("CHAP_R", "0x")) != want:
                        raise InitiatorError("target failed mutual CHAP")
                first = []
        else:
            rsp = self._login_step(itt, 0, 1, True, first + [("AuthMethod", "None")])
            first = []
        ops = first + [
            ("HeaderDigest", "CRC32C" if self.header_digest else "None"),
            ("DataDigest", "CRC32C" if self.data_digest else "None"),
            ("MaxRecvDataSegmentLength", str(self.max_recv_data_segment_length)),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("ErrorRecoveryLevel", "0"),
        ]
        if self.target_name:
            ops += [
                ("InitialR2T", "Yes" if self.initial_r2t else "No"),
                ("ImmediateData", "Yes" if self.immediate_data else "No"),
                ("MaxBurstLength", "1048576"),
                ("FirstBurstLength", "262144"),
                ("MaxOutstandingR2T", "1"),
                ("MaxConnections", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
            ]
        ops += extra or []
        rsp = self._login_step(itt, 1, 3, True, ops)
        self.params.update(rsp)
        while not self._final:
            rsp = self._login_step(itt, 1, 3, True, [])
            self.params.update(rsp)
        self._hd = self.params.get("HeaderDigest") == "CRC32C"
        self._dd = self.params.get("DataDigest") == "CRC32C"
        self.reader.header_digest, self.reader.data_digest = self._hd, self._dd
        return self.params

    def _login_step(
        self, itt: int, csg: int, nsg: int, transit: bool, pairs: list[tuple[str, str]]
    ) -> dict[str, str]:
        self.send_pdu(
            P.LoginRequest(
                itt=itt,
                transit=transit,
                csg=csg,
                nsg=nsg,
                isid=self.isid,
                tsih=self.tsih,
                cmdsn=self.cmdsn,
                expstatsn=self.expstatsn,
                data=_text(pairs),
            )
        )
        text = b""
        while True:
            rsp = self.recv_pdu()
            if not isinstance(rsp, P.LoginResponse):
                raise InitiatorError(f"unexpected {type(rsp).__name__} during login")
            if rsp.status_class:
                raise LoginFailed(rsp.status_class, rsp.status_detail)
            text += bytes(rsp.data)
            if not rsp.cont:
                break
            self.send_pdu(
                P.LoginRequest(
                    itt=itt,
                    csg=csg,
                    nsg=nsg,
                    isid=self.isid,
                    tsih=self.tsih,
                    cmdsn=self.cmdsn,
                    expstatsn=self.expstatsn,
                )
            )
        self.tsih = rsp.tsih
        self._final = rsp.transit and rsp.nsg == 3
        return _parse(text)

    # -- full feature phase --------------------------------------------------------------------
    def text_request(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        itt = self.next_itt()
        self.send_pdu(
            P.TextRequest(itt=itt, cmdsn=self.cmdsn, expstatsn=self.expstatsn, data=_text(pairs))
        )
        self.cmdsn += 1
        text = b""
        while True:
            rsp = self.recv_pdu()
            if not isinstance(rsp, P.TextResponse):
                raise InitiatorError(f"expected Text Response, got {rsp}")
            text += bytes(rsp.data)
            if rsp.final:
                break
            self.send_pdu(
                P.TextRequest(
                    itt=itt, ttt=rsp.ttt, immediate=True, cmdsn=self.cmdsn, expstatsn=self.expstatsn
                )
            )
        return [(k, v) for k, _, v in (i.decode().partition("=") for i in text.split(b"\x00") if i)]

    def send_targets(self, value: str = "All") -> list[tuple[str, str]]:
        return self.text_request([("SendTargets", value)])

    def command(
        self,
        cdb: bytes,
        lun: int = 0,
        data_out: P.Payload = b"",
        read_length: int = 0,
        expected_length: int | None = None,
        lun_raw: bytes | None = None,
    ) -> ScsiResult:
        """Run one SCSI command to completion (``lun_raw``: an 8-byte LUN as is)."""
        lun_bytes = lun_raw if lun_raw is not None else encode_lun(lun)
        task = self.start_command(cdb, lun_bytes, data_out, read_length, expected_length)
        tasks = {task.itt: task}
        while tasks:
            self.handle_pdu(self.recv_pdu(), tasks)
        assert task.result is not None
        return task.result

    def start_command(
        self, cdb: bytes, lun_bytes: bytes, data_out: P.Payload, read_length: int, edtl: int | None
    ) -> Task:
        """Send a SCSI Command PDU to the 8-byte LUN ``lun_bytes`` with its immediate and
        unsolicited data (RFC 7143 §11.3, §13.10-13.11) and return the task whose PDUs
        :meth:`handle_pdu` handles; several may be in flight (up to MaxCmdSN,
        :meth:`window_open`). ``edtl``: the Expected Data Transfer Length, None for
        the data's or ``read_length``."""
        itt = self.next_itt()
        data_out = memoryview(data_out).cast("B")  # PDUs take slices of it, not copies
        edtl = edtl if edtl is not None else (len(data_out) or read_length)
        first_burst = self._number("FirstBurstLength", 65536)
        mrdsl = self._number("MaxRecvDataSegmentLength", 8192)
        immediate: P.Payload = b""
        if data_out and self.params.get("ImmediateData") == "Yes":
            immediate = data_out[: min(first_burst, mrdsl, edtl)]
        self.send_pdu(
            P.ScsiCommand(
                itt=itt,
                read=read_length > 0,
                write=bool(data_out),
                lun=lun_bytes,
                expected_length=edtl,
                cmdsn=self.cmdsn,
                expstatsn=self.expstatsn,
                cdb=cdb,
                data=immediate,
            )
        )
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        sent = len(immediate)
        if data_out and self.params.get("InitialR2T") == "No" and sent < min(first_burst, edtl):
            end = min(first_burst, edtl, len(data_out))
            sent = self._send_data(itt, lun_bytes, data_out, sent, end - sent, P.RESERVED_TAG)
        return Task(itt, lun_bytes, data_out)

    def handle_pdu(self, rsp: P.Pdu, tasks: dict[int, Task]) -> Task | None:
        """Act on one PDU of a full-feature session for the tasks in flight: answer an
        R2T with its Data-Out, gather Data-In, answer a NOP-In ping. A task that got
        its status leaves ``tasks`` and is returned (its ``result`` set)."""
        if isinstance(rsp, P.NopIn):
            if rsp.ttt != P.RESERVED_TAG:
                self.send_pdu(
                    P.NopOut(
                        immediate=True, ttt=rsp.ttt, cmdsn=self.cmdsn, expstatsn=self.expstatsn
                    )
                )
            return None
        if isinstance(rsp, P.Reject):
            raise InitiatorError(f"command rejected, reason 0x{rsp.reason:02x}")
        if not isinstance(rsp, (P.R2T, P.DataIn, P.ScsiResponsePdu)):
            return None
        task = tasks.get(rsp.itt)
        if task is None:
            raise InitiatorError(
                f"{type(rsp).__name__} for task 0x{rsp.itt:08x}, which is not in flight"
            )
        if isinstance(rsp, P.R2T):
            self._send_data(
                task.itt, task.lun, task.data_out, rsp.buffer_offset, rsp.desired_length, rsp.ttt
            )
            return None
        if isinstance(rsp, P.DataIn):
            if not rsp.status_present:
                task.gather(rsp.buffer_offset, rsp.data)
                return None
            task.result = ScsiResult(
                rsp.status, task.data_in(rsp), b"", rsp.residual, rsp.overflow, rsp.underflow
            )
        else:
            task.result = ScsiResult(
                rsp.status, bytes(task.buf), rsp.sense, rsp.residual, rsp.overflow, rsp.underflow
            )
        del tasks[task.itt]
        return task

    def window_open(self) -> bool:
        """True while the target's command window (MaxCmdSN, RFC 7143 §4.2.2.1) admits
        another command."""
        return self.maxcmdsn is None or not sn_gt(self.cmdsn, self.maxcmdsn)

    def _number(self, key: str, default: int) -> int:
        value = self.params.get(key, "")
        return int(value) if value.isdigit() else default

    def _send_data(
        self, itt: int, lun: bytes, data: memoryview, offset: int, length: int, ttt: int
    ) -> int:
        mrdsl = self._number("MaxRecvDataSegmentLength", 8192)
        end = offset + length
        datasn = 0
        while offset < end:
            n = min(mrdsl, end - offset)
            self.send_pdu(
                P.DataOut(
                    itt=itt,
                    lun=lun,
                    ttt=ttt,
                    final=offset + n >= end,
                    expstatsn=self.expstatsn,
                    datasn=datasn,
                    buffer_offset=offset,
                    data=data[offset : offset + n],
                )
            )
            offset += n
            datasn += 1
        return offset

    # -- block commands (SBC-3 §5): what replication needs of a destination LUN -----------
    def scsi(
        self, what: str, cdb: bytes, lun: int = 0, data_out: P.Payload = b"", read_length: int = 0
    ) -> bytes:
        """Run ``cdb``; its Data-In on GOOD. A UNIT ATTENTION (power on, capacity or
        LUN map changed: SPC-4 §6.37 lets the initiator just retry) is retried, up to a
        few times; any other status raises :class:`ScsiCommandError`."""
        for _ in range(4):
            result = self.command(cdb, lun=lun, data_out=data_out, read_length=read_length)
            if result.status == GOOD:
                return result.data
            sense = parse_sense(result.sense)  # (0, 0, 0) when there is none
            if result.status != CHECK_CONDITION or sense[0] != UNIT_ATTENTION:
                raise ScsiCommandError(what, result.status, sense)
        raise ScsiCommandError(what, result.status, sense)

    def read_capacity16(self, lun: int = 0) -> tuple[int, int]:
        """(number of blocks, block size) from READ CAPACITY(16) (SBC-3 §5.16)."""
        cdb = bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2)
        data = self.scsi("READ CAPACITY(16)", cdb, lun, read_length=32)
        if len(data) < 12:
            raise InitiatorError(f"READ CAPACITY(16) returned {len(data)} bytes")
        last_lba = int.from_bytes(data[0:8], "big")  # RETURNED LOGICAL BLOCK ADDRESS
        block_size = int.from_bytes(data[8:12], "big")  # LOGICAL BLOCK LENGTH IN BYTES
        return last_lba + 1, block_size

    def read16(self, lba: int, blocks: int, block_size: int, lun: int = 0) -> bytes:
        """READ(16) (SBC-3 §5.11) of ``blocks`` blocks from ``lba``."""
        cdb = cdb16(0x88, 0, lba, blocks)
        data = self.scsi("READ(16)", cdb, lun, read_length=blocks * block_size)
        if len(data) != blocks * block_size:
            raise InitiatorError(f"READ(16) returned {len(data)} of {blocks * block_size} bytes")
        return data

    def write16(self, lba: int, data: P.Payload, block_size: int, lun: int = 0) -> None:
        """WRITE(16) (SBC-3 §5.35) of whole blocks at ``lba`` (``data`` is not copied)."""
        size = memoryview(data).nbytes
        if not size or size % block_size:
            raise ValueError(f"WRITE(16) of {size} bytes: not whole {block_size}-byte blocks")
        self.scsi("WRITE(16)", cdb16(0x8A, 0, lba, size // block_size), lun, data)

    def write_same16(
        self, lba: int, blocks: int, block_size: int, lun: int = 0, unmap: bool = False
    ) -> None:
        """WRITE SAME(16) (SBC-3 §5.42) of a zero block; with ``unmap`` the device
        server may deallocate the range instead (it then reads as zeros)."""
        flags = 0x08 if unmap else 0  # byte 1 bit 3: UNMAP
        self.scsi("WRITE SAME(16)", cdb16(0x93, flags, lba, blocks), lun, bytes(block_size))

    def synchronize_cache16(self, lun: int = 0) -> None:
        """SYNCHRONIZE CACHE(16) (SBC-3 §5.23) of the whole medium (LBA 0, 0 blocks)."""
        self.scsi("SYNCHRONIZE CACHE(16)", cdb16(0x91, 0, 0, 0), lun)

    def nop(self, data: bytes = b"") -> bytes:
        itt = self.next_itt()
        self.send_pdu(
            P.NopOut(itt=itt, immediate=True, cmdsn=self.cmdsn, expstatsn=self.expstatsn, data=data)
        )
        rsp = self.recv_pdu()
        if not isinstance(rsp, P.NopIn) or rsp.itt != itt:
            raise InitiatorError(f"expected NOP-In, got {rsp}")
        return bytes(rsp.data)

    def logout(self, reason: int = 0) -> int:
        self.send_pdu(
            P.LogoutRequest(
                itt=self.next_itt(),
                reason=reason,
                immediate=True,
                cmdsn=self.cmdsn,
                expstatsn=self.expstatsn,
            )
        )
        rsp = self.recv_pdu()
        if not isinstance(rsp, P.LogoutResponse):
            raise InitiatorError(f"expected Logout Response, got {rsp}")
        self.close()
        return rsp.response


def cdb16(opcode: int, flags: int, lba: int, blocks: int) -> bytes:
    """A 16-byte block CDB (SBC-3 §5.11 layout): opcode, flags, LBA, length, group, control."""
    return (
        bytes([opcode, flags])  # OPERATION CODE; byte 1 flags (FUA, UNMAP, ...)
        + lba.to_bytes(8, "big")  # LOGICAL BLOCK ADDRESS
        + blocks.to_bytes(4, "big")  # TRANSFER LENGTH / NUMBER OF LOGICAL BLOCKS
        + bytes(2)  # GROUP NUMBER, CONTROL
    )

"""The full-feature-phase connection machine, driven with bytes (no sockets)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.connection import HANDLERS, Phase, TargetConnection
from iscsi_vmtarget.iscsi.events import (
    ConnectionClosing,
    ExecuteCommand,
    LoginComplete,
    ResetRequested,
)
from iscsi_vmtarget.iscsi.framing import PduReader, encode_pdu
from iscsi_vmtarget.iscsi.params import SessionParams
from iscsi_vmtarget.scsi.task import ScsiResponse, Status
from iscsi_vmtarget.server.fabric import refusal_sense

PARAMS = SessionParams(
    max_recv_data_segment_length=8192,
    target_max_recv_data_segment_length=65536,
    max_burst_length=65536,
    first_burst_length=16384,
    initial_r2t=False,
    immediate_data=True,
    max_outstanding_r2t=2,
    initiator_name="iqn.test:i",
    target_name="iqn.test:t",
)


class FakeLogin:
    """Completes login on the first request with fixed parameters."""

    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.done = False
        self.failed = False
        self.result = None

    def receive(self, req: P.LoginRequest) -> P.LoginResponse:
        self.done = True
        self.result = SimpleNamespace(
            params=self.params,
            target=SimpleNamespace(name="iqn.test:t", tpgt=1),
            isid=req.isid,
            tsih=1,
            cid=req.cid,
            reinstated_tsih=None,
            exp_cmdsn=req.cmdsn,
            statsn=100,
        )
        return P.LoginResponse(
            itt=req.itt,
            transit=True,
            csg=1,
            nsg=3,
            tsih=1,
            statsn=100,
            expcmdsn=req.cmdsn,
            maxcmdsn=req.cmdsn,
        )


def wire(*pdus: P.Pdu, hd: bool = False, dd: bool = False) -> bytes:
    return b"".join(bytes(b) for p in pdus for b in encode_pdu(p, hd, dd))


class Harness:
    def __init__(self, params: SessionParams = PARAMS) -> None:
        self.conn = TargetConnection(
            FakeLogin(params), decode_lun=lambda raw: raw[1], refusal_sense=refusal_sense
        )
        self.reader = PduReader(max_data_length=1 << 20)
        self.send(P.LoginRequest(itt=1, transit=True, csg=1, nsg=3, cmdsn=10))
        assert isinstance(self.conn.next_event(), LoginComplete)
        assert isinstance(self.recv()[0], P.LoginResponse)
        self.reader.header_digest = params.header_digest
        self.reader.data_digest = params.data_digest

    def send(self, *pdus: P.Pdu) -> None:
        p = self.conn.result.params if self.conn.result else SessionParams()
        self.conn.receive_data(wire(*pdus, hd=p.header_digest, dd=p.data_digest))

    def recv(self) -> list[P.Pdu]:
        for b in self.conn.data_to_send():
            self.reader.feed(b)
        out = []
        while (raw := self.reader.next_pdu()) is not None:
            out.append(raw.decode())
        return out

    def events(self) -> list[object]:
        out = []
        while (e := self.conn.next_event()) is not None:
            out.append(e)
        return out


def read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\x00" + blocks.to_bytes(2, "big") + b"\x00"


def test_read_data_is_split_and_status_collapsed() -> None:
    h = Harness()
    h.send(P.ScsiCommand(itt=5, read=True, expected_length=20000, cmdsn=10, cdb=read10(0, 40)))
    (ev,) = h.events()
    assert isinstance(ev, ExecuteCommand) and ev.task.itt == 5
    h.conn.command_completed(ev.task, ScsiResponse(data_in=bytes(range(256)) * 79))  # 20224
    pdus = h.recv()
    assert all(isinstance(p, P.DataIn) for p in pdus)
    assert [len(p.data) for p in pdus] == [8192, 8192, 3616]
    assert [p.datasn for p in pdus] == [0, 1, 2]
    assert [p.buffer_offset for p in pdus] == [0, 8192, 16384]
    last = pdus[-1]
    assert last.status_present and last.final and last.status == 0
    assert last.overflow and last.residual == 224
    assert last.statsn == 100 and last.expcmdsn == 11
    assert not pdus[0].status_present


def test_check_condition_goes_in_a_scsi_response_with_sense() -> None:
    h = Harness()
    h.send(P.ScsiCommand(itt=6, read=True, expected_length=512, cmdsn=10, cdb=read10(0, 1)))
    (ev,) = h.events()
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
    h.conn.command_completed(ev.task, ScsiResponse(Status.CHECK_CONDITION, sense=sense))
    (rsp,) = h.recv()
    assert isinstance(rsp, P.ScsiResponsePdu)
    assert rsp.status == 2 and rsp.sense == sense
    assert rsp.underflow and rsp.residual == 512


def test_write_with_immediate_unsolicited_and_r2t_data() -> None:
    h = Harness()
    payload = bytes(i % 251 for i in range(100_000))
    h.send(
        P.ScsiCommand(
            itt=7,
            write=True,
            expected_length=len(payload),
            cmdsn=10,
            cdb=b"\x2a" + bytes(9),
            data=payload[:4096],
        )
    )
    # Unsolicited Data-Out up to FirstBurstLength (16384).
    h.send(
        P.DataOut(itt=7, buffer_offset=4096, datasn=0, data=payload[4096:12288]),
        P.DataOut(itt=7, buffer_offset=12288, datasn=1, final=True, data=payload[12288:16384]),
    )
    r2ts = h.recv()
    assert [type(p) for p in r2ts] == [P.R2T, P.R2T]  # MaxOutstandingR2T = 2
    assert [(r.buffer_offset, r.desired_length, r.r2tsn) for r in r2ts] == [
        (16384, 65536, 0),
        (81920, 18080, 1),
    ]
    assert h.events() == []
    for r in r2ts:
        off, end, sn = r.buffer_offset, r.buffer_offset + r.desired_length, 0
        while off < end:
            n = min(8192, end - off)
            h.send(
                P.DataOut(
                    itt=7,
                    ttt=r.ttt,
                    buffer_offset=off,
                    datasn=sn,
                    final=off + n == end,
                    data=payload[off : off + n],
                )
            )
            off, sn = off + n, sn + 1
    (ev,) = h.events()
    assert isinstance(ev, ExecuteCommand)
    assert bytes(ev.task.buffer) == payload


def test_write_with_all_its_data_immediate_needs_no_r2t_and_no_copy() -> None:
    h = Harness()
    payload = bytes(i % 253 for i in range(4096))
    h.send(
        P.ScsiCommand(
            itt=8, write=True, expected_length=4096, cmdsn=10, cdb=b"\x2a" + bytes(9),
            data=payload,
        )
    )  # fmt: skip
    (ev,) = h.events()
    assert isinstance(ev, ExecuteCommand) and bytes(ev.task.buffer) == payload
    assert h.recv() == []  # no R2T: every byte is there
    # A Data-Out for data that already arrived in full is a protocol error (Reject),
    # and it must not touch the buffer the SCSI layer is writing from.
    h.send(P.DataOut(itt=8, buffer_offset=0, datasn=0, final=True, data=bytes(4096)))
    (rej,) = h.recv()
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.PROTOCOL_ERROR
    assert bytes(ev.task.buffer) == payload
    h.conn.command_completed(ev.task, ScsiResponse(data_out_length=4096))
    (rsp,) = h.recv()
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0 and rsp.itt == 8
    assert not rsp.underflow and not rsp.overflow and rsp.expdatasn == 0


def test_a_read_that_fits_one_pdu_ends_in_one_data_in() -> None:
    h = Harness()
    h.send(P.ScsiCommand(itt=9, read=True, expected_length=8192, cmdsn=10, cdb=read10(0, 16)))
    (ev,) = h.events()
    h.conn.command_completed(ev.task, ScsiResponse(data_in=bytearray(b"\x5a" * 4096)))
    (din,) = h.recv()
    assert isinstance(din, P.DataIn) and din.status_present and din.final
    assert din.data == b"\x5a" * 4096 and din.buffer_offset == 0 and din.datasn == 0
    assert din.underflow and din.residual == 4096 and din.statsn == 100
    assert din.ttt == P.RESERVED_TAG and din.lun == bytes(8)


def test_datasn_out_of_order_ends_the_task_with_check_condition() -> None:
    h = Harness(replace(PARAMS, immediate_data=False, initial_r2t=True))
    h.send(P.ScsiCommand(itt=8, write=True, expected_length=1024, cmdsn=10, cdb=b"\x2a" + bytes(9)))
    (r2t,) = h.recv()
    h.send(P.DataOut(itt=8, ttt=r2t.ttt, buffer_offset=0, datasn=1, data=bytes(512)))
    (rsp,) = h.recv()
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.itt == 8 and rsp.status == 2
    assert rsp.sense[2] & 0x0F == 0x0B and rsp.sense[12:14] == b"\x4b\x00"
    assert h.events() == [] and 8 not in h.conn.tasks
    # The task's late Data-Out is dropped; the connection goes on.
    h.send(P.DataOut(itt=8, ttt=r2t.ttt, buffer_offset=512, datasn=1, data=bytes(512)))
    assert h.recv() == []
    assert h.conn.phase is Phase.FULL_FEATURE


def test_cmdsn_ordering_holds_later_commands_back() -> None:
    h = Harness()
    h.send(P.ScsiCommand(itt=21, read=True, expected_length=512, cmdsn=12, cdb=read10(0, 1)))
    h.send(P.ScsiCommand(itt=22, read=True, expected_length=512, cmdsn=11, cdb=read10(0, 1)))
    assert h.events() == []
    h.send(P.ScsiCommand(itt=20, read=True, expected_length=512, cmdsn=10, cdb=read10(0, 1)))
    assert [e.task.itt for e in h.events()] == [20, 22, 21]
    assert h.conn.expcmdsn == 13


@pytest.mark.parametrize("cmdsn", [9, 10 + 128, 0x80000000])
def test_cmdsn_outside_window_is_silently_dropped(cmdsn: int) -> None:
    h = Harness()
    h.send(P.ScsiCommand(itt=30, read=True, expected_length=512, cmdsn=cmdsn, cdb=read10(0, 1)))
    assert h.events() == [] and h.recv() == []
    assert h.conn.expcmdsn == 10


def test_nop_out_ping_is_echoed_and_target_ping_is_answered() -> None:
    h = Harness()
    h.send(P.NopOut(itt=40, immediate=True, cmdsn=10, data=b"ping"))
    (nop,) = h.recv()
    assert isinstance(nop, P.NopIn) and nop.itt == 40 and bytes(nop.data) == b"ping"
    assert nop.ttt == P.RESERVED_TAG
    h.conn.ping()
    (ping,) = h.recv()
    assert ping.itt == P.RESERVED_TAG and ping.ttt != P.RESERVED_TAG
    assert h.conn.ping_outstanding
    h.send(P.NopOut(itt=P.RESERVED_TAG, ttt=ping.ttt, immediate=True, cmdsn=10))
    assert not h.conn.ping_outstanding and h.recv() == []


def test_unknown_opcode_gets_reject_and_session_goes_on() -> None:
    h = Harness()
    bogus = bytearray(P.NopOut(itt=1).encode_bhs())
    bogus[0] = 0x1C
    h.conn.receive_data(bytes(bogus))
    (rej,) = h.recv()
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.COMMAND_NOT_SUPPORTED
    assert bytes(rej.data) == bytes(bogus)
    h.send(P.NopOut(itt=41, immediate=True, cmdsn=10))
    assert isinstance(h.recv()[0], P.NopIn)


def test_abort_task_and_lun_reset() -> None:
    h = Harness(replace(PARAMS, immediate_data=False, initial_r2t=True))
    h.send(
        P.ScsiCommand(itt=50, write=True, expected_length=4096, cmdsn=10, cdb=b"\x2a" + bytes(9))
    )
    h.recv()
    h.send(
        P.TaskMgmtRequest(
            itt=51, function=1, referenced_task_tag=50, refcmdsn=10, cmdsn=11, immediate=True
        )
    )
    (rsp,) = h.recv()
    assert isinstance(rsp, P.TaskMgmtResponse) and rsp.response == 0
    assert 50 not in h.conn.tasks
    h.send(P.TaskMgmtRequest(itt=52, function=5, lun=bytes(8), cmdsn=11, immediate=True))
    (ev,) = h.events()
    assert isinstance(ev, ResetRequested) and ev.function == 5 and ev.lun == 0
    h.conn.task_management_completed(ev.itt, 0)
    assert h.recv()[0].itt == 52


def test_logout_closes_after_response() -> None:
    h = Harness()
    h.send(P.LogoutRequest(itt=60, reason=0, cmdsn=10, immediate=True))
    (rsp,) = h.recv()
    assert isinstance(rsp, P.LogoutResponse) and rsp.response == 0
    assert isinstance(h.events()[0], ConnectionClosing)


def test_text_sendtargets_is_split_to_the_initiators_segment_length() -> None:
    h = Harness(replace(PARAMS, max_recv_data_segment_length=512))
    pairs = [("TargetName", f"iqn.test:t{i:03d}") for i in range(100)]
    h.conn._send_targets = lambda value, target: pairs
    h.send(P.TextRequest(itt=70, cmdsn=10, data=b"SendTargets=All\x00"))
    text = b""
    while True:
        (rsp,) = h.recv()
        assert isinstance(rsp, P.TextResponse) and len(rsp.data) <= 512
        text += bytes(rsp.data)
        if rsp.final:
            break
        h.send(P.TextRequest(itt=70, ttt=rsp.ttt, cmdsn=11, immediate=True))
    assert text.count(b"TargetName=") == 100


def test_digests_in_full_feature_phase() -> None:
    h = Harness(replace(PARAMS, header_digest=True, data_digest=True))
    h.send(P.NopOut(itt=80, immediate=True, cmdsn=10, data=b"abc"))
    (nop,) = h.recv()
    assert bytes(nop.data) == b"abc"
    # A corrupted data digest on a NOP-Out gets a Data-Digest-Error Reject.
    raw = bytearray(
        wire(P.NopOut(itt=81, immediate=True, cmdsn=10, data=b"abcd"), hd=True, dd=True)
    )
    raw[-1] ^= 0xFF
    h.conn.receive_data(bytes(raw))
    (rej,) = h.recv()
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.DATA_DIGEST_ERROR


_FFP_OPCODES = [int(o) for o in P.Opcode if o < 0x20]


@given(
    opcode=st.sampled_from(_FFP_OPCODES),
    immediate=st.booleans(),
    body=st.binary(min_size=40, max_size=40),
    data=st.binary(max_size=64),
)
@settings(max_examples=300, deadline=None)
def test_every_initiator_opcode_in_full_feature_phase_is_handled(
    opcode: int, immediate: bool, body: bytes, data: bytes
) -> None:
    """Every (phase, opcode) pair either has a row or gets a Reject; nothing raises."""
    h = Harness()
    bhs = bytearray(bytes([opcode | (0x40 if immediate else 0)]) + body[:3] + bytes(4) + body[3:40])
    bhs[5:8] = len(data).to_bytes(3, "big")
    bhs[4] = 0
    h.conn.receive_data(bytes(bhs) + data + bytes(-len(data) & 3))
    h.recv()
    assert (Phase.FULL_FEATURE, opcode) in HANDLERS or opcode == P.Opcode.LOGIN_REQUEST


def test_login_phase_rejects_other_opcodes_by_closing() -> None:
    conn = TargetConnection(
        FakeLogin(PARAMS), decode_lun=lambda raw: 0, refusal_sense=refusal_sense
    )
    conn.receive_data(wire(P.NopOut(itt=1, immediate=True)))
    assert conn.phase is Phase.CLOSED
    assert isinstance(conn.next_event(), ConnectionClosing)


def test_aborting_a_held_back_command_keeps_the_cmdsn_sequence() -> None:
    h = Harness()
    h.send(P.ScsiCommand(itt=90, read=True, expected_length=512, cmdsn=11, cdb=read10(0, 1)))
    h.send(
        P.TaskMgmtRequest(
            itt=91, function=1, referenced_task_tag=90, refcmdsn=11, cmdsn=10, immediate=True
        )
    )
    (rsp,) = h.recv()
    assert isinstance(rsp, P.TaskMgmtResponse) and rsp.response == 0
    h.send(P.ScsiCommand(itt=92, read=True, expected_length=512, cmdsn=10, cdb=read10(0, 1)))
    assert [e.task.itt for e in h.events()] == [92]  # the aborted one never runs
    assert h.conn.expcmdsn == 12
    h.send(P.ScsiCommand(itt=93, read=True, expected_length=512, cmdsn=12, cdb=read10(0, 1)))
    assert [e.task.itt for e in h.events()] == [93]


def test_write_buffers_are_accounted_as_tasks_come_and_go() -> None:
    h = Harness(replace(PARAMS, immediate_data=False, initial_r2t=True))
    h.send(
        P.ScsiCommand(itt=94, write=True, expected_length=4096, cmdsn=10, cdb=b"\x2a" + bytes(9))
    )
    assert h.conn._buffered == 4096
    h.send(P.TaskMgmtRequest(itt=95, function=2, cmdsn=11, immediate=True))
    assert h.conn._buffered == 0 and not h.conn.tasks

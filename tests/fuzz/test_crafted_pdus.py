"""Crafted PDUs (scapy layer) over TCP against a running target.

Each attack asserts its exact outcome - a Reject reason, a login status class/detail,
a SCSI status and sense, silence, or a closed connection - and afterwards that the
target process is alive, its RSS bounded, and a well-behaved session running in a
thread the whole time (writes and read-back verification) keeps making progress with
no error. One test also runs libiscsi's iscsi-perf through the whole attack list.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator, InitiatorError
from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.testing import scapy_iscsi as S
from iscsi_vmtarget.testing.process import alive, rss_bytes
from tests.conftest import INITIATOR, RunningTarget, need_tool, start_target

DEMO = "iqn.2026-11.org.iscsi-vmtarget:demo"
RSS_LIMIT = 450 << 20  # one connection may hold 128 MiB of write buffers (TASK SET FULL)
READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])
WRITE10_8 = bytes([0x2A, 0, 0, 0, 0, 0x40, 0, 0, 8, 0])  # lba 64, 8 blocks
BASE_TEXT = b"InitiatorName=" + INITIATOR.encode() + b"-raw\0SessionType=Normal\0"
BASE_TEXT += b"TargetName=" + DEMO.encode() + b"\0"


class Bystander(threading.Thread):
    """A well-behaved session: write a block, read it back, compare; count the rounds."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.rounds = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            ini = Initiator(port=self.port, initiator_name=INITIATOR + "-bystander",
                            target_name=DEMO, isid=bytes.fromhex("4000013700ff"))  # fmt: skip
            ini.login()
            ini.command(bytes(6))  # eat the POWER ON unit attention
            while not self.stop.is_set():
                lba = 4096 + self.rounds % 256
                block = os.urandom(512)
                cdb = bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0\0\x01\0"
                w = ini.command(cdb, data_out=block)
                r = ini.command(bytes([0x28, 0]) + cdb[2:], read_length=512)
                if w.status or r.status or r.data != block:
                    self.errors.append(f"round {self.rounds}: {w} {r}")
                self.rounds += 1
            ini.logout()
        except Exception as exc:  # any failure is the finding
            self.errors.append(repr(exc))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTarget]:
    t = start_target(tmp_path_factory.mktemp("crafted"))
    yield t
    t.stop()


@pytest.fixture(scope="module")
def bystander(target: RunningTarget) -> Iterator[Bystander]:
    b = Bystander(target.port)
    b.start()
    yield b
    b.stop.set()
    b.join(30)
    assert b.errors == []


@pytest.fixture
def healthy(target: RunningTarget, bystander: Bystander) -> Iterator[None]:
    """After each attack: the target lives, its RSS is bounded, the bystander moves on."""
    before = bystander.rounds
    yield
    deadline = time.monotonic() + 10
    while bystander.rounds < before + 3 and time.monotonic() < deadline and not bystander.errors:
        time.sleep(0.02)
    assert bystander.errors == [] and bystander.rounds >= before + 3
    assert alive(target.proc.pid)
    assert rss_bytes(target.proc.pid) < RSS_LIMIT


_isid = iter(range(1, 1 << 16))


def attacker(t: RunningTarget, **kw: object) -> Initiator:
    ini = Initiator(port=t.port, initiator_name=INITIATOR, target_name=DEMO,
                    isid=bytes.fromhex("40000137") + next(_isid).to_bytes(2, "big"),
                    timeout=5, **kw)  # type: ignore[arg-type]  # fmt: skip
    ini.login()
    ini.command(bytes(6))
    return ini


def send(ini: Initiator, pkt: S.ISCSI, **frame: bool) -> None:
    ini.send_raw(S.frame(pkt, ini._hd, ini._dd, **frame))


def expect_reject(ini: Initiator, reason: P.RejectReason, sent: S.ISCSI) -> None:
    rsp = ini.recv_pdu()
    assert isinstance(rsp, P.Reject), rsp
    assert rsp.reason == reason
    assert bytes(rsp.data) == bytes(sent)[:48]  # §11.17: the rejected PDU's header


def expect_closed(ini: Initiator) -> None:
    with pytest.raises((InitiatorError, OSError)):
        for _ in range(4):
            ini.recv_pdu()


def expect_alive(ini: Initiator) -> None:
    """The connection still works (and nothing was queued before this ping's answer)."""
    assert ini.nop(b"still here") == b"still here"


def cmd(ini: Initiator, **kw: object) -> S.ScsiCommand:
    pkt = S.ScsiCommand(cmdsn=ini.cmdsn, itt=ini.next_itt(), **kw)
    ini.cmdsn += 1
    return pkt


# -- framing and opcodes --------------------------------------------------------------------
def test_unknown_opcodes_are_rejected_command_not_supported(
    target: RunningTarget, healthy: None
) -> None:
    ini = attacker(target)
    for opcode in (0x07, 0x1C, 0x1D, 0x1E, 0x0F):
        pkt = S.ISCSI(opcode=opcode, immediate=1, itt=0x77)
        send(ini, pkt)
        expect_reject(ini, P.RejectReason.COMMAND_NOT_SUPPORTED, pkt)
    expect_alive(ini)


def test_target_opcodes_from_the_initiator_are_protocol_errors(
    target: RunningTarget, healthy: None
) -> None:
    ini = attacker(target)
    for pkt in (S.ScsiResponse(itt=5), S.R2T(itt=5), S.NopIn(itt=5), S.Reject(), S.DataIn()):
        send(ini, pkt)
        expect_reject(ini, P.RejectReason.PROTOCOL_ERROR, pkt)
    expect_alive(ini)


def test_ahs_garbage_is_rejected_invalid_pdu_field(target: RunningTarget, healthy: None) -> None:
    ini = attacker(target)
    unknown_type = cmd(ini, read=1, expected_length=512, cdb=READ10 + bytes(6),
                       ahs=b"\x00\x05\x7f\x00" + bytes(4))  # fmt: skip
    send(ini, unknown_type)
    expect_reject(ini, P.RejectReason.INVALID_PDU_FIELD, unknown_type)
    past_end = cmd(ini, read=1, expected_length=512, cdb=READ10 + bytes(6),
                   ahs=b"\x00\x40\x01\x00" + bytes(4))  # fmt: skip
    send(ini, past_end)
    expect_reject(ini, P.RejectReason.INVALID_PDU_FIELD, past_end)
    # An AHS on a PDU that has none defined is skipped by its declared length.
    nop = S.NopOut(itt=0x55, immediate=1, ahs=os.urandom(64), data=b"x")
    send(ini, nop)
    rsp = ini.recv_pdu()
    assert isinstance(rsp, P.NopIn) and rsp.itt == 0x55 and bytes(rsp.data) == b"x"


def test_data_segment_longer_than_max_recv_closes_only_that_connection(
    target: RunningTarget, healthy: None
) -> None:
    ini = attacker(target)
    # We declared 262144 as the target's MaxRecvDataSegmentLength default.
    limit = int(ini.params.get("MaxRecvDataSegmentLength", "262144"))
    send(ini, S.NopOut(itt=1, immediate=1, data_segment_length=limit + 4, data=bytes(64)))
    expect_closed(ini)


def test_wrong_data_segment_length_on_a_short_stream_then_hang_up(
    target: RunningTarget, healthy: None
) -> None:
    ini = attacker(target)
    send(ini, S.NopOut(itt=1, immediate=1, data_segment_length=4000, data=b"short"))
    ini.close()  # the target holds a partial PDU, then sees EOF


def test_bad_header_digest_closes_bad_data_digest_rejects(
    target: RunningTarget, healthy: None
) -> None:
    ini = attacker(target, header_digest=True, data_digest=True)
    pkt = S.NopOut(itt=3, immediate=1, data=b"payload")
    send(ini, pkt, corrupt_data_digest=True)
    expect_reject(ini, P.RejectReason.DATA_DIGEST_ERROR, pkt)
    expect_alive(ini)
    send(ini, S.NopOut(itt=4, immediate=1), corrupt_header_digest=True)
    expect_closed(ini)


# -- sequencing -----------------------------------------------------------------------------
def test_cmdsn_outside_the_window_is_silently_dropped(target: RunningTarget, healthy: None) -> None:
    ini = attacker(target)
    for far in (ini.cmdsn + 5000, ini.cmdsn - 10, ini.cmdsn + (1 << 31)):
        send(ini, S.NopOut(itt=0x100, cmdsn=far & 0xFFFFFFFF, data=b"x"))
        send(ini, S.ScsiCommand(itt=0x101, cmdsn=far & 0xFFFFFFFF, read=1,
                                expected_length=512, cdb=READ10 + bytes(6)))  # fmt: skip
    expect_alive(ini)  # the first answer is the ping's: the others were dropped (§4.2.2.1)
    rsp = ini.command(READ10, read_length=512)
    assert rsp.status == 0


def test_login_pdus_in_full_feature_phase_are_rejected(
    target: RunningTarget, healthy: None
) -> None:
    ini = attacker(target)
    pkt = S.LoginRequest(itt=9, transit=1, csg=1, nsg=3, data=BASE_TEXT)
    send(ini, pkt)
    expect_reject(ini, P.RejectReason.PROTOCOL_ERROR, pkt)
    expect_alive(ini)


def test_snack_at_error_recovery_level_0_is_rejected(target: RunningTarget, healthy: None) -> None:
    ini = attacker(target)
    pkt = S.SnackRequest(itt=0x10, snack_type=1, begrun=0, runlength=1)
    send(ini, pkt)
    expect_reject(ini, P.RejectReason.SNACK_REJECT, pkt)
    expect_alive(ini)


# -- negotiation garbage --------------------------------------------------------------------
def raw_login(t: RunningTarget, data: bytes, **fields: int) -> tuple[int, int] | str:
    ini = Initiator(port=t.port, target_name=DEMO, timeout=5).connect()
    pdu = dict(itt=1, transit=1, csg=0, nsg=1, cmdsn=1)
    pdu.update(fields)
    ini.send_raw(bytes(S.LoginRequest(**pdu, data=data)))  # type: ignore[arg-type]
    try:
        rsp = ini.recv_pdu()
    except (InitiatorError, OSError):
        return "closed"
    assert isinstance(rsp, P.LoginResponse)
    if rsp.status_class:
        expect_closed(ini)  # §6.3: a login failure response ends the connection
    ini.close()
    return (rsp.status_class, rsp.status_detail)


@pytest.mark.parametrize(
    "data,fields,status",
    [
        (BASE_TEXT + b"garbage\0", {}, (2, 0)),  # no '='
        (BASE_TEXT + b"\xff\xfe=1\0", {}, (2, 0)),  # key not UTF-8 / bad characters
        (BASE_TEXT + b"AuthMethod=None\0" * 2, {}, (2, 0)),  # a key twice (§6.1)
        (BASE_TEXT + b"K" * 100 + b"=1\0", {}, (2, 0)),  # key over 63 bytes (§6.1)
        (BASE_TEXT + b"X-a=" + b"v" * 5000 + b"\0", {}, (2, 0)),  # value over 255 bytes
        (BASE_TEXT + b"AuthMethod=None", {}, (2, 0)),  # no terminating NUL
        (b"SessionType=Normal\0", {}, (2, 7)),  # no InitiatorName: missing parameter
        (b"", {}, (2, 7)),
        (BASE_TEXT + b"AuthMethod=Foo\0", {}, (2, 1)),  # no acceptable method
        (BASE_TEXT + b"AuthMethod=None\0", {"version_min": 1, "version_max": 1}, (2, 5)),
        (BASE_TEXT + b"A" * 9000, {}, "closed"),  # one PDU over 8192 bytes (§13.12)
    ],
)
def test_negotiation_garbage_gets_exact_login_status(
    target: RunningTarget,
    healthy: None,
    data: bytes,
    fields: dict[str, int],
    status: tuple[int, int] | str,
) -> None:
    assert raw_login(target, data, **fields) == status


def test_bad_values_are_answered_reject_and_login_goes_on(
    target: RunningTarget, healthy: None
) -> None:
    ini = Initiator(port=target.port, target_name=DEMO, timeout=5).connect()
    text = BASE_TEXT + b"AuthMethod=None\0HeaderDigest=MD5\0MaxRecvDataSegmentLength=0\0"
    ini.send_raw(bytes(S.LoginRequest(itt=1, transit=1, csg=0, nsg=1, cmdsn=1, data=text)))
    rsp = ini.recv_pdu()
    assert isinstance(rsp, P.LoginResponse) and rsp.status_class == 0
    assert b"HeaderDigest=Reject\0" in bytes(rsp.data)
    assert b"MaxRecvDataSegmentLength=Reject\0" in bytes(rsp.data)
    ini.close()


def test_login_text_over_the_cap_across_continuations_fails(
    target: RunningTarget, healthy: None
) -> None:
    ini = Initiator(port=target.port, target_name=DEMO, timeout=5).connect()
    piece = b"X-com.example.k=" + b"v" * 8000
    for _ in range(9):  # 9 x 8016 bytes > the 65536-byte cap on one request's text
        ini.send_raw(bytes(S.LoginRequest(itt=1, cont=1, csg=0, nsg=1, cmdsn=1, data=piece)))
        rsp = ini.recv_pdu()
        assert isinstance(rsp, P.LoginResponse)
        if rsp.status_class:
            break
    assert (rsp.status_class, rsp.status_detail) == (2, 0)
    expect_closed(ini)


# -- text in full feature phase ---------------------------------------------------------------
def test_huge_and_repeated_text_keys(target: RunningTarget, healthy: None) -> None:
    ini = attacker(target)
    repeated = b"SendTargets=\0" * 500  # 6500 bytes, one PDU
    pkt = S.TextRequest(itt=0x20, cmdsn=ini.cmdsn, data=repeated)
    ini.cmdsn += 1
    send(ini, pkt)
    expect_reject(ini, P.RejectReason.PROTOCOL_ERROR, pkt)  # a key twice (§6.1)
    # A key of 8000 bytes (the limit is 63, §6.1): refused the same way.
    pkt = S.TextRequest(itt=0x22, cmdsn=ini.cmdsn, data=b"K" * 8000 + b"=1\0")
    ini.cmdsn += 1
    send(ini, pkt)
    expect_reject(ini, P.RejectReason.PROTOCOL_ERROR, pkt)
    # More than max_text_response (64 KiB) of request text across C=1 PDUs: Reject.
    ttt = 0xFFFFFFFF
    for i in range(10):
        pkt = S.TextRequest(itt=0x21, final=0, cont=1, ttt=ttt, cmdsn=ini.cmdsn,
                            data=b"X-big=" + b"v" * 8000)  # fmt: skip
        ini.cmdsn += 1
        send(ini, pkt)
        rsp = ini.recv_pdu()
        if isinstance(rsp, P.Reject):
            assert rsp.reason == P.RejectReason.PROTOCOL_ERROR and i == 8
            break
        assert isinstance(rsp, P.TextResponse) and not rsp.final
        ttt = rsp.ttt
    else:
        pytest.fail("no Reject for 80 KB of request text")
    expect_alive(ini)


def test_text_request_with_continue_and_no_data(target: RunningTarget, healthy: None) -> None:
    ini = attacker(target)
    first = S.TextRequest(itt=0x30, final=0, cont=1, cmdsn=ini.cmdsn, data=b"")
    ini.cmdsn += 1
    send(ini, first)
    ack = ini.recv_pdu()
    # §11.10.2: an empty response with a Target Transfer Tag asks for the rest.
    assert isinstance(ack, P.TextResponse) and not ack.final and not ack.data
    assert ack.ttt != P.RESERVED_TAG
    rest = S.TextRequest(itt=0x30, ttt=ack.ttt, cmdsn=ini.cmdsn, data=b"SendTargets=\0")
    ini.cmdsn += 1
    send(ini, rest)
    rsp = ini.recv_pdu()
    assert isinstance(rsp, P.TextResponse) and rsp.final
    assert bytes(rsp.data).startswith(b"TargetName=" + DEMO.encode())
    expect_alive(ini)


# -- data transfer ------------------------------------------------------------------------------
def test_data_out_for_unknown_tasks_is_dropped(target: RunningTarget, healthy: None) -> None:
    ini = attacker(target)
    for itt, ttt in ((0xDEAD, 0xFFFFFFFF), (0xBEEF, 0x1234), (0, 0)):
        send(ini, S.DataOut(itt=itt, ttt=ttt, final=1, data=os.urandom(512)))
    expect_alive(ini)


def r2t_session(t: RunningTarget) -> tuple[Initiator, S.ScsiCommand, P.R2T]:
    """A write of 8 blocks with InitialR2T=Yes, ImmediateData=No: wait for its R2T."""
    ini = attacker(t, initial_r2t=True, immediate_data=False)
    pkt = cmd(ini, write=1, expected_length=4096, cdb=WRITE10_8 + bytes(6))
    send(ini, pkt)
    r2t = ini.recv_pdu()
    assert isinstance(r2t, P.R2T) and r2t.itt == pkt.itt
    assert (r2t.buffer_offset, r2t.desired_length) == (0, 4096)
    return ini, pkt, r2t


def test_r2t_sequence_violations(target: RunningTarget, healthy: None) -> None:
    ini, pkt, r2t = r2t_session(target)
    itt = pkt.itt
    wrong_ttt = S.DataOut(itt=itt, ttt=r2t.ttt ^ 0x5555, final=1, data=bytes(4096))
    send(ini, wrong_ttt)
    expect_reject(ini, P.RejectReason.PROTOCOL_ERROR, wrong_ttt)
    outside = S.DataOut(itt=itt, ttt=r2t.ttt, buffer_offset=4096, final=1, data=bytes(512))
    send(ini, outside)
    expect_reject(ini, P.RejectReason.PROTOCOL_ERROR, outside)
    unsolicited = S.DataOut(itt=itt, ttt=0xFFFFFFFF, final=1, data=bytes(512))
    send(ini, unsolicited)  # InitialR2T=Yes: no unsolicited data allowed
    expect_reject(ini, P.RejectReason.PROTOCOL_ERROR, unsolicited)
    # The right data still completes the command.
    send(ini, S.DataOut(itt=itt, ttt=r2t.ttt, final=1, data=b"\x11" * 4096))
    rsp = ini.recv_pdu()
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.itt == itt and rsp.status == 0
    # A DataSN out of order ends that task with DATA PHASE ERROR (ERL 0, §7.1.4).
    ini2, pkt2, r2t2 = r2t_session(target)
    send(ini2, S.DataOut(itt=pkt2.itt, ttt=r2t2.ttt, datasn=3, data=bytes(512)))
    rsp = ini2.recv_pdu()
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.itt == pkt2.itt and rsp.status == 2
    sense = rsp.sense
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (0x0B, 0x4B, 0x00)
    send(ini2, S.DataOut(itt=pkt2.itt, ttt=r2t2.ttt, datasn=1, final=1, data=bytes(3584)))
    expect_alive(ini2)  # its late Data-Out was dropped


def test_write_with_4gib_expected_length_is_refused_without_allocating(
    target: RunningTarget, healthy: None
) -> None:
    ini = attacker(target)
    rss = rss_bytes(target.proc.pid)
    for _ in range(20):
        send(ini, cmd(ini, write=1, expected_length=0xFFFFFFFF, cdb=WRITE10_8 + bytes(6)))
        rsp = ini.recv_pdu()
        assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 2
        assert (rsp.sense[2] & 0x0F, rsp.sense[12], rsp.sense[13]) == (0x05, 0x24, 0x00)
    assert rss_bytes(target.proc.pid) < rss + (64 << 20)


def test_writes_that_never_send_data_hit_task_set_full(
    target: RunningTarget, healthy: None
) -> None:
    ini = attacker(target, initial_r2t=True, immediate_data=False)
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0x40, 0, 0]) + bytes(6)  # 16384 blocks = 8 MiB
    full = 0
    for _ in range(40):
        send(ini, cmd(ini, write=1, expected_length=8 << 20, cdb=cdb))
    deadline = time.monotonic() + 10
    while full < 24 and time.monotonic() < deadline:
        rsp = ini.recv_pdu()
        if isinstance(rsp, P.ScsiResponsePdu):
            assert rsp.status == 0x28  # TASK SET FULL
            full += 1
    assert full == 24  # 16 x 8 MiB fill the 128 MiB budget
    assert rss_bytes(target.proc.pid) < RSS_LIMIT
    ini.close()


def test_reader_that_never_reads_does_not_grow_the_target(
    target: RunningTarget, healthy: None
) -> None:
    ini = attacker(target)
    assert ini.sock is not None
    ini.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ini.sock.settimeout(0.5)
    read8m = bytes([0x28, 0, 0, 0, 0, 0, 0, 0x40, 0, 0]) + bytes(6)  # 16384 blocks = 8 MiB
    sent = 0
    try:
        for _ in range(400):  # 3.2 GB of Data-In asked for, none read
            ini.send_raw(bytes(cmd(ini, read=1, expected_length=8 << 20, cdb=read8m)))
            sent += 1
    except (TimeoutError, OSError):
        pass  # the target stopped reading from us: that is the back-pressure
    time.sleep(1)
    assert rss_bytes(target.proc.pid) < RSS_LIMIT, sent
    ini.close()


# -- everything at once, with iscsi-perf alongside ------------------------------------------------
ATTACKS: list[Callable[[RunningTarget], None]] = []


def test_iscsi_perf_runs_clean_through_the_attacks(target: RunningTarget, healthy: None) -> None:
    perf = subprocess.Popen(
        [need_tool("iscsi-perf"), "-i", INITIATOR + "-perf", "-t", "8", "-m", "8", "-r",
         target.url(DEMO)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    end = time.monotonic() + 6
    rounds = 0
    while time.monotonic() < end:
        test_unknown_opcodes_are_rejected_command_not_supported(target, None)
        test_ahs_garbage_is_rejected_invalid_pdu_field(target, None)
        test_r2t_sequence_violations(target, None)
        test_write_with_4gib_expected_length_is_refused_without_allocating(target, None)
        assert raw_login(target, BASE_TEXT + b"AuthMethod=None\0" * 2) == (2, 0)
        rounds += 1
    out, _ = perf.communicate(timeout=60)
    assert perf.returncode == 0, out
    assert "iops average" in out and "error" not in out.lower(), out
    assert rounds >= 1


def test_log_has_no_tracebacks(target: RunningTarget) -> None:
    log = Path(target.log_path or "").read_text() if target.log_path else ""
    assert "Traceback" not in log, log[-4000:]

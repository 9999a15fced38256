"""Several commands in flight (client/window.py) against a scripted target that answers
them in a shuffled order, interleaving their R2Ts and Data-In: a pull returns exactly
the bytes pushed (short last piece included), an error in the middle of the window
ends the stream naming the failed range, a UNIT ATTENTION or TASK SET FULL is retried,
MaxCmdSN holds."""

from __future__ import annotations

import io
import random

import pytest

from iscsi_vmtarget.client.initiator import Initiator, InitiatorError, ScsiCommandError
from iscsi_vmtarget.client.region_stream import StreamError, pull, push
from iscsi_vmtarget.client.remote import MAX_IO, RemoteLun
from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.framing import encode_pdu
from iscsi_vmtarget.iscsi.serial import sn_add
from iscsi_vmtarget.vm.layers.region_backend import DESCRIPTOR_BYTES

BS = 512
SEGMENT = 64 * 1024  # MaxRecvDataSegmentLength both ways: 16 PDUs per 1 MiB command
MEDIUM_ERROR = (0x3, 0x11, 0x00)
UNIT_ATTENTION = (0x6, 0x29, 0x00)
TASK_SET_FULL = 0x28


def _sense(key: int, asc: int, ascq: int) -> bytes:
    fixed = bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])
    return len(fixed).to_bytes(2, "big") + fixed  # SenseLength + sense (RFC 7143 §11.4.7)


class _Wire:
    def close(self) -> None:
        pass


class ScriptedTarget(Initiator):
    """An Initiator whose peer is this object: a LUN over a bytearray that answers the
    commands in flight in a random order, one PDU at a time."""

    def __init__(self, size: int, *, window: int = 128, seed: int = 7) -> None:
        super().__init__()
        self.params.update(
            ImmediateData="Yes",
            InitialR2T="No",
            FirstBurstLength=str(4 * BS),
            MaxRecvDataSegmentLength=str(SEGMENT),
        )
        self.sock = _Wire()  # type: ignore[assignment]  # the script feeds self.reader
        self.medium = bytearray(size)
        self.window = window
        self.target_maxcmdsn = sn_add(self.cmdsn, window - 1)
        self.maxcmdsn = self.target_maxcmdsn  # as a login response would set it
        self.random = random.Random(seed)
        self.pending: dict[int, dict] = {}  # itt -> the command's state
        self.failures: dict[int, tuple[int, int, int] | int] = {}  # LBA -> sense or status
        self.started: list[int] = []  # LBA of each READ/WRITE(16), in order sent
        self.peak = 0
        self.last_cmdsn = self.cmdsn

    def send_pdu(self, pdu: P.Pdu) -> None:
        if isinstance(pdu, P.ScsiCommand):
            cdb = pdu.cdb
            lba, blocks = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
            got = bytearray(pdu.expected_length if pdu.write else 0)
            got[: len(pdu.data)] = pdu.data
            self.pending[pdu.itt] = dict(
                op=cdb[0], lba=lba, blocks=blocks, got=got, have=len(pdu.data), r2t=False,
                sent=0, cmdsn=pdu.cmdsn,
            )  # fmt: skip
            self.last_cmdsn = pdu.cmdsn
            if cdb[0] in (0x88, 0x8A):
                self.started.append(lba)
            self.peak = max(self.peak, len(self.pending))
        elif isinstance(pdu, P.DataOut):
            task = self.pending[pdu.itt]
            task["got"][pdu.buffer_offset : pdu.buffer_offset + len(pdu.data)] = pdu.data
            task["have"] += len(pdu.data)

    def recv_pdu(self) -> P.Pdu:
        """The initiator's own decoding of the next PDU the script sends."""
        if not self.reader.buffered:
            self.reader.feed(b"".join(encode_pdu(self._answer())))
        return super().recv_pdu()

    def _answer(self) -> P.Pdu:
        if not self.pending:
            raise InitiatorError("connection closed by target (nothing in flight)")
        itt = self.random.choice(list(self.pending))
        task = self.pending[itt]
        op, lba, blocks = task["op"], task["lba"], task["blocks"]
        start, length = lba * BS, blocks * BS
        if op == 0x8A and task["have"] < length:
            if task["r2t"]:  # its Data-Out is not all here yet: another task answers
                return self._answer()
            task["r2t"] = True
            return P.R2T(itt=itt, ttt=itt, buffer_offset=task["have"],
                         desired_length=length - task["have"])  # fmt: skip
        sense = self.failures.pop(lba, None) if op in (0x88, 0x8A) else None
        if op == 0x88 and sense is None and task["sent"] < length:
            n = min(SEGMENT, length - task["sent"])
            at = task["sent"]
            task["sent"] += n
            last = task["sent"] == length
            if last:
                self._end(itt)
            piece = bytes(self.medium[start + at : start + at + n])
            return P.DataIn(itt=itt, buffer_offset=at, data=piece, final=last,
                            status_present=last, maxcmdsn=self.target_maxcmdsn)  # fmt: skip
        data = b""
        if op == 0x8A and sense is None:
            self.medium[start : start + length] = task["got"]
        elif op == 0x9E:  # READ CAPACITY(16)
            last_lba = len(self.medium) // BS - 1
            data = last_lba.to_bytes(8, "big") + BS.to_bytes(4, "big") + bytes(20)
            self._end(itt)
            return P.DataIn(itt=itt, data=data, final=True, status_present=True)
        self._end(itt)
        if isinstance(sense, int):  # a status without sense (BUSY, TASK SET FULL)
            return P.ScsiResponsePdu(itt=itt, status=sense, maxcmdsn=self.target_maxcmdsn)
        if sense is not None:
            return P.ScsiResponsePdu(itt=itt, status=0x02, data=_sense(*sense),
                                     maxcmdsn=self.target_maxcmdsn)  # fmt: skip
        return P.ScsiResponsePdu(itt=itt, status=0, maxcmdsn=self.target_maxcmdsn)

    def _end(self, itt: int) -> None:
        del self.pending[itt]  # a slot of the window is free again
        self.target_maxcmdsn = sn_add(self.last_cmdsn, self.window - len(self.pending))


def lun_of(target: ScriptedTarget) -> RemoteLun:
    return RemoteLun(target, 0, "the state LUN")


def test_pull_returns_exactly_what_was_pushed_whatever_the_completion_order() -> None:
    target = ScriptedTarget(5 * MAX_IO + DESCRIPTOR_BYTES)
    image = random.Random(1).randbytes(3 * MAX_IO + 1234)  # short, unaligned last piece
    assert push(lun_of(target), io.BytesIO(image)) == len(image)
    assert target.peak >= 4  # really several in flight
    target.started.clear()
    out = io.BytesIO()
    assert pull(lun_of(target), out) == len(image)
    assert out.getvalue() == image
    descriptor = 5 * MAX_IO // BS  # read first: it says how long the image is
    assert target.started == [descriptor, 0, MAX_IO // BS, 2 * MAX_IO // BS, 3 * MAX_IO // BS]
    assert not target.pending


def test_a_stream_larger_than_the_region_is_refused_and_the_old_one_kept() -> None:
    target = ScriptedTarget(2 * MAX_IO + DESCRIPTOR_BYTES)
    push(lun_of(target), io.BytesIO(b"old image"))
    with pytest.raises(StreamError, match="larger than the state region's 2097152 bytes"):
        push(lun_of(target), io.BytesIO(bytes(2 * MAX_IO + 1)))
    out = io.BytesIO()
    pull(lun_of(target), out)
    assert out.getvalue() == b"old image"


@pytest.mark.parametrize("verb", ["write", "read"])
def test_an_error_in_the_middle_of_the_window_ends_the_stream(verb: str) -> None:
    target = ScriptedTarget(16 * MAX_IO)
    lun = lun_of(target)
    bad = 3 * MAX_IO // BS
    target.failures[bad] = MEDIUM_ERROR
    with pytest.raises(ScsiCommandError) as caught:
        if verb == "write":
            lun.write_stream(0, [bytes(MAX_IO)] * 16, depth=4)
        else:
            list(lun.read_stream(0, 16 * MAX_IO, depth=4))
    assert f"(16) of the state LUN at LBA {bad} (2048 blocks) failed" in str(caught.value)
    assert caught.value.sense == MEDIUM_ERROR
    assert not target.pending  # the others in flight were waited for: the session is usable
    assert len(target.started) < 16  # nothing past the window was sent
    assert lun.read(0, BS) == bytes(BS)


@pytest.mark.parametrize("answer", [UNIT_ATTENTION, TASK_SET_FULL])
def test_unit_attention_and_task_set_full_are_retried_and_maxcmdsn_is_obeyed(
    answer: tuple[int, int, int] | int,
) -> None:
    target = ScriptedTarget(8 * MAX_IO, window=3)
    lun = lun_of(target)
    target.failures[2 * MAX_IO // BS] = answer
    data = random.Random(2).randbytes(8 * MAX_IO)
    view = memoryview(data)
    lun.write_stream(0, [view[i : i + MAX_IO] for i in range(0, len(data), MAX_IO)])
    assert target.peak == 3  # the target's window, not DEPTH
    assert target.started.count(2 * MAX_IO // BS) == 2
    assert b"".join(lun.read_stream(0, len(data))) == data

"""Generated and mutated PDUs against the sans-I/O core (real login, connection, SCSI).

Whatever arrives, nothing escapes ``receive_data``; the target answers only with what
the phase allows (login responses, then Reject or ordinary responses to what was
asked), a failed login is followed by a close, and what the connection holds (framing
buffer, tasks, write buffers, out-of-order PDUs, text) stays within fixed bounds.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.connection import Phase
from iscsi_vmtarget.testing import pdu_strategies as S
from iscsi_vmtarget.testing.core import CoreHarness, wire

# ISCSI_FUZZ_EXAMPLES scales a run up (tools/fuzz-decoder --core uses it too).
FUZZ = settings(
    max_examples=int(os.environ.get("ISCSI_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FULL_FEATURE_REPLIES = (
    P.Reject,
    P.NopIn,
    P.ScsiResponsePdu,
    P.DataIn,
    P.R2T,
    P.TextResponse,
    P.TaskMgmtResponse,
    P.LogoutResponse,
)
# Everything the connection may hold after one feed: a partial PDU (BHS, the largest
# AHS, digests, the largest data segment and its padding) ...
MAX_PARTIAL = 48 + 255 * 4 + 4 + 8192 + 3 + 4


def check_bounds(h: CoreHarness) -> None:
    conn = h.conn
    if conn.phase in (Phase.CLOSED, Phase.LOGGED_OUT):
        return
    assert conn.reader.buffered < MAX_PARTIAL
    assert len(conn.tasks) <= conn.settings.max_tasks
    assert h.buffered_task_bytes() <= conn.settings.max_buffered_data_out
    assert len(conn._pending) <= conn.settings.cmd_window
    text = conn._text
    assert text is None or len(text.request) <= conn.settings.max_text_response


def check_login_replies(h: CoreHarness, out: list[P.Pdu]) -> None:
    for i, pdu in enumerate(out):
        if h.logged_in and not isinstance(pdu, P.LoginResponse):
            assert isinstance(pdu, FULL_FEATURE_REPLIES), pdu
            continue
        assert isinstance(pdu, P.LoginResponse), pdu
        if pdu.status_class:
            # A failure status (§11.13.5: class 1 redirection, 2 initiator error, 3
            # target error) ends the login: nothing follows, the connection closes.
            assert pdu.status_class in (2, 3), pdu
            assert i == len(out) - 1 and h.closed == "login failed"


class Session:
    """A fuzzed full-feature session and what its replies may be."""

    def __init__(self, digests: bool = False, discovery: bool = False) -> None:
        self.h = CoreHarness()
        self.h.login(discovery_session=discovery, digests=digests)
        self.itts: set[int] = set()
        self.r2t_tags: list[int] = []
        self.pdus = 0

    def send(self, data: bytes, sent: list[P.Pdu], exact: bool = True) -> list[P.Pdu]:
        """Feed ``data`` (the encoding of ``sent``, or a mutation of it: ``exact`` False)."""
        for pdu in sent:
            self.itts.add(pdu.itt)
        out = self.h.feed(data)
        self.pdus += len(sent) or 1
        for pdu in out:
            assert isinstance(pdu, FULL_FEATURE_REPLIES), pdu
            if not exact:  # tags come from mutated bytes: only the reply types are known
                if isinstance(pdu, P.R2T):
                    self.r2t_tags = [pdu.ttt, *self.r2t_tags[:7]]
            elif isinstance(pdu, P.R2T):
                assert pdu.itt in self.itts
                self.r2t_tags = [pdu.ttt, *self.r2t_tags[:7]]
            elif isinstance(pdu, (P.DataIn, P.ScsiResponsePdu, P.TaskMgmtResponse)):
                assert pdu.itt in self.itts, pdu
            elif isinstance(pdu, P.NopIn):
                assert pdu.itt in self.itts or pdu.itt == P.RESERVED_TAG
            elif isinstance(pdu, P.Reject):
                assert len(pdu.data) == 48 and pdu.reason in set(P.RejectReason)
        if self.h.closed is None:
            check_bounds(self.h)
        return out


@FUZZ
@given(st.data())
def test_login_phase_survives_generated_and_mutated_requests(data: st.DataObject) -> None:
    h = CoreHarness()
    for _ in range(data.draw(st.integers(1, 6))):
        req = data.draw(S.login_pdu())
        raw = wire(req)
        if data.draw(st.integers(0, 3)) == 0:
            raw = data.draw(S.mutated(raw))
        for piece in data.draw(S.chunked(raw)):
            out = h.feed(piece)
            check_login_replies(h, out)
            check_bounds(h)
        if h.closed:
            assert h.feed(wire(req)) == []  # a closed connection ignores further bytes
            break


@FUZZ
@given(st.data())
def test_full_feature_phase_survives_generated_pdus(data: st.DataObject) -> None:
    s = Session(digests=data.draw(st.booleans()), discovery=data.draw(st.integers(0, 5)) == 0)
    for _ in range(data.draw(st.integers(1, 25))):
        pdu = data.draw(S.full_feature_pdu(s.h.conn.expcmdsn, s.r2t_tags))
        try:
            raw = s.h.wire(pdu)
        except ValueError:  # e.g. an AHS the encoder refuses: send the BHS alone
            raw = pdu.encode_bhs() if not pdu.ahs else b""
        s.send(raw, [pdu])
        if s.h.closed:
            break


@FUZZ
@given(st.data())
def test_full_feature_phase_survives_mutated_bytes(data: st.DataObject) -> None:
    s = Session(digests=data.draw(st.booleans()))
    for _ in range(data.draw(st.integers(1, 10))):
        pdu = data.draw(S.full_feature_pdu(s.h.conn.expcmdsn, s.r2t_tags))
        try:
            raw = s.h.wire(pdu)
        except ValueError:
            continue
        raw = data.draw(S.mutated(raw))
        for piece in data.draw(S.chunked(raw)):
            s.send(piece, [pdu], exact=False)
            if s.h.closed:
                return


@FUZZ
@given(st.lists(S.any_pdu(), min_size=1, max_size=8), st.booleans())
def test_every_opcode_with_arbitrary_fields(pdus: list[P.Pdu], digests: bool) -> None:
    s = Session(digests=digests)
    for pdu in pdus:
        try:
            raw = s.h.wire(pdu)
        except ValueError:
            continue
        s.send(raw, [pdu])
        if s.h.closed:
            return


def test_write_with_huge_expected_length_allocates_nothing() -> None:
    """Found by the fuzzer: W=1, EDTL=0xFFFFFFFF made the target allocate 4 GiB."""
    s = Session()
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    cmd = P.ScsiCommand(itt=7, write=True, expected_length=0xFFFFFFFF, cmdsn=1, cdb=cdb)
    (rsp,) = s.send(s.h.wire(cmd), [cmd])
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0x02
    # ILLEGAL REQUEST, INVALID FIELD IN CDB (SPC-4 Table 28: 24h/00h)
    assert (rsp.sense[2] & 0x0F, rsp.sense[12], rsp.sense[13]) == (0x05, 0x24, 0x00)
    assert s.h.conn.tasks == {}


def test_writes_that_never_send_data_end_with_task_set_full() -> None:
    """Found by the fuzzer: in-order writes waiting for Data-Out slide the CmdSN window,
    so without a budget they held unbounded memory (16 MiB each here)."""
    s = Session()
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0x80, 0, 0])  # WRITE(10), 32768 blocks (16 MiB)
    statuses = []
    for i in range(12):
        cmd = P.ScsiCommand(itt=100 + i, write=True, expected_length=16 << 20, cmdsn=1 + i, cdb=cdb)
        out = s.send(s.h.wire(cmd), [cmd])
        statuses += [p.status for p in out if isinstance(p, P.ScsiResponsePdu)]
    assert len(s.h.conn.tasks) == 8  # 8 x 16 MiB = the 128 MiB budget
    assert statuses == [0x28] * 4  # TASK SET FULL (SAM-5 §5.3)
    assert s.h.buffered_task_bytes() <= s.h.conn.settings.max_buffered_data_out

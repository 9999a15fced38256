"""server/fabric.py: iSCSI task management codes (RFC 7143 §11.5.1, §11.6.1) meet SAM-5
§7 once, driven through a real connection and SCSI target with no sockets."""

from __future__ import annotations

import pytest

from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.pdu import TmfCode, TmfResponse
from iscsi_vmtarget.scsi import TmfFunction, TmfResult
from iscsi_vmtarget.scsi.sense import parse_sense
from iscsi_vmtarget.server import fabric
from iscsi_vmtarget.testing.core import CoreHarness

TUR = bytes(6)


def _tmf(h: CoreHarness, function: int, itt: int = 0x100) -> P.Pdu:
    request = P.TaskMgmtRequest(itt=itt, function=function, immediate=True, cmdsn=h.cmdsn)
    (rsp,) = h.feed(h.wire(request))
    assert isinstance(rsp, P.TaskMgmtResponse)
    return rsp


def _tur(h: CoreHarness, itt: int) -> P.ScsiResponsePdu:
    out = h.feed(h.wire(P.ScsiCommand(itt=itt, cmdsn=h.cmdsn, cdb=TUR)))
    h.cmdsn += 1
    (rsp,) = out
    assert isinstance(rsp, P.ScsiResponsePdu)
    return rsp


@pytest.fixture
def harness() -> CoreHarness:
    h = CoreHarness()
    h.login()
    assert _tur(h, 1).status == 2  # the power-on unit attention, consumed
    assert _tur(h, 2).status == 0
    return h


@pytest.mark.parametrize(
    ("code", "asc"),
    [
        (TmfCode.LOGICAL_UNIT_RESET, (0x29, 0x03)),  # BUS DEVICE RESET FUNCTION OCCURRED
        (TmfCode.TARGET_WARM_RESET, (0x29, 0x00)),  # POWER ON, RESET, OR BUS DEVICE RESET
        (TmfCode.TARGET_COLD_RESET, (0x29, 0x00)),
    ],
)
def test_resets_reach_the_scsi_layer(
    harness: CoreHarness, code: TmfCode, asc: tuple[int, int]
) -> None:
    assert _tmf(harness, code).response == TmfResponse.COMPLETE
    rsp = _tur(harness, 3)
    assert rsp.status == 2 and parse_sense(rsp.sense) == (0x6, *asc)


@pytest.mark.parametrize(
    ("function", "response"),
    [
        (TmfCode.CLEAR_ACA, TmfResponse.NOT_SUPPORTED),
        (TmfCode.TASK_REASSIGN, TmfResponse.REASSIGN_NOT_SUPPORTED),
        (0x55, TmfResponse.NOT_SUPPORTED),  # no such function code
    ],
)
def test_functions_we_do_not_perform(harness: CoreHarness, function: int, response: int) -> None:
    assert _tmf(harness, function).response == response
    assert _tur(harness, 3).status == 0  # and nothing was reset


def test_every_sam_answer_has_a_wire_code() -> None:
    assert set(fabric.TMF_RESPONSES) == set(TmfResult)
    assert set(fabric.TMF_FUNCTIONS.values()) == set(TmfFunction)
    assert set(fabric.TMF_FUNCTIONS) == set(TmfCode) - {TmfCode.TASK_REASSIGN}


def test_reset_of_a_lun_that_does_not_exist(harness: CoreHarness) -> None:
    code = fabric.task_management(harness.scsi, harness.nexus, TmfCode.LOGICAL_UNIT_RESET, 7)
    assert code is TmfResponse.LUN_DOES_NOT_EXIST

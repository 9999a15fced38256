"""The iSCSI fabric glue: what the sans-I/O connection needs from the SCSI layer.

``iscsi/`` knows nothing of ``scsi/`` and the other way round (as LIO keeps its
fabric modules apart from the target core): the server hands each
:class:`~iscsi_vmtarget.iscsi.connection.TargetConnection` these functions, and this
module is the one place where iSCSI's wire codes meet SAM-5's vocabulary.
"""

from __future__ import annotations

from ..iscsi.connection import Refusal
from ..iscsi.pdu import TmfCode, TmfResponse
from ..scsi import Nexus, Reason, ScsiTarget, TmfFunction, TmfResult, build_sense
from ..scsi import decode_lun as decode_lun
from ..scsi.task import Remainder

#: The sense reason (SPC-4 §4.5.6) of each command the transport ends itself.
REFUSAL_REASONS: dict[Refusal, Reason] = {
    # More than any CDB we accept may transfer (SBC-3 §6.5.3): as the SCSI layer
    # refuses a too long TRANSFER LENGTH.
    Refusal.TRANSFER_TOO_LONG: Reason.INVALID_FIELD_IN_CDB,
    # ERL 0 has no within-command recovery (RFC 7143 §7.1.4).
    Refusal.DATA_PHASE_ERROR: Reason.DATA_PHASE_ERROR,
}

#: RFC 7143 §11.5.1 function code -> the SAM-5 §7 function it requests. TASK
#: REASSIGN has no SAM-5 counterpart (the connection answers it itself).
TMF_FUNCTIONS: dict[TmfCode, TmfFunction] = {
    TmfCode.ABORT_TASK: TmfFunction.ABORT_TASK,
    TmfCode.ABORT_TASK_SET: TmfFunction.ABORT_TASK_SET,
    TmfCode.CLEAR_ACA: TmfFunction.CLEAR_ACA,
    TmfCode.CLEAR_TASK_SET: TmfFunction.CLEAR_TASK_SET,
    TmfCode.LOGICAL_UNIT_RESET: TmfFunction.LOGICAL_UNIT_RESET,
    # The warm/cold difference is the transport's: a cold reset also ends the sessions.
    TmfCode.TARGET_WARM_RESET: TmfFunction.TARGET_RESET,
    TmfCode.TARGET_COLD_RESET: TmfFunction.TARGET_RESET,
}

#: SAM-5 §7.1 service response -> RFC 7143 §11.6.1 response code.
TMF_RESPONSES: dict[TmfResult, TmfResponse] = {
    TmfResult.FUNCTION_COMPLETE: TmfResponse.COMPLETE,
    # FUNCTION REJECTED: the task manager does not implement the function.
    TmfResult.FUNCTION_REJECTED: TmfResponse.NOT_SUPPORTED,
    TmfResult.INCORRECT_LOGICAL_UNIT_NUMBER: TmfResponse.LUN_DOES_NOT_EXIST,
}


def refusal_sense(refusal: Refusal) -> bytes:
    """Fixed-format sense data (SPC-4 §4.5.3) for a command the transport refused."""
    return build_sense(REFUSAL_REASONS[refusal])


def task_management(scsi: ScsiTarget, nexus: Nexus, code: TmfCode, lun: int) -> TmfResponse:
    """Run an iSCSI task management request on the SCSI layer; the wire response."""
    response, remainder = begin_task_management(scsi, nexus, code, lun)
    if remainder is not None:
        remainder()
    return response


def begin_task_management(
    scsi: ScsiTarget, nexus: Nexus, code: TmfCode, lun: int
) -> tuple[TmfResponse, Remainder | None]:
    """:func:`task_management` up to what waits for the other gateways of a shared LU:
    the wire response, to send once the returned remainder (if any) ran - in a worker
    thread, as it blocks (``ScsiTarget.begin_task_management``)."""
    function = TMF_FUNCTIONS.get(code)
    if function is None:
        return TmfResponse.NOT_SUPPORTED, None
    result, remainder = scsi.begin_task_management(nexus, function, lun)
    return TMF_RESPONSES[result], remainder

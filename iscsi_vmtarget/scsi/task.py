"""What the SCSI layer receives and returns: transport-independent task types.

The SCSI layer knows nothing of iSCSI. A transport (our iSCSI session) collects a
command's Data-Out, then calls :meth:`ScsiTarget.execute` with an I_T nexus, a LUN,
the CDB and the data; it gets back status, Data-In and sense (SAM-5 §5.1, the
"Execute Command" remote procedure call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum


class Status(IntEnum):
    """SAM-5 §5.3 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class TmfFunction(Enum):
    """Task management functions (SAM-5 §7), as the SCSI layer knows them.

    No numbers: SAM-5 defines procedure calls, each transport encodes them its own
    way (the server maps iSCSI's RFC 7143 §11.5.1 codes onto these).
    """

    ABORT_TASK = "ABORT TASK"  # SAM-5 §7.2
    ABORT_TASK_SET = "ABORT TASK SET"  # SAM-5 §7.3
    CLEAR_ACA = "CLEAR ACA"  # SAM-5 §7.4
    CLEAR_TASK_SET = "CLEAR TASK SET"  # SAM-5 §7.5
    LOGICAL_UNIT_RESET = "LOGICAL UNIT RESET"  # SAM-5 §7.7
    # SAM-3 §6.6; obsolete since SAM-4, but SPC-4's REPORT SUPPORTED TASK MANAGEMENT
    # FUNCTIONS still has its TRS bit, and iSCSI's TARGET WARM/COLD RESET ask for it.
    TARGET_RESET = "TARGET RESET"


class TmfResult(Enum):
    """Task management service responses (SAM-5 §7.1)."""

    FUNCTION_COMPLETE = "FUNCTION COMPLETE"
    # The task manager does not implement the requested function.
    FUNCTION_REJECTED = "FUNCTION REJECTED"
    INCORRECT_LOGICAL_UNIT_NUMBER = "INCORRECT LOGICAL UNIT NUMBER"


@dataclass(frozen=True)
class Nexus:
    """An I_T nexus (SAM-5 §3.1.45): initiator port and target port.

    ``initiator_port`` is the SCSI initiator port name (for iSCSI
    ``<iqn>,i,0x<isid>``), ``initiator_name`` the bare device name used for ACLs,
    ``target_port`` the target port name (``<iqn>,t,0x<tpgt>``) and
    ``relative_port`` the relative target port identifier (VPD 0x83).
    """

    initiator_name: str
    initiator_port: str
    target_name: str
    target_port: str
    relative_port: int = 1
    transport_id: bytes = b""  # SPC-4 §7.6.4.6 iSCSI TransportID, for PR


@dataclass(slots=True)
class ScsiResponse:
    """Completion of one command.

    ``data_in`` holds at most what the CDB's allocation/transfer length asked for;
    the transport trims it to its own expected length and computes residuals.
    ``data_out_length`` is how many Data-Out bytes the CDB described (for write
    residuals), 0 for commands without Data-Out.
    """

    status: Status = Status.GOOD
    data_in: bytes | bytearray | memoryview = b""
    sense: bytes = b""
    data_out_length: int = 0


#: Task management functions the target performs, with their bit in the REPORT
#: SUPPORTED TASK MANAGEMENT FUNCTIONS data (SPC-4 §6.36.2, table 268: byte, bit).
#: :meth:`ScsiTarget.task_management` refuses the others as not supported.
SUPPORTED_TMFS: dict[TmfFunction, tuple[int, int]] = {
    TmfFunction.ABORT_TASK: (0, 7),  # ATS
    TmfFunction.ABORT_TASK_SET: (0, 6),  # ATSS
    TmfFunction.CLEAR_TASK_SET: (0, 4),  # CTSS
    TmfFunction.LOGICAL_UNIT_RESET: (0, 3),  # LURS
    TmfFunction.TARGET_RESET: (0, 1),  # TRS
}


ItKey = tuple[str, str]

#: What is left of a task management function once this target did its part: telling
#: the LU's other gateways (blocking until they took it, or their notify timed out,
#: so a transport runs it off its event loop); the function completes when it returned.
Remainder = Callable[[], None]


def it_key(nexus: Nexus) -> ItKey:
    """Identity of an I_T nexus: initiator port name and target port name (SAM-5 §3.1.45)."""
    return (nexus.initiator_port, nexus.target_port)

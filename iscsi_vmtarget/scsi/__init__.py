"""SCSI layer (SAM-5, SPC-4, SBC-3): logical units, command dispatch, sense data.

It knows nothing of iSCSI: a transport calls :meth:`ScsiTarget.execute` with an
I_T nexus, a decoded LUN, the CDB and the Data-Out bytes, and gets back a
:class:`ScsiResponse`.
"""

from .logical_unit import LogicalUnit, UnitIdentity
from .lun_address import decode_lun, encode_lun
from .opcode_row import DataDirection, OpcodeRow
from .opcodes import OPCODE_TABLE
from .pr_state import PrPolicy
from .sense import Reason, ReservationConflict, ScsiError, SenseKey, build_sense
from .target_device import ScsiTarget
from .task import Nexus, ScsiResponse, Status, TmfFunction, TmfResult

__all__ = [
    "OPCODE_TABLE",
    "DataDirection",
    "LogicalUnit",
    "Nexus",
    "OpcodeRow",
    "PrPolicy",
    "Reason",
    "ReservationConflict",
    "ScsiError",
    "ScsiResponse",
    "ScsiTarget",
    "SenseKey",
    "Status",
    "TmfFunction",
    "TmfResult",
    "UnitIdentity",
    "build_sense",
    "decode_lun",
    "encode_lun",
]

"""One row of the opcode table (:mod:`.opcodes`): what the target knows about one
operation code and service action (SPC-4 §6.35.3 CDB usage data, §5.13.1 reservation
conflicts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

from .command import Command
from .logical_unit import LogicalUnit
from .medium_transfer import MediumTransfer
from .pr_state import PrPolicy
from .task import ScsiResponse

HandlerResult = bytes | bytearray | memoryview | ScsiResponse | MediumTransfer | None
Handler = Callable[[Command], HandlerResult]
TransferLength = Callable[[bytes, int], int]
BlockPredicate = Callable[[bytes], bool]
LuPredicate = Callable[[LogicalUnit], bool]

SERVICE_ACTION_IN_16: Final = 0x9E
MAINTENANCE_IN: Final = 0xA3
#: Opcodes whose service action is in byte 1 bits 4:0 (SPC-4 §4.2.2.2).
SERVICE_ACTION_OPCODES: Final = frozenset(
    {
        0x48,  # SANITIZE
        0x5E,  # PERSISTENT RESERVE IN
        0x5F,  # PERSISTENT RESERVE OUT
        0x83,  # EXTENDED COPY
        0x84,  # RECEIVE COPY RESULTS
        SERVICE_ACTION_IN_16,
        MAINTENANCE_IN,
    }
)


class DataDirection(Enum):
    NONE = auto()
    IN = auto()  # Data-In: device server to initiator
    OUT = auto()  # Data-Out: initiator to device server


@dataclass(frozen=True)
class OpcodeRow:
    """Everything the target knows about one operation code.

    ``pr_policy`` is the command's column in the persistent reservation conflict
    tables (SPC-4 §5.13.1 table 64, SBC-3 §4.17 table 13); ``pr_relaxed`` names
    CDB contents that make a conflicting command allowed after all (START STOP
    UNIT with START=1, PREVENT ALLOW MEDIUM REMOVAL with PREVENT=0).
    ``spc2_exempt`` rows run despite another I_T nexus's SPC-2 reservation,
    ``sanitize_exempt`` rows while a SANITIZE is in progress. ``supported`` says
    whether the addressed LU offers the command at all (UNMAP only when thin);
    REPORT SUPPORTED OPERATION CODES lists exactly the supported rows.
    """

    opcode: int
    service_action: int | None
    name: str
    cdb_length: int
    handler: Handler
    direction: DataDirection
    usage: bytes
    transfer_length: TransferLength  # bytes the CDB describes (in or out), given block size
    may_block: BlockPredicate  # may the command fsync or run long? then it runs in a thread
    pr_policy: PrPolicy
    writes_medium: bool = False  # refused with DATA PROTECT on a write-protected LU
    reads_medium: bool = False  # reads the backend (a remote one's reads run in a thread)
    #: a plain READ or WRITE: may be started without waiting where the backend offers
    #: asynchronous I/O (:class:`~.medium_transfer.MediumTransfer`)
    startable: bool = False
    #: "read" or "write": the command is idempotent and its handler does nothing but
    #: range checks and that one medium I/O, so it may be tried inline without blocking
    #: and, cut off, run again whole (READ, WRITE; storage/nowait.py)
    nowait_kind: str | None = None
    needs_lu: bool = True  # False: answered on a LUN without a logical unit too
    ua_exempt: bool = False  # SAM-5 §5.14: INQUIRY, REPORT LUNS, REQUEST SENSE
    pr_relaxed: BlockPredicate | None = None
    spc2_exempt: bool = False
    sanitize_exempt: bool = False
    supported: LuPredicate = field(default=lambda lu: True, compare=False)
    reject_mask: int = field(init=False, repr=False, compare=False)  # ~usage of bytes 1..n-1

    def __post_init__(self) -> None:
        if len(self.usage) != self.cdb_length or self.usage[0] != self.opcode:
            raise ValueError(f"{self.name}: usage mask does not fit the CDB")
        reject = int.from_bytes(bytes(~b & 0xFF for b in self.usage[1:]), "big")
        object.__setattr__(self, "reject_mask", reject)

    @property
    def key(self) -> tuple[int, int | None]:
        return (self.opcode, self.service_action)

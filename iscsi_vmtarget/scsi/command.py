"""One command as handlers see it, plus the CDB field readers they share.

Parsing is kept apart from execution (as in LIO's ``sbc_parse_cdb``): the
dispatcher in :mod:`.target_device` finds the opcode row, checks the CDB against the
row's usage mask, then hands a :class:`Command` to the row's handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .logical_unit import LogicalUnit
from .sense import Reason, ScsiError, cdb_field
from .task import Nexus


@dataclass(slots=True)
class Command:
    """Everything a handler may use: the nexus, the LU (None for an unknown LUN),
    the CDB cut to its length, the Data-Out bytes received and the LUN map."""

    nexus: Nexus
    lun: int
    lu: LogicalUnit | None
    cdb: bytes
    data_out: memoryview
    luns: Mapping[int, LogicalUnit]
    #: the caller can start a medium access and be called back (ScsiTarget.submit)
    startable: bool = False
    #: the medium I/O runs in nowait mode (storage/nowait.py, ScsiTarget.submit)
    nowait: bool = False

    @property
    def unit(self) -> LogicalUnit:
        """The addressed LU; rows with ``needs_lu`` are only dispatched when it exists."""
        if self.lu is None:  # pragma: no cover - guarded by the dispatcher
            raise ScsiError(Reason.LOGICAL_UNIT_NOT_SUPPORTED)
        return self.lu


def be(cdb: bytes, offset: int, length: int) -> int:
    """Big-endian unsigned field of ``length`` bytes (SPC-4 §3.5 byte order)."""
    return int.from_bytes(cdb[offset : offset + length], "big")


class BlockRange(NamedTuple):
    """LOGICAL BLOCK ADDRESS and TRANSFER LENGTH of a block command."""

    lba: int
    blocks: int
    length_byte: int  # where the length field starts, for field pointers


_range = tuple.__new__


def parse_block_range(cdb: bytes) -> BlockRange:
    """LBA and length for the 6/10/12/16-byte block CDB layouts (SBC-3 §5).

    6-byte: 21-bit LBA in bytes 1-3, length in byte 4 with 0 meaning 256
    (READ(6)/WRITE(6), SBC-3 §5.8, §5.32). 10-byte: LBA bytes 2-5, length 7-8.
    12-byte: LBA 2-5, length 6-9. 16-byte: LBA 2-9, length 10-13.
    """
    # int.from_bytes inline, not be(): this runs twice for every READ and WRITE.
    size = len(cdb)
    # tuple.__new__: BlockRange(...) would run the namedtuple's Python-level __new__.
    if size == 10:
        return _range(BlockRange, (int.from_bytes(cdb[2:6], "big"), (cdb[7] << 8) | cdb[8], 7))
    if size == 16:
        lba, blocks = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
        return _range(BlockRange, (lba, blocks, 10))
    if size == 6:
        blocks = cdb[4]
        return BlockRange(be(cdb, 1, 3) & 0x1FFFFF, blocks or 256, 4)
    if size == 12:
        return BlockRange(be(cdb, 2, 4), be(cdb, 6, 4), 6)
    raise ValueError(f"no block range layout for a {size}-byte CDB")


def check_lba_range(num_blocks: int, lba: int, blocks: int) -> None:
    """LOGICAL BLOCK ADDRESS OUT OF RANGE check (SBC-3 §4.5).

    The LBA itself must be within the medium even for a zero transfer length,
    and ``lba + blocks`` must not pass the end. Python integers do not wrap, so
    an LBA near 2**64 cannot sneak past the check.
    """
    if lba >= num_blocks or blocks > num_blocks - lba:
        raise ScsiError(Reason.LBA_OUT_OF_RANGE)


def require(condition: bool, byte: int, bit: int | None = None) -> None:
    """Raise INVALID FIELD IN CDB pointing at ``byte``/``bit`` unless ``condition``."""
    if not condition:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field=cdb_field(byte, bit))

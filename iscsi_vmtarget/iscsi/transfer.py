"""A SCSI task as the iSCSI session tracks it: Data-Out collection and R2T bookkeeping.

RFC 7143 §4.2.4 (data transfer), §11.7 (Data-Out), §11.8 (R2T): a write's data
arrives as immediate data, unsolicited Data-Out (up to FirstBurstLength when
InitialR2T=No) and solicited Data-Out answering R2Ts of at most MaxBurstLength,
with at most MaxOutstandingR2T R2Ts outstanding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import IscsiVmtargetError
from .pdu import RESERVED_TAG


class DataOutError(IscsiVmtargetError):
    """A Data-Out that does not fit its task (offset, length or tag)."""


class DataSequenceError(DataOutError):
    """A DataSN out of sequence (§11.7.5): at ErrorRecoveryLevel 0 the connection fails."""


@dataclass(slots=True)
class Burst:
    """One outstanding R2T: a window of the write buffer the initiator may fill."""

    r2tsn: int
    offset: int
    length: int
    received: int = 0
    next_datasn: int = 0


@dataclass(slots=True)
class Task:
    """One SCSI command in flight on a connection."""

    itt: int
    cmdsn: int
    lun: int
    lun_raw: bytes
    cdb: bytes
    read: bool
    write: bool
    expected_length: int
    immediate: bool = False
    # Data-Out lands here; the PDU's own data segment (bytes) when the command
    # carried all of its data as immediate data (nothing more may arrive then).
    buffer: bytearray | bytes | None = None
    received: int = 0
    unsolicited_end: int = 0
    unsolicited_received: int = 0
    unsolicited_datasn: int = 0
    next_r2t_offset: int = 0
    r2tsn: int = 0
    bursts: dict[int, Burst] = field(default_factory=dict)  # by TTT
    delivered: bool = False  # its CmdSN came up in order
    dispatched: bool = False  # handed to the SCSI layer
    aborted: bool = False

    @property
    def data_complete(self) -> bool:
        return not self.write or self.received >= self.expected_length

    @property
    def ready(self) -> bool:
        return self.delivered and self.data_complete and not self.dispatched and not self.aborted

    def accept_data(
        self, offset: int, data: bytes | bytearray | memoryview, ttt: int, datasn: int | None = None
    ) -> None:
        """Place one Data-Out (or immediate data, ``datasn`` None) into the buffer.

        DataSN counts from 0 within each sequence: the unsolicited one and each R2T's.
        """
        n = len(data)
        if self.buffer is None:
            raise DataOutError("Data-Out for a command that expects no data")
        if self.received >= self.expected_length:
            raise DataOutError("Data-Out after all the expected data arrived")
        if offset + n > self.expected_length:
            raise DataOutError(
                f"Data-Out offset {offset}+{n} beyond expected length {self.expected_length}"
            )
        if ttt == RESERVED_TAG:
            if offset + n > self.unsolicited_end:
                raise DataOutError(f"unsolicited data beyond FirstBurstLength ({offset}+{n})")
            if datasn is not None:
                if datasn != self.unsolicited_datasn:
                    raise DataSequenceError(f"DataSN {datasn}, expected {self.unsolicited_datasn}")
                self.unsolicited_datasn += 1
            self.unsolicited_received += n
        else:
            burst = self.bursts.get(ttt)
            if burst is None:
                raise DataOutError(f"Data-Out with unknown Target Transfer Tag 0x{ttt:08x}")
            if offset < burst.offset or offset + n > burst.offset + burst.length:
                raise DataOutError("Data-Out outside the range of its R2T")
            if datasn is not None:
                if datasn != burst.next_datasn:
                    raise DataSequenceError(f"DataSN {datasn}, expected {burst.next_datasn}")
                burst.next_datasn += 1
            burst.received += n
        self.buffer[offset : offset + n] = data  # type: ignore[index]  # bytearray here
        self.received += n

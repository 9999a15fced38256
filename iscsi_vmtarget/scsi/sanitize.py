"""SANITIZE (SBC-3 §5.18, §4.11): make every user data block unrecoverable.

OVERWRITE writes the initialization pattern over the whole medium OVERWRITE
COUNT times (inverted between passes with INVERT), then makes it durable.
BLOCK ERASE is offered on thin-provisioned LUs only: the whole medium is
deallocated (the backing file becomes one hole, which reads as zeros, LBPRZ=1).
CRYPTO ERASE is offered where the backend encrypts and can change its media key
(a ``crypto_erase()`` method); plain files cannot, so file LUs do not list it.
EXIT FAILURE MODE succeeds: a sanitize here never fails half way and leaves
nothing to exit.

While a sanitize runs, every other command except INQUIRY, REPORT LUNS,
REQUEST SENSE and the REPORT SUPPORTED commands ends with NOT READY, SANITIZE IN
PROGRESS and a progress indication (checked by the dispatcher). The sanitize
survives resets and I_T nexus loss: it is the LU that is busy, not a task.
With the LU's clock and sleep injected it runs at ``sanitize_rate`` bytes per
second, so foreground I/O to other LUs keeps its share of the disk.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from .command import Command, be, require
from .logical_unit import LogicalUnit, SanitizeProgress
from .sbc import flush_medium, unmap_medium, write_medium
from .sense import Reason, ScsiError, param_field

SANITIZE_CHUNK: Final = 1 << 20


class SanitizeAction(IntEnum):
    """SANITIZE service actions (SBC-3 §5.18.1, table 50)."""

    OVERWRITE = 0x01
    BLOCK_ERASE = 0x02
    CRYPTO_ERASE = 0x03
    EXIT_FAILURE_MODE = 0x1F


def sanitize(cmd: Command) -> None:
    """SANITIZE. IMMED=1 is honoured by completing only when done (the status is the
    same, only later); AUSE needs nothing since a sanitize here cannot fail half way."""
    lu = cmd.unit
    cdb = cmd.cdb
    action = cdb[1] & 0x1F  # SERVICE ACTION
    length = be(cdb, 7, 2)  # PARAMETER LIST LENGTH
    if action == SanitizeAction.OVERWRITE:
        require(4 < length <= lu.block_size + 4, 7)
        if len(cmd.data_out) < length:
            raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        pattern, passes, invert = _overwrite_parameters(lu, bytes(cmd.data_out[:length]))
        _run(lu, lambda progress: _overwrite(lu, pattern, passes, invert, progress), passes)
        return
    require(length == 0, 7)
    if action == SanitizeAction.BLOCK_ERASE:
        _run(lu, lambda progress: _block_erase(lu, progress), 1)
    elif action == SanitizeAction.CRYPTO_ERASE:
        _run(lu, lambda progress: _crypto_erase(lu, progress), 1)
    # EXIT FAILURE MODE: there is never a failure mode to leave.


def _overwrite_parameters(lu: LogicalUnit, data: bytes) -> tuple[bytes, int, bool]:
    """OVERWRITE parameter list (SBC-3 §5.18.3, table 52)."""
    invert = bool(data[0] & 0x80)  # INVERT
    test = (data[0] >> 5) & 0x03  # TEST
    count = data[0] & 0x1F  # OVERWRITE COUNT
    pattern_length = be(data, 2, 2)  # INITIALIZATION PATTERN LENGTH
    if test:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(0, 6))
    if count == 0:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(0, 4))
    if pattern_length == 0 or pattern_length > lu.block_size:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(2))
    if 4 + pattern_length != len(data):
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    return data[4:], count, invert


def _run(lu: LogicalUnit, work: object, passes: int) -> None:
    """Mark the LU busy for the duration of ``work`` (a callable taking the progress)."""
    progress = SanitizeProgress(total=max(1, lu.num_blocks * passes))
    with lu.pr_lock:
        if lu.sanitizing is not None:
            raise lu.sanitizing.error()
        lu.sanitizing = progress
    try:
        work(progress)  # type: ignore[operator]
        flush_medium(lu)
    except ScsiError as exc:
        raise ScsiError(Reason.SANITIZE_COMMAND_FAILED) from exc
    finally:
        lu.sanitizing = None


def _overwrite(
    lu: LogicalUnit, pattern: bytes, passes: int, invert: bool, progress: SanitizeProgress
) -> None:
    size = lu.block_size
    block = (pattern * (size // len(pattern) + 1))[:size]
    per_chunk = max(1, SANITIZE_CHUNK // size)
    pacer = _Pacer(lu)
    for number in range(passes):
        current = bytes(b ^ 0xFF for b in block) if invert and number % 2 else block
        chunk = memoryview(current * per_chunk)
        lba = 0
        while lba < lu.num_blocks:
            count = min(per_chunk, lu.num_blocks - lba)
            with lu.ranges.hold(lba, count):
                write_medium(lu, lba * size, chunk[: count * size])
            lba += count
            progress.done += count
            pacer.pace(progress.done * size)


def _block_erase(lu: LogicalUnit, progress: SanitizeProgress) -> None:
    with lu.ranges.hold(0, lu.num_blocks):
        unmap_medium(lu, 0, lu.num_blocks * lu.block_size)
    progress.done = progress.total


def _crypto_erase(lu: LogicalUnit, progress: SanitizeProgress) -> None:
    """Replace the media encryption key: every block becomes unreadable noise."""
    with lu.ranges.hold(0, lu.num_blocks):
        erase = lu.abilities.crypto_erase
        assert erase is not None  # the row is offered only when it is (supported=)
        erase()
    progress.done = progress.total


class _Pacer:
    """Keep background work at ``lu.sanitize_rate`` bytes per second (if a clock
    and a sleep were injected into the LU)."""

    def __init__(self, lu: LogicalUnit) -> None:
        self.lu = lu
        self.start = lu.clock() if lu.clock is not None else 0.0

    def pace(self, done_bytes: int) -> None:
        lu = self.lu
        if lu.clock is None or lu.sleep is None or lu.sanitize_rate <= 0:
            return
        ahead = done_bytes / lu.sanitize_rate - (lu.clock() - self.start)
        if ahead > 0:
            lu.sleep(ahead)


def block_erase_supported(lu: LogicalUnit) -> bool:
    """BLOCK ERASE unmaps the medium, which a provisioning-managed LU can do
    (LBPME=1: thin deallocates, resource provisioned anchors)."""
    return lu.provisioning_managed


def crypto_erase_supported(lu: LogicalUnit) -> bool:
    """CRYPTO ERASE needs a backend that encrypts user data and can change its key."""
    return lu.abilities.crypto_erase is not None

"""Several READ(16)/WRITE(16) commands in flight over one session: how ``state push``
and ``state pull`` stream (issue 14).

One command at a time leaves both ends idle half the time: the target seals (or opens)
a chunk while the initiator waits, then the initiator frames the next command while
the target waits. With a window of commands outstanding (RFC 7143 §3.2.2.1: up to
MaxCmdSN; each task answers its own R2Ts, §11.8, and gathers its own Data-In by
Initiator Task Tag, §11.7) the next command's data is on the wire while the target
works on the previous one.

Completions may come in any order. :func:`write_window` only needs each one GOOD;
:func:`read_window` hands the data back in the order the ranges were asked for. A
UNIT ATTENTION is retried like :meth:`.Initiator.scsi` does (SPC-4 §6.37), so is BUSY
or TASK SET FULL (a target short of buffers for so many commands); any other
failure ends the stream: the commands still in flight are waited for (so the session
stays usable), then :class:`.ScsiCommandError` names the failed range.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from ..iscsi import pdu as P
from ..scsi.lun_address import encode_lun
from ..scsi.sense import parse_sense
from .initiator import (
    CHECK_CONDITION,
    GOOD,
    UNIT_ATTENTION,
    Initiator,
    InitiatorError,
    ScsiCommandError,
    Task,
    cdb16,
)

#: Commands in flight by default: enough to keep both ends busy over loopback or a LAN.
DEPTH: Final = 8
_TRIES: Final = 4  # attempts per command (UNIT ATTENTION retries, as Initiator.scsi)
_READ16, _WRITE16 = 0x88, 0x8A
_LATER: Final = (0x08, 0x28)  # BUSY, TASK SET FULL (SAM-5 §5.3.1): retry it later


@dataclass
class _Command:
    index: int  # its place in the stream
    lba: int
    blocks: int
    data: P.Payload  # WRITE(16)'s data; b"" for a READ(16)
    tries: int = 0


def write_window(
    ini: Initiator,
    lun: int,
    block_size: int,
    pieces: Iterable[tuple[int, P.Payload]],
    depth: int = DEPTH,
    where: str = "",
) -> int:
    """WRITE(16) each ``(lba, data)`` piece (whole blocks, at most MaxBurstLength
    bytes), ``depth`` at a time; the bytes written. ``where``: " of <the LUN>" for
    error messages."""
    commands = (
        _Command(i, lba, memoryview(data).nbytes // block_size, data)
        for i, (lba, data) in enumerate(pieces)
    )
    done = 0
    for command, _ in _run(ini, lun, block_size, commands, depth, f"WRITE(16){where}"):
        done += command.blocks * block_size
    return done


def read_window(
    ini: Initiator,
    lun: int,
    block_size: int,
    ranges: Iterable[tuple[int, int]],
    depth: int = DEPTH,
    where: str = "",
) -> Iterator[bytes]:
    """READ(16) each ``(lba, blocks)`` range, ``depth`` at a time; their data in the
    order of ``ranges`` (a range that completes early waits for those before it)."""
    commands = (_Command(i, lba, blocks, b"") for i, (lba, blocks) in enumerate(ranges))
    early: dict[int, bytes] = {}
    following = 0
    for command, data in _run(ini, lun, block_size, commands, depth, f"READ(16){where}", early):
        early[command.index] = data
        while following in early:
            yield early.pop(following)
            following += 1


def _run(
    ini: Initiator,
    lun: int,
    block_size: int,
    commands: Iterator[_Command],
    depth: int,
    what: str,
    early: dict[int, bytes] | None = None,
) -> Iterator[tuple[_Command, bytes]]:
    """Keep up to ``depth`` of ``commands`` in flight (fewer while ``early`` holds
    results not yet taken, or the target's MaxCmdSN says so); yield each as it ends
    GOOD, with its Data-In."""
    tasks: dict[int, Task] = {}
    flying: dict[int, _Command] = {}
    retry: list[_Command] = []
    exhausted = False
    while True:
        while len(flying) + len(early or ()) < depth and ini.window_open():
            command = retry.pop() if retry else None if exhausted else next(commands, None)
            if command is None:
                exhausted = True
                break
            task = _start(ini, lun, block_size, command)
            tasks[task.itt], flying[task.itt] = task, command
            command.tries += 1
        if not flying:
            return
        task = ini.handle_pdu(ini.recv_pdu(), tasks)  # type: ignore[assignment]
        if task is None:
            continue
        command = flying.pop(task.itt)
        result = task.result
        assert result is not None
        expected = command.blocks * block_size
        if result.status == GOOD and (command.data or len(result.data) == expected):
            yield command, result.data
            continue
        if result.status == GOOD:
            _drain(ini, tasks)
            raise InitiatorError(
                f"{what} at LBA {command.lba} returned {len(result.data)} of {expected} bytes"
            )
        sense = parse_sense(result.sense)
        again = result.status in _LATER or (
            result.status == CHECK_CONDITION and sense[0] == UNIT_ATTENTION
        )
        if again and command.tries < _TRIES:
            retry.append(command)  # once the others in flight have made room
            continue
        _drain(ini, tasks)
        raise ScsiCommandError(
            f"{what} at LBA {command.lba} ({command.blocks} blocks)", result.status, sense
        )


def _start(ini: Initiator, lun: int, block_size: int, command: _Command) -> Task:
    if command.data:
        cdb = cdb16(_WRITE16, 0, command.lba, command.blocks)
        return ini.start_command(cdb, encode_lun(lun), command.data, 0, None)
    cdb = cdb16(_READ16, 0, command.lba, command.blocks)
    return ini.start_command(cdb, encode_lun(lun), b"", command.blocks * block_size, None)


def _drain(ini: Initiator, tasks: dict[int, Task]) -> None:
    """Let the commands still in flight end (their outcome no longer matters)."""
    while tasks:
        ini.handle_pdu(ini.recv_pdu(), tasks)

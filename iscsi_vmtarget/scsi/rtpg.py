"""REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action 0Ah; SPC-4 §6.37): the
command's side of :mod:`.alua`."""

from __future__ import annotations

from .command import Command, require
from .logical_unit import LogicalUnit


def report_target_port_groups(cmd: Command) -> bytes:
    """The LU's target port groups; PARAMETER DATA FORMAT 000b (length header) or
    001b (extended header with the implicit transition time), others refused."""
    assert cmd.lu is not None and cmd.lu.alua is not None  # the row's `supported`
    data_format = cmd.cdb[1] >> 5
    require(data_format in (0, 1), 1)
    return cmd.lu.alua.report(extended=data_format == 1)


def offers_alua(lu: LogicalUnit) -> bool:
    """Whether the LU has target port groups (its server gave it :class:`.alua.PortGroups`)."""
    return lu.alua is not None

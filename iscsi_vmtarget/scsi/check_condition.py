"""CHECK CONDITION: the response of a command that failed, its sense data in the format
the LU's control mode page asks for (D_SENSE, SPC-4 §7.5.7; built by
:func:`.sense.build_sense`, the one place sense data is made)."""

from __future__ import annotations

from .logical_unit import LogicalUnit
from .sense import ScsiError, build_sense
from .task import ScsiResponse, Status


def check_condition(lu: LogicalUnit | None, err: ScsiError) -> ScsiResponse:
    """CHECK CONDITION for ``err`` (fixed-format sense without an LU: no mode page)."""
    sense = build_sense(
        err.reason,
        descriptor=lu.mode.d_sense if lu is not None else False,
        field=err.field,
        information=err.information,
    )
    return ScsiResponse(Status.CHECK_CONDITION, sense=sense)

"""Events the sans-I/O connection hands to the server (h11 style: small, frozen)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .login import LoginResult
    from .pdu import TmfCode
    from .transfer import Task


@dataclass(frozen=True, slots=True)
class LoginComplete:
    """The connection entered full feature phase (RFC 7143 §6.3)."""

    result: LoginResult


@dataclass(frozen=True, slots=True)
class ExecuteCommand:
    """A SCSI command has all its data and its turn: run it, then call
    :meth:`TargetConnection.command_completed`."""

    task: Task


@dataclass(frozen=True, slots=True)
class ResetRequested:
    """LOGICAL UNIT RESET or TARGET WARM/COLD RESET (RFC 7143 §11.5.1).

    The connection has aborted its own tasks; the server applies the reset to the
    SCSI layer and to the other sessions, then calls
    :meth:`TargetConnection.task_management_completed` with ``itt``.
    """

    itt: int
    function: TmfCode
    lun: int


@dataclass(frozen=True, slots=True)
class ConnectionClosing:
    """Send what is queued, then close (logout, fatal protocol error, login failure)."""

    reason: str


Event = LoginComplete | ExecuteCommand | ResetRequested | ConnectionClosing

"""Our own initiator (the client role of the same codec): tests, tools, replication."""

from .initiator import Initiator, InitiatorError, LoginFailed, ScsiResult

__all__ = ["Initiator", "InitiatorError", "LoginFailed", "ScsiResult"]

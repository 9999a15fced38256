"""Errors of the VM/unit layer, each phrased for the operator.

Every error raised before a change is committed leaves what is stored unchanged;
the CLI prints ``iscsi-vmtarget: <message>`` and exits 1.
"""

from __future__ import annotations

from ..errors import IscsiVmtargetError


class VmError(IscsiVmtargetError):
    """Base class: a problem with a pool, a unit or a VM, phrased for the operator."""


class FormatError(VmError):
    """A unit header (or a pool table) that cannot be used: no marker, bad checksum."""


class NewerFormatError(FormatError):
    """A unit written by a newer iscsi-vmtarget: we refuse to read or change it."""


class KeyFileError(VmError):
    """The master key file is missing, malformed, too open, or not the one a unit needs."""


class IntegrityError(VmError):
    """An encrypted chunk failed authentication: tampered, swapped or torn."""


class InUseError(VmError):
    """The unit is exported by a running server (it holds the unit's lock)."""


class NotFoundError(VmError):
    """No such pool or VM."""


class SizeError(VmError):
    """A size that is malformed, too small, not block aligned or does not fit."""


class ForeignUnitError(FormatError):
    """A candidate in a pool that carries no unit marker (someone else's data)."""

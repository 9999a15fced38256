"""The root of every exception the package raises on purpose.

``except IscsiVmtargetError`` catches all of them (the CLI turns one into a single
line on stderr); each class keeps its other base (a ``ValueError`` subclass is still
a ``ValueError``), so existing ``except`` clauses behave as before. No imports: every
layer may use it.
"""

from __future__ import annotations


class IscsiVmtargetError(Exception):
    """Something iscsi_vmtarget refused or could not do, with a message saying what."""

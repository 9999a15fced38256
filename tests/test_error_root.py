"""One error root: every exception class the package defines derives from
:class:`~iscsi_vmtarget.errors.IscsiVmtargetError` (so the CLI can catch them all) and
keeps its other bases (a ``ValueError`` subclass is still caught as a ``ValueError``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import iscsi_vmtarget
from iscsi_vmtarget.errors import IscsiVmtargetError
from iscsi_vmtarget.iscsi.names import IscsiNameError
from iscsi_vmtarget.iscsi.pdu import PduFormatError
from iscsi_vmtarget.server.masking import AclError
from iscsi_vmtarget.vm.vm_errors import NotFoundError, VmError


def package_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(iscsi_vmtarget.__path__, "iscsi_vmtarget."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found.append(value)
    return found


def test_every_exception_has_the_one_root() -> None:
    classes = package_exceptions()
    assert len(classes) > 30  # the walk found them (33 when the root was added)
    strays = [
        f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, IscsiVmtargetError)
    ]
    assert not strays


def test_other_bases_are_kept() -> None:
    for cls in (IscsiNameError, PduFormatError, AclError):
        assert issubclass(cls, ValueError)
    assert issubclass(NotFoundError, VmError)
    assert str(NotFoundError("no VM named x")) == "no VM named x"

"""Fixtures for the VM layer tests: a manager in a temporary state directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.vm import StateDir, VmManager
from tests.vm.replica_site import Site


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def manager(state_dir: Path) -> Iterator[VmManager]:
    with VmManager(StateDir.at(str(state_dir))) as m:
        yield m


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A replication site (:class:`tests.vm.replica_site.Site`), closed afterwards."""
    s = Site(tmp_path)
    yield s
    s.close()

"""Fixtures for the interop tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop.guestlib import build_guest


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    """The guest (kernel + initramfs) from tools/guest, built once and cached."""
    return build_guest()


@pytest.fixture(scope="session")
def multipath_guest_dir() -> Path:
    """The multipath guest (generic kernel, multipath-tools, scsi_dh_alua), cached."""
    return build_guest(multipath=True)

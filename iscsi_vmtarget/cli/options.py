"""Command-line options shared by the management commands."""

from __future__ import annotations

import argparse

from ..server.config import ServeConfig
from ..sizes import parse_size


def add_state_dir(
    p: argparse.ArgumentParser, what: str = "where pools, pool definitions and the key file live"
) -> None:
    """--state-dir, which every management command takes."""
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        default=ServeConfig().state_dir,
        help=f"{what} (default ./var/iscsi-vmtarget)",
    )


def add_common(p: argparse.ArgumentParser, *, key: bool = True) -> None:
    """--state-dir (and --key-file) for a command on the VMs and their pools."""
    add_state_dir(p)
    if key:
        p.add_argument(
            "--key-file",
            metavar="FILE",
            help="master key file (default <state-dir>/master.key, created 0600 by the "
            "first 'vm create')",
        )


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc

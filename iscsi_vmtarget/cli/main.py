"""``iscsi-vmtarget``: one CLI for serving and managing the target."""

from __future__ import annotations

import argparse
import logging
import sys

from . import acl, config_cmd, discover, key, lun, pool, serve, status, target, vm
from . import portal as portal_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iscsi-vmtarget",
        description="A pure-Python iSCSI target for virtual-machine storage units.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.add_parser(sub)
    vm.add_parser(sub)
    pool.add_parser(sub)
    discover.add_parser(sub)
    key.add_parser(sub)
    for module in (target, lun, acl, portal_cmd, status, config_cmd):  # management (issue 6)
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for usage errors, as argparse does)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

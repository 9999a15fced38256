"""``iscsi-vmtarget``: one CLI for serving and managing the target.

Every failure ends as one line on stderr, ``iscsi-vmtarget: <what went wrong>``, and a
non-zero exit status: 2 for usage errors (argparse), 1 for the rest. An
:class:`~iscsi_vmtarget.errors.IscsiVmtargetError` or :class:`OSError` that a verb does
not handle itself is turned into that line here, so no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import IscsiVmtargetError
from . import (
    acl,
    api,
    config_cmd,
    discover,
    hypervisor_stream,
    key,
    lun,
    pool,
    serve,
    status,
    target,
    vm,
)
from . import portal as portal_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iscsi-vmtarget",
        description="A pure-Python iSCSI target for virtual-machine storage units.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    # setup.cfg reads the same attribute: one source for the version
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.add_parser(sub)
    vm.add_parser(sub)
    pool.add_parser(sub)
    discover.add_parser(sub)
    key.add_parser(sub)
    hypervisor_stream.add_parser(sub)  # state push|pull (config push|pull: config_cmd)
    for module in (target, lun, acl, portal_cmd, status, config_cmd, api):  # management (issue 6)
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
    state_dir = getattr(args, "state_dir", None)
    if state_dir and os.path.exists(state_dir) and not os.path.isdir(state_dir):
        return fail(f"{state_dir}: not a directory (--state-dir)")
    try:
        return int(args.func(args))
    except IscsiVmtargetError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(describe_os_error(exc))


def fail(message: str) -> int:
    """Print ``iscsi-vmtarget: <message>`` on stderr; the exit status of a failure."""
    print(f"iscsi-vmtarget: {message}", file=sys.stderr)
    return 1


def describe_os_error(exc: OSError) -> str:
    """``<path>: <reason>`` (both paths of a rename), or the reason alone."""
    reason = exc.strerror or str(exc)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

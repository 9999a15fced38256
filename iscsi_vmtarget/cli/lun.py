"""``iscsi-vmtarget lun``: give a target a LUN backed by a file or block device, or take
it away (sessions that see it lose it; the backing file stays)."""

from __future__ import annotations

import argparse
import errno
import os

from ..sizes import parse_size
from .target import add_common, done, invoke, lun_number


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lun = sub.add_parser("lun", help="map and unmap a target's LUNs", description=__doc__)
    verbs = lun.add_subparsers(dest="lun_command", metavar="VERB", required=True)

    p = verbs.add_parser(
        "map",
        help="add a LUN to a target",
        description="Add LUN NUMBER to TARGET, backed by PATH (a file is created sparse "
        "when --size is given and it does not exist; an existing one is never resized).",
    )
    p.add_argument("target")
    p.add_argument("number", type=lun_number)
    p.add_argument("path")
    p.add_argument("--size", type=parse_size, help="size of a new backing file (e.g. 1G)")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--block-size", type=int, default=512, choices=(512, 1024, 2048, 4096))
    add_common(p)
    p.set_defaults(func=_map)

    p = verbs.add_parser("unmap", help="remove a LUN from a target", description=__doc__)
    p.add_argument("target")
    p.add_argument("number", type=lun_number)
    add_common(p)
    p.set_defaults(
        func=lambda a: done(invoke(a, "lun.unmap", {"target": a.target, "number": a.number}))
    )


def _map(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a LUN's backing is a file or a device", path)
    if args.size is not None and not 0 < args.size < 1 << 63:  # off_t: what a file can be
        raise OSError(errno.EINVAL, f"--size {args.size} is out of range", path)
    if args.size is None and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "does not exist (--size creates it)", path)
    payload = {
        "target": args.target,
        "number": args.number,
        "path": path,
        "read_only": args.read_only,
        "block_size": args.block_size,
    }
    if args.size is not None:
        payload["size"] = args.size
    return done(invoke(args, "lun.map", payload))

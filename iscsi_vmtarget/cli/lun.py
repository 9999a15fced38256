"""``iscsi-vmtarget lun``: give a target a LUN backed by a file, a block device or a Ceph
RBD image, or take it away (sessions that see it lose it; the backing stays)."""

from __future__ import annotations

import argparse
import errno
import os

from ..errors import IscsiVmtargetError
from ..sizes import parse_size
from .target import add_common, done, invoke, lun_number


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lun = sub.add_parser("lun", help="map and unmap a target's LUNs", description=__doc__)
    verbs = lun.add_subparsers(dest="lun_command", metavar="VERB", required=True)

    p = verbs.add_parser(
        "map",
        help="add a LUN to a target",
        description="Add LUN NUMBER to TARGET, backed by PATH or by the RBD image --rbd "
        "(a file is created sparse, an image thin, when --size is given and it does not "
        "exist; an existing one is never resized).",
    )
    p.add_argument("target")
    p.add_argument("number", type=lun_number)
    p.add_argument("path", nargs="?", help="backing file or block device (or give --rbd)")
    p.add_argument(
        "--rbd", metavar="POOL[/NAMESPACE]/IMAGE", help="back the LUN by this Ceph RBD image"
    )
    p.add_argument("--ceph-conf", metavar="FILE", help="the cluster's ceph.conf (with --rbd)")
    p.add_argument("--ceph-id", metavar="USER", help="cephx user, without client. (with --rbd)")
    p.add_argument(
        "--alua-non-owner",
        choices=("standby", "active-non-optimized"),
        help="what the gateways that do not own the image are (with --rbd; default standby)",
    )
    p.add_argument("--size", type=parse_size, help="size of a new backing file or image (e.g. 1G)")
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
    if (args.path is None) == (args.rbd is None):
        raise IscsiVmtargetError("lun map: give a PATH or --rbd POOL/IMAGE (one of them)")
    if args.rbd is None and (args.ceph_conf or args.ceph_id or args.alua_non_owner):
        raise IscsiVmtargetError(
            "lun map: --ceph-conf, --ceph-id and --alua-non-owner go with --rbd"
        )
    if args.rbd is not None:
        return done(invoke(args, "lun.map", _rbd_payload(args)))
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


def _rbd_payload(args: argparse.Namespace) -> dict[str, object]:
    payload: dict[str, object] = {
        "target": args.target,
        "number": args.number,
        "rbd": args.rbd,
        "read_only": args.read_only,
        "block_size": args.block_size,
    }
    if args.ceph_conf is not None:
        payload["ceph_conf"] = os.path.abspath(args.ceph_conf)
    if args.ceph_id is not None:
        payload["ceph_id"] = args.ceph_id
    if args.alua_non_owner is not None:
        payload["alua_non_owner"] = args.alua_non_owner
    if args.size is not None:
        payload["size"] = args.size
    return payload

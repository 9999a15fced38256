"""``iscsi-vmtarget pool``: create and list the pools units are allocated from.

A pool is a directory of sparse files (``--path``, the default kind), a block device
or large file carved into units with an on-device unit table (``--device``), or a Ceph
RBD pool where each unit is an image (``--rbd``). The pool ``default``
(``<state-dir>/pools/default``) always exists.
"""

from __future__ import annotations

import argparse
import sys

from ..sizes import format_size
from ..vm import VmManager
from .options import add_common, size_arg
from .route import print_json, run_offline


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pool = sub.add_parser("pool", help="manage pools", description=__doc__)
    verbs = pool.add_subparsers(dest="pool_command", metavar="VERB", required=True)

    p = verbs.add_parser(
        "create",
        help="define a pool",
        description="Define a pool: a directory (--path, default <state-dir>/pools/NAME), "
        "a device (--device) or a Ceph RBD pool (--rbd). A device that already holds a "
        "unit table is adopted; one holding other data is refused unless --force.",
    )
    p.add_argument("name")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--path", metavar="DIR", help="directory of sparse unit files")
    where.add_argument("--device", metavar="PATH", help="block device or large file")
    where.add_argument(
        "--rbd", metavar="POOL[/NAMESPACE]", help="Ceph RBD pool: each unit an image"
    )
    p.add_argument("--ceph-conf", metavar="FILE", help="with --rbd: the cluster's ceph.conf")
    p.add_argument("--ceph-id", metavar="USER", help="with --rbd: cephx user, without client.")
    p.add_argument(
        "--size", type=size_arg, metavar="SIZE", help="with --device: create the file this big"
    )
    p.add_argument("--force", action="store_true", help="format a device that holds data")
    p.add_argument("--json", action="store_true")
    add_common(p, key=False)
    p.set_defaults(func=lambda a: run_offline(a, _create))

    p = verbs.add_parser("list", help="list pools", description="List the defined pools.")
    p.add_argument("--json", action="store_true")
    add_common(p, key=False)
    p.set_defaults(func=lambda a: run_offline(a, _list))


def _create(args: argparse.Namespace, manager: VmManager) -> int:
    if args.size is not None and not args.device:
        print("iscsi-vmtarget: --size goes with --device", file=sys.stderr)
        return 2
    if (args.ceph_conf or args.ceph_id) and not args.rbd:
        print("iscsi-vmtarget: --ceph-conf and --ceph-id go with --rbd", file=sys.stderr)
        return 2
    if args.rbd:
        pool = manager.catalog.create_rbd(args.name, args.rbd, args.ceph_conf, args.ceph_id)
    elif args.device:
        pool = manager.catalog.create_device(args.name, args.device, args.size, args.force)
    else:
        pool = manager.catalog.create_directory(args.name, args.path)
    if args.json:
        print_json(pool.describe())
    else:
        print(f"created {pool.kind} pool {pool.name} at {pool.path}")
    return 0


def _list(args: argparse.Namespace, manager: VmManager) -> int:
    pools = [pool.describe() for pool in manager.catalog.all()]
    if args.json:
        print_json(pools)
        return 0
    for info in pools:
        free = info.get("free_bytes")
        free_text = format_size(free) if isinstance(free, int) else "?"
        print(f"{info['name']:<12} {info['kind']:<9} free {free_text:<8} {info['path']}")
    return 0

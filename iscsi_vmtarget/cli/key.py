"""``iscsi-vmtarget key``: the master key that wraps every unit's data key.

``key rotate`` makes a new master key and re-wraps each unit's data key with it
(RFC 3394 key wrap); the encrypted state is not re-encrypted. The new key waits in
``<key file>.new`` until every unit is done, so an interrupted rotation is finished by
running it again. ``key show`` prints the key id units record.
"""

from __future__ import annotations

import argparse
from typing import cast

from ..vm import VmManager
from .options import add_common
from .route import print_json, run_offline


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    key = sub.add_parser("key", help="manage the master key", description=__doc__)
    verbs = key.add_subparsers(dest="key_command", metavar="VERB", required=True)
    p = verbs.add_parser("rotate", help="re-wrap every unit key under a new master key")
    p.add_argument(
        "--force", action="store_true", help="finish even if some units cannot be re-wrapped"
    )
    p.add_argument("--json", action="store_true")
    add_common(p)
    p.set_defaults(func=lambda a: run_offline(a, _rotate))
    p = verbs.add_parser("show", help="print the key file's path and key id")
    p.add_argument("--json", action="store_true")
    add_common(p)
    p.set_defaults(func=lambda a: run_offline(a, _show))


def _rotate(args: argparse.Namespace, manager: VmManager) -> int:
    report = manager.rotate_key(force=args.force)
    if args.json:
        print_json(report)
        return 0
    rewrapped = cast(list[str], report["rewrapped"])
    current = cast(list[str], report["already_current"])
    skipped = cast(list[dict[str, str]], report["skipped"])
    print(f"new master key {report['key_id']} in {report['key_file']}")
    print(f"re-wrapped {len(rewrapped)} unit keys, {len(current)} already current")
    for item in skipped:
        print(f"skipped {item['location']}: {item['reason']}")
    return 0


def _show(args: argparse.Namespace, manager: VmManager) -> int:
    keys = [{"path": k.path, "key_id": k.key_id.hex()} for k in manager.keyring().keys]
    if args.json:
        print_json(keys)
    else:
        for k in keys:
            print(f"{k['key_id']}  {k['path']}")
    return 0

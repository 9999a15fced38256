"""``iscsi-vmtarget config``: the managed configuration as one declarative document.

``config export`` prints ``conf/config.json`` (JSON; secrets included unless
``--redact``, so guard the output). ``config apply FILE`` (JSON, or TOML when FILE
ends in ``.toml``) makes the configuration exactly FILE: it prints what changes
(``+``/``-``/``~`` lines), applies it live when the daemon runs, and is idempotent:
a second apply prints ``no change``. ``--dry-run`` only prints the changes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

from ..server.persist import PersistError, read_document
from .hypervisor_stream import add_verbs
from .target import add_common, done, invoke


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    config = sub.add_parser(
        "config", help="export and apply the configuration", description=__doc__
    )
    verbs = config.add_subparsers(dest="config_command", metavar="VERB", required=True)
    p = verbs.add_parser("export", help="print the configuration", description=__doc__)
    p.add_argument("--redact", action="store_true", help="replace secrets by their length")
    add_common(p, json_flag=False)
    p.set_defaults(func=_export)
    p = verbs.add_parser("apply", help="make the configuration FILE", description=__doc__)
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true", help="only print what would change")
    add_common(p)
    p.set_defaults(func=_apply)
    add_verbs(verbs, "config")  # push|pull: a VM's config region (hypervisor view)


def _export(args: argparse.Namespace) -> int:
    args.json = True
    with contextlib.redirect_stdout(io.StringIO()):
        result = invoke(args, "config.export", {"secrets": not args.redact})
    if result is None:
        return 1
    print(json.dumps(result["document"], indent=2))
    return 0


def _apply(args: argparse.Namespace) -> int:
    try:
        document = read_document(args.file)  # validate (and resolve paths) here
    except PersistError as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    payload = {
        "document": document,
        "dry_run": args.dry_run,
        "base": os.path.dirname(os.path.abspath(args.file)),
    }
    return done(invoke(args, "config.apply", payload))

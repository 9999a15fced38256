"""``iscsi-vmtarget state push|pull URL`` and ``config push|pull URL``: a hypervisor's
streams into and out of a VM's unit, over iSCSI with the project's own initiator
(issue 14).

``URL`` is the VM's target, ``iscsi://[USER[%SECRET]@]HOST[:PORT]/IQN``; the host
logging in (``--initiator-name``) needs a grant with ``--view hypervisor``, which shows
it the state LUN (254) and the config LUN (255) (:mod:`..server.hypervisor_view`).

* ``push`` copies stdin to the region's LUN, then records the stream's length in the
  LUN's last 4 KiB (the stream descriptor), so ``pull`` returns exactly the bytes
  pushed. A stream larger than the region is refused before anything is written, so
  the previous image stays readable: push holds the stream in memory until it has
  all of it (at most the region's size).
* ``pull`` copies the recorded image to stdout.

What QEMU runs as ``migrate "exec:iscsi-vmtarget state push URL"`` and
``-incoming "exec:iscsi-vmtarget state pull URL"``.
"""

from __future__ import annotations

import argparse
import sys

from ..client.initiator import InitiatorError
from ..client.region_stream import pull, push
from ..client.remote import open_lun
from ..server.hypervisor_view import CONFIG_LUN, STATE_LUN
from .remote_options import add_login_options, login_url

HYPERVISOR = "iqn.2026-11.org.iscsi-vmtarget:hypervisor"
_LUNS = {"state": STATE_LUN, "config": CONFIG_LUN}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``state`` command (``config push|pull`` join :mod:`.config_cmd`'s verbs)."""
    state = sub.add_parser(
        "state",
        help="push or pull a VM's execution state over iSCSI (hypervisor view)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_verbs(state.add_subparsers(dest="state_command", metavar="VERB", required=True), "state")


def add_verbs(verbs: argparse._SubParsersAction, region: str) -> None:  # type: ignore[type-arg]
    for verb, text in (("push", f"stdin -> the VM's {region} LUN"), ("pull", "-> stdout")):
        p = verbs.add_parser(
            verb,
            help=f"{region} {verb}: {text} (hypervisor view)",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("url", metavar="URL", help="iscsi://HOST[:PORT]/IQN of the VM's target")
        add_login_options(p, HYPERVISOR, "target")
        p.set_defaults(func=_run, region=region, verb=verb)


def _run(args: argparse.Namespace) -> int:
    url = login_url(args, args.url)
    if url is None:
        return 2
    lun = url.lun or _LUNS[args.region]  # an explicit /LUN wins
    try:
        remote = open_lun(
            type(url)(url.host, url.port, url.iqn, lun, url.user, url.secret),
            initiator_name=args.initiator_name,
            chap_user=args.chap_user,
            chap_secret=args.chap_secret,
            mutual_secret=args.mutual_secret,
        )
    except InitiatorError as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    try:
        if args.verb == "push":
            push(remote, sys.stdin.buffer, args.region)
        else:
            pull(remote, sys.stdout.buffer)
    except InitiatorError as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    finally:
        remote.close()
    return 0

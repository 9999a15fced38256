"""``iscsi-vmtarget status``: the running daemon's portals, sessions (initiator, target,
peer, connections, visible LUNs), initiators, and per-LUN I/O counters with average
latencies (the same numbers ``serve --metrics`` exports), and the unit leases of
device-pool VMs: held, or waited for (whose lease, expiring when)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

from .target import add_common, invoke


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="sessions and I/O counters", description=__doc__)
    add_common(p)
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    json_out, args.json = args.json, True
    with contextlib.redirect_stdout(io.StringIO()):
        result = invoke(args, "status", {})
    if result is None:
        return 1
    if json_out:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(f"portals: {' '.join(result['portals'])}   targets: {result['targets']}")
    print(f"sessions: {len(result['sessions'])}   initiators: {len(result['initiators'])}")
    for s in result["sessions"]:
        luns = ",".join(map(str, s["luns"])) or "-"
        print(
            f"  tsih {s['tsih']:5d}  {s['initiator']}  ->  {s['target'] or '(discovery)'}"
            f"  from {s['peer']}  conns {s['connections']}  luns {luns}"
        )
    for lun in result["luns"]:
        merged = (
            f"  merged reads {lun['merged_reads']} writes {lun['merged_writes']}"
            if "merged_reads" in lun
            else ""
        )
        print(
            f"  lun {lun['target']}/{lun['lun']}: reads {lun['reads']} "
            f"({lun['read_bytes']} B, {lun['read_latency_ms']:.3f} ms avg)  writes "
            f"{lun['writes']} ({lun['write_bytes']} B, {lun['write_latency_ms']:.3f} ms avg)"
            f"  other {lun['others']}  errors {lun['errors']}{merged}"
        )
    for lease in result.get("leases", []):
        if lease["state"] == "waiting":
            print(f"  vm {lease['vm']}: not served: {lease['reason']}")
        else:
            print(f"  vm {lease['vm']}: unit {lease['unit']} lease {lease['state']}")
    return 0

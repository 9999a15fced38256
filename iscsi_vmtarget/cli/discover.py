"""``iscsi-vmtarget discover``: find every VM from the units of the pools alone.

Each candidate unit is checked for the marker and the header checksum; base units name
their secondary disks by NAA designator, so VMs are rebuilt with no other database.
Secondaries no base unit names, damaged units and foreign files are listed apart. An
interrupted resize is finished on the way (``--no-repair`` only reports).
"""

from __future__ import annotations

import argparse

from ..server.vm_luns import vm_target_name
from ..sizes import format_size
from ..vm import VmManager
from .options import add_common
from .route import print_json, run_offline


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("discover", help="scan pools for VMs", description=__doc__)
    p.add_argument("--pool", help="scan only this pool")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--no-repair", action="store_true", help="report interrupted resizes, do not finish them"
    )
    add_common(p, key=False)
    p.set_defaults(func=lambda a: run_offline(a, _discover))


def _discover(args: argparse.Namespace, manager: VmManager) -> int:
    found = manager.discover(args.pool, repair=not args.no_repair)
    if args.json:
        print_json(found.to_json())
        return 0
    for vm in found.vms:
        print(
            f"VM {vm.name} ({vm.base.pool}, {vm.base.header.mode.name.lower()}) "
            f"{vm_target_name(vm.name)}"
        )
        for number, unit in enumerate(vm.units):
            h = unit.header
            print(
                f"  LUN {number}: {h.role.name.lower()} {format_size(vm.disk_size(unit))} "
                f"naa {h.naa.hex()} {unit.ref.location}"
            )
        for naa in vm.missing:
            print(f"  MISSING secondary naa {naa.hex()}")
    for unit in found.orphans:
        print(
            f"orphan secondary {unit.header.unit_uuid} of {unit.header.name!r} "
            f"({unit.ref.location})"
        )
    for item in found.damaged:
        print(f"damaged {item['location']}: {item['reason']}")
    for item in found.foreign:
        print(f"foreign {item['location']}")
    for item in found.repaired:
        print(f"repaired {item['location']}: {item['action']}")
    return 0
